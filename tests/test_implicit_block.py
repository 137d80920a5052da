"""ImplicitBlock: forward and inverse solves, log-dets (exact against slogdet of an autograd
Jacobian, series unbiased), ``g_z ≡ 0`` equals ResidualBlock, power iteration once per call,
flows, statistics and bad input (DESIGN.md §1, §5)."""

import copy
import math

import pytest
import torch
from torch import nn

import impflow
import impflow.nn as inn
from impflow.logdet import exact_logdet
from impflow.solvers import SolverWarning

from block_testing import (
    Zero,
    break_lipschitz,
    implicit_residual,
    max_abs_per_sample,
    mlp,
    networks,
)
from flow_testing import autograd_logdet
from testing import DEVICES, DTYPES

# One intra-op thread: on a shared 2-core machine more threads only wait on each other.
pytestmark = pytest.mark.usefixtures("one_thread")


def _block(kind="vector", dtype=torch.float32, **kwargs):
    (g_x, g_z), shape = networks(kind, dtype)
    return inn.ImplicitBlock(g_x, g_z, **kwargs), shape


def test_keeps_its_networks_as_attributes():
    g_x, g_z = mlp(2), mlp(2)
    block = inn.ImplicitBlock(g_x, g_z)
    assert block.g_x is g_x and block.g_z is g_z
    names = {n.split(".")[0] for n, _ in block.named_parameters()}
    assert names == {"g_x", "g_z"}


