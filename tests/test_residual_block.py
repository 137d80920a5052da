"""ResidualBlock: explicit forward, inverse by root finding, log-dets (exact against slogdet of
an autograd Jacobian, series unbiased), statistics, settings and bad input (DESIGN.md §5)."""

import copy
import math

import pytest
import torch
from torch import nn

import impflow
import impflow.nn as inn
from impflow.logdet import SeriesDivergenceError
from impflow.solvers import SolverWarning

from block_testing import break_lipschitz, convnet, max_abs_per_sample, mlp
from flow_testing import autograd_logdet
from testing import DTYPES

# One intra-op thread: on a shared 2-core machine more threads only wait on each other.
pytestmark = pytest.mark.usefixtures("one_thread")


def _block(kind="vector", dtype=torch.float32, **kwargs):
    g = mlp(3) if kind == "vector" else convnet(2, (4, 4))
    shape = (3,) if kind == "vector" else (2, 4, 4)
    return inn.ResidualBlock(g.to(dtype), **kwargs), shape


def test_forward_is_x_plus_g_and_keeps_the_networks():
    g = mlp(3).eval()
    block = inn.ResidualBlock(g).eval()
    assert block.g is g
    x = torch.randn(5, 3)
    z, logdet = block(x)
    assert torch.equal(z, x + g(x))
    assert logdet.shape == (5,)
    assert block.last_stats.forward is None  # explicit: no solve


@pytest.mark.parametrize("kind", ["vector", "image"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 7])
def test_inverse_of_forward_round_trips(kind, dtype, batch):
    block, shape = _block(kind, dtype)
    block.eval()
    x = torch.randn(batch, *shape, dtype=dtype)
    with torch.no_grad():
        z, logdet = block(x)
        x_rec, logdet_inv = block.inverse(z)
    assert x_rec.shape == x.shape and x_rec.dtype == dtype and logdet_inv.shape == (batch,)
    assert float((x_rec - x).abs().max()) <= (1e-5 if dtype == torch.float32 else 1e-9)
    # Default tolerances: max|F| <= 1e-5 per sample (float32), F = z - g(x) - x.
    with torch.no_grad():
        residual = z - block.g(x_rec) - x_rec
    assert float(max_abs_per_sample(residual).max()) <= 1e-5
    stats = block.last_stats.inverse
    assert stats.all_converged and stats.nstep.shape == (batch,)


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_exact_logdet_matches_slogdet_of_autograd_jacobian(kind):
    block, shape = _block(kind, torch.float64, logdet="exact")
    block.eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = block(x)
    reference = autograd_logdet(block, x)
    assert float((logdet - reference).abs().max()) <= 1e-10
    # logdet_inv = -logdet at the corresponding point.
    _, logdet_inv = block.inverse(z)
    assert float((logdet_inv + logdet).detach().abs().max()) <= 1e-9


def test_exact_logdet_float32_within_1e_5():
    block, shape = _block("vector", torch.float32, logdet="exact")
    block.eval()
    x = torch.randn(6, *shape)
    with torch.no_grad():
        _, logdet = block(x)
    reference = autograd_logdet(copy.deepcopy(block).double(), x.double())
    assert float((logdet.double() - reference).abs().max()) <= 1e-5


def test_auto_logdet_is_exact_up_to_dimension_10_and_series_above():
    small = inn.ResidualBlock(mlp(10)).eval()
    small(torch.randn(2, 10))
    assert small.last_stats.logdet == ()  # exact: no series statistics
    large = inn.ResidualBlock(mlp(11)).eval()
    large(torch.randn(2, 11))
    (stats,) = large.last_stats.logdet
    assert stats.n_exact_terms == 20  # eval mode: the estimator's evaluation settings
    large.train()
    large(torch.randn(2, 11))
    assert large.last_stats.logdet[0].n_exact_terms == 2


