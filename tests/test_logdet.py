"""Tests of the log-determinant estimators (impflow.logdet, DESIGN.md §1, issue 4)."""

import math
import warnings

import pytest
import torch
from torch import nn

import impflow.logdet as L
from impflow.logdet import roulette as roulette_mod
from testing import TanhMLP, scaled_to_norm

DT = torch.float64
DIMS = [1, 2, 5, 16]


class Linear(nn.Module):
    """g(x) = x Wᵀ with ‖W‖₂ = lip."""

    def __init__(self, d, lip=0.5):
        super().__init__()
        self.weight = nn.Parameter(scaled_to_norm(torch.randn(d, d, dtype=DT), lip))

    def forward(self, x):
        return x @ self.weight.T


class MLP(TanhMLP):
    """tanh MLP with weights scaled once so that Lip(g) ≤ lip (product of spectral norms)."""

    def __init__(self, d, hidden=8, lip=0.5):
        super().__init__(d, hidden, lip)


def _independent_exact(g, x):
    """slogdet of per-sample Jacobians from torch.autograd.functional.jacobian."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda t: g(t[None])[0], xi)
        jac = jac.reshape(xi.numel(), xi.numel())
        sign, val = torch.linalg.slogdet(torch.eye(xi.numel(), dtype=x.dtype) + jac)
        assert sign > 0
        out.append(val)
    return torch.stack(out)


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_exact_matches_independent_jacobian(d, kind):
    g = Linear(d, 0.9) if kind == "linear" else MLP(d, lip=0.9)
    x = torch.randn(4, d, dtype=DT)
    out = L.exact_logdet(g, x)
    assert out.shape == (4,)
    assert (out - _independent_exact(g, x)).abs().max() <= 1e-10


def test_exact_linear_closed_form_and_shaped_input():
    g = Linear(6, 0.8)
    ref = torch.linalg.slogdet(torch.eye(6, dtype=DT) + g.weight.detach())[1]
    x = torch.randn(3, 6, dtype=DT)
    assert torch.allclose(L.exact_logdet(g, x), ref.expand(3), atol=1e-12, rtol=0)

    # (B, 2, 3) samples: the per-sample Jacobian is over the 6 flattened entries.
    def h(t):
        return g(t.reshape(3, 6)).reshape(3, 2, 3)

    assert torch.allclose(L.exact_logdet(h, x.reshape(3, 2, 3)), ref.expand(3), atol=1e-12, rtol=0)


def test_exact_gradcheck_x_and_parameters():
    g = MLP(3, hidden=5, lip=0.7)
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    params = dict(g.named_parameters())
    names = list(params)

    def fn(x, *ps):
        return L.exact_logdet(
            lambda t: torch.func.functional_call(g, dict(zip(names, ps)), (t,)), x
        )

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in params.values()])
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_exact_gradients_reach_parameters_and_no_grad_mode():
    g = MLP(2)
    x = torch.randn(4, 2, dtype=DT, requires_grad=True)
    L.exact_logdet(g, x).sum().backward()
    # The output bias does not enter the Jacobian; every other parameter does.
    assert x.grad is not None and g.l2.bias.grad is None
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in g.named_parameters()
        if n != "l2.bias"
    )
    with torch.no_grad():
        out = L.exact_logdet(g, x)
    assert not out.requires_grad


def test_exact_refuses_large_dimension():
    x = torch.randn(2, 65, dtype=DT)
    with pytest.raises(ValueError, match="max_dim"):
        L.exact_logdet(lambda t: 0.1 * t, x)
    assert torch.allclose(
        L.exact_logdet(lambda t: 0.1 * t, x, max_dim=65),
        torch.full((2,), 65 * math.log(1.1), dtype=DT),
    )
    with pytest.raises(ValueError, match="max_dim"):
        L.exact_logdet(lambda t: 0.1 * t, torch.randn(2, 3), max_dim=0)


def test_exact_rejects_nonpositive_determinant():
    with pytest.raises(ValueError, match="det"):
        L.exact_logdet(lambda t: -2.0 * t, torch.randn(2, 3, dtype=DT))


# ----------------------------------------------------------------------------- power series


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_power_series_converges(d, kind):
    g = Linear(d, 0.5) if kind == "linear" else MLP(d, lip=0.5)
    x = torch.randn(4, d, dtype=DT)
    exact = L.exact_logdet(g, x)
    errors = [
        (L.power_series_logdet(g, x, n) - exact).abs().max().item() for n in (1, 5, 10, 20, 40)
    ]
    # Strictly decreasing until float64 rounding (1e-13) is reached.
    assert errors[0] > 1e-4
    assert all(a > b or b < 1e-13 for a, b in zip(errors, errors[1:])), errors
    assert (L.power_series_logdet(g, x, 60) - exact).abs().max() <= 1e-8
    assert torch.equal(L.power_series_logdet(g, x, 0), torch.zeros(4, dtype=DT))


def test_power_series_diverging_is_reported():
    def g(t):
        return 1.5 * t

    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(L.SeriesDivergenceError):
        L.power_series_logdet(g, x, 10)
    with pytest.warns(L.SeriesDivergenceWarning):
        L.power_series_logdet(g, x, 10, on_divergence="warn")


# ----------------------------------------------------------------------------- roulette


def _draws(g, x, n_calls, n_rep, **kw):
    """(n_calls, B) i.i.d. unbiased estimates: each call averages n_rep replicas per sample
    (independent probes, shared N, so calls, not replicas, are the independent draws)."""
    b = x.shape[0]
    xr = x.repeat(n_rep, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        return torch.stack(
            [L.roulette_logdet(g, xr, **kw).reshape(n_rep, b).mean(0) for _ in range(n_calls)]
        )


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
@pytest.mark.parametrize(
    "dist", [{"distribution": "geometric", "p": 0.5}, {"distribution": "poisson", "lam": 2.0}]
)
@pytest.mark.parametrize("d", DIMS)
def test_roulette_unbiased(d, dist, probe):
    g = MLP(d, lip=0.5)
    x = torch.randn(3, d, dtype=DT)
    exact = L.exact_logdet(g, x).detach()
    draws = _draws(g, x, 600, 16, n_exact_terms=1, probe=probe, **dist)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert (se > 0).all()
    assert ((mean - exact).abs() <= 4 * se).all(), (mean, exact, se)
    # The check has power: error bars well below the log-determinants' scale (~0.1-1).
    assert (se < 0.02).all(), se


def test_roulette_bias_is_detected_without_reweighting(monkeypatch):
    """The unbiasedness check can fail: plain truncation (all c_k = 1) is biased."""
    g = MLP(5, lip=0.8)
    x = torch.randn(3, 5, dtype=DT)
    exact = L.exact_logdet(g, x).detach()
    monkeypatch.setattr(roulette_mod, "tail_probability", lambda *a, **k: 1.0)
    draws = _draws(g, x, 300, 16, n_exact_terms=0, distribution="geometric", p=0.5)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() > 4 * se).any()


def _grad_vector(est_fn, g, x):
    xg = x.clone().requires_grad_(True)
    params = list(g.parameters())
    grads = torch.autograd.grad(est_fn(g, xg).sum(), [xg, *params], materialize_grads=True)
    return torch.cat([t.flatten() for t in grads])


@pytest.mark.parametrize("neumann", [False, True])
@pytest.mark.parametrize(
    "dist", [{"distribution": "geometric", "p": 0.5}, {"distribution": "poisson", "lam": 2.0}]
)
@pytest.mark.parametrize("d", [2, 5])
def test_roulette_gradients_unbiased(d, neumann, dist):
    g = MLP(d, hidden=4, lip=0.5)
    x = torch.randn(2, d, dtype=DT)
    exact = _grad_vector(lambda g, t: L.exact_logdet(g, t), g, x)
    n_rep = 16
    xr = x.repeat(n_rep, 1)
    draws = []
    for _ in range(500):
        v = _grad_vector(
            lambda g, t: L.roulette_logdet(g, t, n_exact_terms=1, neumann_grad=neumann, **dist),
            g,
            xr,
        )
        nx = xr.numel()
        # x's gradient: average the replicas of each sample; parameters': average the sum.
        gx = v[:nx].reshape(n_rep, -1).mean(0)
        draws.append(torch.cat([gx, v[nx:] / n_rep]))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() <= 4 * se + 1e-12).all(), (mean - exact) / se
    assert (se < 0.1 * exact.abs().max()).all()


def test_neumann_value_equals_basic_estimate():
    g = MLP(5, lip=0.6)
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    for dist in ("geometric", "poisson"):
        kw = {"distribution": dist, "n_exact_terms": 2, "n_samples": 2, "probe": "gaussian"}
        a = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(3), **kw)
        b = L.roulette_logdet(
            g, x, neumann_grad=True, generator=torch.Generator().manual_seed(3), **kw
        )
        assert b.requires_grad
        assert torch.allclose(a, b, atol=1e-13, rtol=0)


def _saved_tensor_count(fn):
    count = [0]

    def pack(t):
        count[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count[0]


def test_neumann_memory_does_not_grow_with_terms():
    g = MLP(4, lip=0.5)
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)

    def saved(n, neumann):
        return _saved_tensor_count(
            lambda: L.roulette_logdet(
                g,
                x,
                n_exact_terms=n,
                neumann_grad=neumann,
                generator=torch.Generator().manual_seed(0),
            )
        )

    assert saved(30, True) == saved(5, True)
    assert saved(30, False) > saved(5, False)


# ----------------------------------------------------------------------------- module, stats


def test_roulette_module_stats_and_train_eval():
    g = MLP(3, lip=0.5)
    x = torch.randn(8, 3, dtype=DT)
    est = L.RouletteLogdet(n_exact_terms=2, eval_exact_terms=20, distribution="poisson")
    assert est.last_stats is None
    out = est(g, x)
    s = est.last_stats
    assert out.shape == (8,) and out.requires_grad
    assert s.n_terms == 2 + s.n_extra and s.n_exact_terms == 2 and len(s.term_means) == s.n_terms
    assert s.mean == pytest.approx(out.mean().item())
    assert s.second_moment == pytest.approx((out**2).mean().item())
    assert s.variance == pytest.approx(out.var(unbiased=False).item())
    assert 0 < s.growth < 0.5 + 1e-9
    est.eval()
    with torch.no_grad():
        out = est(g, x)
    assert not out.requires_grad and est.last_stats.n_exact_terms == 20
    # 20 exact terms at Lip 0.5: nearly the exact value for the Hutchinson average.
    assert "poisson" in repr(est)


def test_generator_makes_draws_reproducible():
    g = MLP(3)
    x = torch.randn(4, 3, dtype=DT)
    a = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(7))
    b = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_tail_probabilities():
    assert L.tail_probability(0, "geometric", p=0.3) == 1.0
    assert L.tail_probability(3, "geometric", p=0.3) == pytest.approx(0.7**2)
    lam = 2.0
    ref = 1 - sum(math.exp(-lam) * lam**i / math.factorial(i) for i in range(4))
    assert L.tail_probability(4, "poisson", lam=lam) == pytest.approx(ref, rel=1e-12)
    assert L.tail_probability(1, "poisson", lam=lam) == pytest.approx(1 - math.exp(-lam))


def test_hook_on_input_does_not_fire_inside_estimators():
    """DESIGN.md §7: derivatives are taken on a private node, not on a hooked input."""
    g = MLP(3)
    calls = []
    leaf = torch.randn(2, 3, dtype=DT, requires_grad=True)
    for fn in (
        L.exact_logdet,
        lambda g, x: L.power_series_logdet(g, x, 3),
        L.roulette_logdet,
        lambda g, x: L.roulette_logdet(g, x, neumann_grad=True),
    ):
        calls.clear()
        x = leaf * 1.0
        x.register_hook(lambda grad: calls.append(1))
        out = fn(g, x)
        assert calls == []
        out.sum().backward()
        assert calls == [1]


def test_products_come_from_the_swappable_function():
    class Tagged(MLP):
        pass

    g = Tagged(3)
    x = torch.randn(2, 3, dtype=DT)
    used = []

    def counting(g, x, gx, v, n, *, create_graph):
        used.append(n)
        return L.autograd_vjp_powers(g, x, gx, v, n, create_graph=create_graph)

    remove = L.register_vjp_powers(Tagged, counting)
    try:
        assert L.get_vjp_powers(g) is counting
        assert L.get_vjp_powers(MLP(3)) is L.autograd_vjp_powers
        s = L.roulette_logdet(g, x, neumann_grad=True, return_stats=True)[1]
        assert used == [s.n_terms, 1]
    finally:
        remove()
    assert L.get_vjp_powers(g) is L.autograd_vjp_powers


def test_float32_lipschitz_mlp():
    from impflow.nn import LipschitzMLP, update_lipschitz

    g = LipschitzMLP([4, 32, 4], activation="tanh", coeff=0.7)
    update_lipschitz(g, n_iterations=50)
    g.eval()
    x = torch.randn(5, 4)
    exact = L.exact_logdet(g, x)
    with torch.no_grad():
        series = L.roulette_logdet(g, x.repeat(2000, 1), n_exact_terms=30, n_samples=1)
    assert exact.dtype == torch.float32
    approx = series.reshape(2000, 5).mean(0)
    se = series.reshape(2000, 5).std(0) / math.sqrt(2000)
    assert ((approx - exact).abs() <= 4 * se + 1e-5).all()


# ----------------------------------------------------------------------------- bad input


ALL = [L.exact_logdet, lambda g, x, **k: L.power_series_logdet(g, x, 3, **k), L.roulette_logdet]


@pytest.mark.parametrize("fn", ALL)
def test_non_square_g_is_refused(fn):
    x = torch.randn(3, 4, dtype=DT)
    with pytest.raises(ValueError, match="same shape"):
        fn(lambda t: t[:, :2], x)
    with pytest.raises(ValueError, match="at least one per-sample"):
        fn(lambda t: t, torch.randn(3, dtype=DT))
    with pytest.raises(ValueError, match="floating"):
        fn(lambda t: t, torch.ones(3, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "kw",
    [
        {"p": 0.0},
        {"p": 1.0},
        {"p": -0.2},
        {"p": 1.5},
        {"p": float("nan")},
        {"p": True},
        {"lam": 0.0},
        {"lam": -1.0},
        {"lam": float("inf")},
        {"n_exact_terms": -1},
        {"n_exact_terms": 1.5},
        {"n_samples": 0},
        {"probe": "uniform"},
        {"distribution": "binomial"},
        {"on_divergence": "ignore"},
    ],
)
def test_bad_arguments_are_refused(kw):
    g = MLP(2)
    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError):
        L.roulette_logdet(g, x, **kw)
    init_kw = {k: v for k, v in kw.items()}
    with pytest.raises(ValueError):
        L.RouletteLogdet(**init_kw)


def test_bad_term_counts_and_unknown_keywords():
    g = MLP(2)
    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="n_terms"):
        L.power_series_logdet(g, x, -1)
    with pytest.raises(ValueError, match="eval_exact_terms"):
        L.RouletteLogdet(eval_exact_terms=-3)
    with pytest.raises(TypeError):
        L.roulette_logdet(g, x, n_power_series=5)


@pytest.mark.parametrize("scale", [1.5, 3.0])
def test_diverging_series_is_reported(scale):
    g = Linear(4, scale)
    x = torch.randn(3, 4, dtype=DT)
    with pytest.raises(L.SeriesDivergenceError, match="Lip"):
        L.roulette_logdet(g, x, n_exact_terms=10)
    with pytest.warns(L.SeriesDivergenceWarning):
        L.roulette_logdet(g, x, n_exact_terms=10, on_divergence="warn")
    est = L.RouletteLogdet(n_exact_terms=10)
    with pytest.raises(L.SeriesDivergenceError):
        est(g, x)


def test_contractive_g_never_warns():
    g = MLP(16, lip=0.95)
    x = torch.randn(8, 16, dtype=DT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            L.roulette_logdet(g, x, n_exact_terms=5, on_divergence="warn")