@pytest.mark.parametrize("kind", ["vector", "image"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 7])
def test_inverse_of_forward_round_trips_with_small_residuals(kind, dtype, batch):
    block, shape = _block(kind, dtype)
    block.eval()
    x = torch.randn(batch, *shape, dtype=dtype)
    with torch.no_grad():
        z, logdet = block(x)
        x_rec, logdet_inv = block.inverse(z)
    assert z.shape == x.shape and z.dtype == dtype and logdet.shape == (batch,)
    assert float((x_rec - x).abs().max()) <= (1e-5 if dtype == torch.float32 else 1e-9)
    # Default tolerances: max|F| <= 1e-5 per sample after the forward and the inverse solve.
    assert float(max_abs_per_sample(implicit_residual(block, x, z)).max()) <= 1e-5
    assert float(max_abs_per_sample(implicit_residual(block, x_rec, z)).max()) <= 1e-5
    for stats in (block.last_stats.forward, block.last_stats.inverse):
        assert stats.all_converged and stats.method == "broyden"
        assert stats.residual.shape == (batch,) and int(stats.nstep.max()) < 100


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["vector", "image"])
def test_round_trip_and_gradients_on_each_device(device, kind):
    # The solvers' fused ops run on the device of the input; the gradient reaches every
    # parameter there, and matches the CPU's.
    block, shape = _block(kind, torch.float64, logdet="exact", forward_solver={"tol": 1e-12})
    block.eval()
    x = torch.randn(5, *shape, dtype=torch.float64)
    results = []
    for dev in ("cpu", device):
        moved = copy.deepcopy(block).to(dev)
        xd = x.to(dev).requires_grad_(True)
        z, logdet = moved(xd)
        x_rec, _ = moved.inverse(z.detach())
        assert float((x_rec - xd).detach().abs().max()) <= 1e-9
        grads = torch.autograd.grad((z**2).sum() - logdet.sum(), [xd, *moved.parameters()])
        results.append([t.detach().cpu() for t in (z, logdet, *grads)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_exact_logdet_matches_slogdet_of_autograd_jacobian(kind):
    block, shape = _block(kind, torch.float64, logdet="exact", forward_solver={"tol": 1e-13})
    block.eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = block(x)
    # The reference differentiates through the solve by autograd on the whole map x -> z:
    # its Jacobian is the implicit-function-theorem one only if the root is accurate.
    reference = autograd_logdet(_ImplicitMapByUnrolling(block), x)
    assert float((logdet - reference).abs().max()) <= 1e-9
    with torch.no_grad():
        _, logdet_inv = block.inverse(z)
    assert float((logdet_inv + logdet).abs().max()) <= 1e-9


class _ImplicitMapByUnrolling(nn.Module):
    """``x -> z`` by plain fixed-point iteration with autograd through every step (no adjoint,
    no estimator): an independent Jacobian, for the tests."""

    def __init__(self, block, steps=150):
        super().__init__()
        self.block = block
        self.steps = steps

    def forward(self, x):
        c = self.block.g_x(x) + x
        z = c.detach()
        for _ in range(self.steps):
            z = c - self.block.g_z(z)
        return z, None


def test_exact_logdet_float32_within_1e_5():
    block, shape = _block("vector", torch.float32, logdet="exact")
    block.eval()
    x = torch.randn(6, *shape)
    with torch.no_grad():
        _, logdet = block(x)
    reference = autograd_logdet(_ImplicitMapByUnrolling(copy.deepcopy(block).double()), x.double())
    assert float((logdet.double() - reference).abs().max()) <= 1e-5


def test_series_logdet_is_unbiased():
    block = inn.ImplicitBlock(
        mlp(12, coeff=0.7), mlp(12, coeff=0.7), logdet="series", forward_solver={"tol": 1e-12}
    )
    block = block.double().eval()
    block.logdet_estimator.eval_exact_terms = 2
    x = torch.randn(1, 12, dtype=torch.float64).expand(512, 12)
    with torch.no_grad():
        z, _ = block(x[:1])
        exact = float(exact_logdet(block.g_x, x[:1]) - exact_logdet(block.g_z, z))
        draws = torch.cat([block(x)[1] for _ in range(20)])
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(draws.numel()))
    assert abs(mean - exact) <= 4 * se + 1e-4, (mean, exact, se)
    assert se > 0
    assert len(block.last_stats.logdet) == 2  # one series estimate per network


# --------------------------------------------------------------------------------------------
# g_z ≡ 0 is a ResidualBlock


def test_zero_g_z_equals_residual_block_values_and_gradients():
    g = mlp(3).double().eval()
    implicit = inn.ImplicitBlock(g, Zero(), logdet="exact").eval()
    residual = inn.ResidualBlock(g, logdet="exact").eval()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = []
    for block in (implicit, residual):
        z, logdet = block(x)
        grads = torch.autograd.grad((z**3).sum() + logdet.sum(), [x, *g.parameters()])
        x_rec, logdet_inv = block.inverse(z.detach())
        out.append((z, logdet, x_rec, logdet_inv, *grads))
    for a, b in zip(*out):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert int(implicit.last_stats.forward.nstep.max()) == 0  # z0 = x + g_x(x) is the root


# --------------------------------------------------------------------------------------------
# Training mode: power iteration once per call


def test_power_iteration_runs_once_per_call_whatever_the_solver():
    # Two copies, one solved by Broyden, one by slow fixed-point iteration: the same buffers
    # afterwards (DDP replicas and a single process agree), equal to one refresh.
    torch.manual_seed(0)
    fast = inn.ImplicitBlock(mlp(3), mlp(3)).train()
    slow = copy.deepcopy(fast)
    slow.forward_solver = inn.ImplicitBlock(
        mlp(3), mlp(3), forward_solver={"method": "fixed_point", "max_iter": 400}
    ).forward_solver
    expected = copy.deepcopy(fast)
    for m in expected.modules():
        if isinstance(m, inn.SpectralLinear):
            m.power_iteration(m.n_power_iterations)
    x = torch.randn(4, 3)
    fast(x)
    slow(x)
    assert int(slow.last_stats.forward.nstep.max()) > int(fast.last_stats.forward.nstep.max())
    for a, b, c in zip(fast.buffers(), slow.buffers(), expected.buffers()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(m.training for m in fast.modules())  # modes are restored


# --------------------------------------------------------------------------------------------
# Inside flows


def test_inside_sequential_flow_and_flow_vectors():
    layers = [
        inn.ImplicitBlock(mlp(2), mlp(2)),
        inn.ActNorm(2, data_init=False),
        inn.ResidualBlock(mlp(2)),
        inn.ImplicitBlock(mlp(2), mlp(2)),
    ]
    flow = impflow.Flow(inn.SequentialFlow(*layers), event_shape=(2,)).eval()
    x = torch.randn(6, 2)
    with torch.no_grad():
        z, logdet = flow.transform(x)
        base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
        assert torch.allclose(flow.log_prob(x), base + logdet, atol=1e-5)
        samples, log_prob = flow.sample_and_log_prob((5,))
        assert samples.shape == (5, 2)
        assert torch.allclose(flow.log_prob(samples), log_prob, atol=1e-4)
    # Training: the loss reaches every parameter.
    flow.train()
    (-flow.log_prob(x).mean()).backward()
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


def test_inside_flow_images_and_differentiable_samples():
    (g_x, g_z), shape = networks("image", torch.float32)
    flow = impflow.Flow(inn.SequentialFlow(inn.ImplicitBlock(g_x, g_z)), event_shape=shape).eval()
    samples = flow.rsample((3,))  # through the inverse solve, with gradient
    assert samples.shape == (3, *shape) and samples.requires_grad
    samples.pow(2).sum().backward()
    assert flow.transform[0].last_stats.inverse_adjoint.all_converged
    assert all(p.grad is not None for p in flow.parameters())


def test_state_dict_round_trip():
    block = inn.ImplicitBlock(mlp(3), mlp(3)).eval()
    other = inn.ImplicitBlock(mlp(3), mlp(3)).eval()
    other.load_state_dict(block.state_dict())
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(block(x)[0], other(x)[0])


def test_other_solvers_and_estimators():
    x = torch.randn(4, 12)
    anderson = inn.ImplicitBlock(
        mlp(12),
        mlp(12),
        logdet=impflow.logdet.RouletteLogdet(n_exact_terms=4, eval_exact_terms=8),
        forward_solver={"method": "anderson", "max_iter": 60},
        inverse_solver={"method": "fixed_point", "max_iter": 300},
        adjoint_solver={"method": "fixed_point"},
    ).eval()
    with torch.no_grad():
        z, _ = anderson(x)
        x_rec, _ = anderson.inverse(z)
    assert anderson.last_stats.forward.method == "anderson"
    assert anderson.last_stats.inverse.method == "fixed_point"
    assert anderson.last_stats.logdet[0].n_exact_terms == 8
    assert float((x_rec - x).abs().max()) <= 1e-5


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused_naming_the_argument(bad):
    block = inn.ImplicitBlock(mlp(2), mlp(2))
    x = torch.randn(3, 2)
    x[2, 1] = bad
    with pytest.raises(
        ValueError, match=r"ImplicitBlock.forward: x contains NaN or Inf \(samples \[2\]"
    ):
        block(x)
    with pytest.raises(ValueError, match=r"ImplicitBlock.inverse: z contains NaN or Inf"):
        block.inverse(x)


def test_wrong_shapes_name_the_network():
    with pytest.raises(ValueError, match=r"g_x failed on x of shape \(3, 4\)"):
        inn.ImplicitBlock(mlp(2), mlp(2))(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"g_z failed on z of shape \(3, 4\)"):
        inn.ImplicitBlock(mlp(4), mlp(2))(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"g_z must map z to a tensor of the same shape"):
        inn.ImplicitBlock(mlp(2), nn.Linear(2, 3))(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"g_x failed on x"):
        inn.ImplicitBlock(mlp(2), mlp(2))(torch.randn(3, 2, dtype=torch.float64))  # dtypes
    with pytest.raises(TypeError, match="g_z must be an nn.Module"):
        inn.ImplicitBlock(mlp(2), None)
    with pytest.raises(TypeError, match="forward_solver must be None or a dict"):
        inn.ImplicitBlock(mlp(2), mlp(2), forward_solver="broyden")


def test_non_contractive_g_z_is_reported_never_silent_nan():
    # σ > 1 set by hand in g_z: fixed-point iteration for z diverges. Reported with the
    # statistics (warning or error), and the returned iterate is finite.
    torch.manual_seed(2)
    x = torch.randn(6, 2)
    g_z = break_lipschitz(mlp(2, coeff=0.9), scale=4.0)
    block = inn.ImplicitBlock(
        mlp(2),
        g_z,
        logdet="exact",
        forward_solver={"method": "fixed_point", "max_iter": 50},
        on_failure="raise",
    ).eval()
    with pytest.raises(inn.ImplicitSolveError, match="solve for z did not converge") as info:
        block(x)
    assert not info.value.stats.all_converged
    block.on_failure = "warn"
    with pytest.warns(SolverWarning, match="did not converge"):
        try:
            z, logdet = block(x)
        except ValueError as err:  # det(I + J_gz) <= 0 at the returned point
            assert "not contractive" in str(err)
        else:
            assert bool(torch.isfinite(z).all() and torch.isfinite(logdet).all())
    assert bool(torch.isfinite(block.last_stats.forward.residual).all())


def test_a_nonfinite_jacobian_is_a_nonfinite_error_not_a_contractivity_one():
    """Weights blown up to Inf made the exact log-det report "det(I + J) <= 0 ... not
    contractive", which the training loop could not tell from a real contractivity failure."""
    torch.manual_seed(0)
    g_x = mlp(2)
    block = inn.ImplicitBlock(g_x, mlp(2), logdet="exact").eval()
    with torch.no_grad():
        g_x[0].weight.fill_(float("inf"))
        g_x[0]._mark_vectors_current()  # keep σ = uᵀWv from stored vectors: Inf, not NaN
    from impflow.nn._flow_common import NonFiniteError

    with pytest.raises(NonFiniteError, match="Jacobian of g_x at x contains NaN or Inf"):
        block(torch.randn(3, 2))