def test_series_logdet_is_unbiased():
    # Many draws of the Russian-roulette estimate of one sample average to the exact value.
    block = inn.ResidualBlock(mlp(12, coeff=0.7).double(), logdet="series").eval()
    block.logdet_estimator.eval_exact_terms = 2  # the training setting, without its power step
    x = torch.randn(1, 12, dtype=torch.float64).expand(512, 12)
    with torch.no_grad():
        exact = float(impflow.logdet.exact_logdet(block.g, x[:1]))
        draws = torch.cat([block(x)[1] for _ in range(20)])
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(draws.numel()))
    assert abs(mean - exact) <= 4 * se + 1e-4, (mean, exact, se)
    assert se > 0  # the draws do vary: the test measures an average, not one number


def test_training_mode_runs_power_iteration_once_per_call():
    block = inn.ResidualBlock(mlp(3)).train()
    layer = block.g[0]
    with torch.no_grad():  # new weights: u and v are far from converged, every step moves them
        layer.weight.copy_(torch.randn_like(layer.weight))
    expected = copy.deepcopy(layer)
    expected.power_iteration(expected.n_power_iterations)
    z = block(torch.randn(4, 3))[0]
    assert torch.equal(layer.u, expected.u) and torch.equal(layer.v, expected.v)
    # The inverse refreshes once too, whatever the number of solver iterations.
    expected.power_iteration(expected.n_power_iterations)
    block.inverse(z.detach())
    assert torch.equal(layer.u, expected.u)


def test_inside_sequential_flow_and_flow():
    torch.manual_seed(0)
    blocks = [inn.ResidualBlock(mlp(2)), inn.ActNorm(2, data_init=False), inn.ResidualBlock(mlp(2))]
    flow = impflow.Flow(inn.SequentialFlow(*blocks), event_shape=(2,)).eval()
    x = torch.randn(6, 2)
    z, logdet = flow.transform(x)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(flow.log_prob(x), base + logdet, atol=1e-5)
    samples, log_prob = flow.sample_and_log_prob((5,))
    assert samples.shape == (5, 2) and bool(torch.isfinite(log_prob).all())
    assert torch.allclose(flow.log_prob(samples), log_prob, atol=1e-4)


def test_state_dict_round_trip():
    block = inn.ResidualBlock(mlp(3)).eval()
    other = inn.ResidualBlock(mlp(3)).eval()
    other.load_state_dict(block.state_dict())
    x = torch.randn(4, 3)
    assert torch.equal(block(x)[0], other(x)[0])


# --------------------------------------------------------------------------------------------
# Settings and bad input


def test_settings_are_checked_at_construction():
    with pytest.raises(TypeError, match="nn.Module"):
        inn.ResidualBlock(lambda x: x)
    with pytest.raises(ValueError, match="logdet must be"):
        inn.ResidualBlock(mlp(2), logdet="approximate")
    with pytest.raises(TypeError, match="unknown option"):
        inn.ResidualBlock(mlp(2), inverse_solver={"method": "broyden", "stop_mod": "rel"})
    with pytest.raises(TypeError, match="unknown option"):
        inn.ResidualBlock(mlp(2), inverse_solver={"warn": False})
    with pytest.raises(ValueError, match="max_iter"):
        inn.ResidualBlock(mlp(2), inverse_solver={"max_iter": 0})
    with pytest.raises(ValueError, match="tol"):
        inn.ResidualBlock(mlp(2), adjoint_solver={"tol": -1.0})
    with pytest.raises(ValueError, match="method must be one of"):
        inn.ResidualBlock(mlp(2), inverse_solver={"method": "exact"})  # adjoint only
    with pytest.raises(TypeError, match="unknown option"):
        inn.ResidualBlock(mlp(2), adjoint_solver={"method": "exact", "max_iter": 3})
    with pytest.raises(ValueError, match="on_failure"):
        inn.ResidualBlock(mlp(2), on_failure="ignore")
    with pytest.raises(TypeError, match="RouletteLogdet"):
        inn.ResidualBlock(mlp(2), logdet={"n_exact": 3})
    block = inn.ResidualBlock(mlp(2), inverse_solver={"method": "anderson", "tol": 1e-7})
    assert block.inverse_solver.method == "anderson" and block.inverse_solver.tol == 1e-7
    assert "anderson" in repr(block)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused_naming_the_argument(bad):
    block = inn.ResidualBlock(mlp(2))
    x = torch.randn(3, 2)
    x[1, 0] = bad
    with pytest.raises(ValueError, match=r"ResidualBlock.forward: x contains NaN or Inf"):
        block(x)
    with pytest.raises(ValueError, match=r"ResidualBlock.inverse: z contains NaN or Inf"):
        block.inverse(x)


def test_wrong_shapes_between_g_and_x():
    with pytest.raises(ValueError, match=r"g failed on x of shape \(3, 5\)"):
        inn.ResidualBlock(mlp(2))(torch.randn(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        inn.ResidualBlock(nn.Linear(2, 3))(torch.randn(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        inn.ResidualBlock(nn.Linear(2, 3)).inverse(torch.randn(3, 2))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        inn.ResidualBlock(mlp(2))(torch.randn(2))
    with pytest.raises(TypeError, match="floating-point"):
        inn.ResidualBlock(mlp(2))(torch.ones(3, 2, dtype=torch.long))


@pytest.mark.filterwarnings("ignore::impflow.nn.NonContractiveWarning")  # seen, also checked below
def test_non_contractive_g_warns_or_raises_never_silent():
    # σ > 1 set by hand: the exact log-det sees a Jacobian of norm >= 1 (or det <= 0).
    torch.manual_seed(3)
    x = torch.randn(16, 2)
    block = inn.ResidualBlock(break_lipschitz(mlp(2, coeff=0.9), scale=3.0), logdet="exact")
    block.eval()
    with pytest.raises((ValueError, inn.ImplicitSolveError), match="contractive"):
        block.on_failure = "raise"
        block(x)
    # Series: the growing products are detected.
    series = inn.ResidualBlock(block.g, logdet="series").eval()
    with pytest.raises(SeriesDivergenceError):
        series(torch.randn(4, 2))
    # Inverse by fixed-point iteration does not converge: an error or a warning with the
    # statistics, and the best (finite) iterate, never NaN.
    z = torch.randn(4, 2)
    inverse = inn.ResidualBlock(
        block.g, inverse_solver={"method": "fixed_point", "max_iter": 30}, on_failure="raise"
    ).eval()
    with pytest.raises(inn.ImplicitSolveError, match="did not converge") as info:
        inverse.inverse(z)
    assert info.value.stats.method == "fixed_point" and not info.value.stats.all_converged
    inverse.on_failure = "warn"
    with pytest.warns(SolverWarning, match="did not converge for"):
        try:
            x_rec, logdet_inv = inverse.inverse(z)
        except ValueError as err:  # the exact log-det at that point may find det <= 0
            assert "not contractive" in str(err)
        else:
            assert bool(torch.isfinite(x_rec).all() and torch.isfinite(logdet_inv).all())
    assert bool(torch.isfinite(inverse.last_stats.inverse.residual).all())


def test_non_contractive_jacobian_warns_with_the_largest_norm():
    # g(x) = 1.5 tanh(x): det(I + J) > 0 everywhere, but |g'| >= 1 near 0.
    class ScaledTanh(nn.Module):
        def forward(self, x):
            return 1.5 * torch.tanh(x)

    block = inn.ResidualBlock(ScaledTanh(), logdet="exact")
    with pytest.warns(inn.NonContractiveWarning, match="spectral norm >= 1"):
        z, logdet = block(0.1 * torch.randn(4, 2))
    assert bool(torch.isfinite(logdet).all())
