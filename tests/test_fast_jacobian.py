"""The forward-mode Jacobian of LipschitzMLP (impflow.logdet.mlp_jacobian) against autograd, the
Jacobian registry and its switch, the closed-form log det(I + J) and ‖J‖₂ check, and what the
blocks reuse from the exact log-det (issue 5 item 6)."""

import copy

import pytest
import torch
from torch import nn

import impflow.logdet as L
import impflow.nn as inn
from impflow.logdet import mlp_jacobian
from impflow.logdet.exact import logdet_identity_plus, spectral_norm_bound
from impflow.nn import LipschitzMLP, NonContractiveWarning, SpectralLinear
from impflow.nn._frozen import PausedPowerIteration, power_iteration_paused
from impflow.nn.activations import Sin
from testing import DEVICES, DTYPES, rel_error

ACTIVATIONS = ["sin", "lipswish", "elu", "softplus", "tanh", "identity"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
F64 = torch.float64


def err(out, ref):
    return rel_error(out.detach(), ref.detach())


def widths(d, n_layers):
    hidden = [7, 5, 9][: n_layers - 1]
    return [d, *hidden, d]


def make_mlp(dims, activation, dtype=F64, device="cpu", coeff=0.9):
    g = LipschitzMLP(dims, activation=activation, coeff=coeff).to(device, dtype)
    with torch.no_grad():  # biases spread the pre-activations over the activation's range
        for i, m in enumerate(g):
            if isinstance(m, SpectralLinear):
                m.bias.uniform_(-1, 1)
            if hasattr(m, "raw_beta"):
                m.raw_beta.fill_(0.3 + 0.4 * i)  # one β per layer, all different
    return g.eval()  # fixed power-iteration vectors: both paths see the same weights


def reference(g, x, **kw):
    """``(g(x), J)`` by autograd products (the switch forces them)."""
    with L.autograd_products():
        return L.value_and_jacobian(g, x, **kw)


def grads_of(fn, g, x, weights):
    """Gradients of ``Σ_b w_b fn(g, x)_b`` with respect to ``x`` and every parameter."""
    g.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    (fn(g, x) * weights).sum().backward()
    return [x.grad] + [p.grad for p in g.parameters()]


def set_unnormalised_weight(g, weight):
    """Gives the one-layer ``g`` the weight ``weight`` used as it is: ``u = v = e_last`` makes
    the stored estimate ``σ = W[-1, -1]`` (below ``coeff``), so no rescaling happens."""
    (layer,) = [m for m in g if isinstance(m, SpectralLinear)]
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
        e = torch.zeros(weight.shape[0], dtype=weight.dtype)
        e[-1] = 1
        layer.u.copy_(e)
        layer.v.copy_(e)
    return g.eval()


# ------------------------------------------------------------------ the Jacobian and g(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("batch", [1, 7])
def test_jacobian_and_value_match_autograd(batch, d, n_layers, activation, dtype, device):
    g = make_mlp(widths(d, n_layers), activation, dtype, device)
    x = (torch.randn(batch, d, dtype=F64) * 1.5).to(device, dtype)
    assert mlp_jacobian.supports_forward_jacobian(g, x)
    gx, jac = L.value_and_jacobian(g, x)
    gx_ref, jac_ref = reference(g, x)
    assert jac.shape == (batch, d, d) and jac.dtype == dtype and gx.shape == x.shape
    gx, jac, gx_ref, jac_ref = (t.detach() for t in (gx, jac, gx_ref, jac_ref))
    assert err(jac, jac_ref) <= TOL[dtype]
    assert err(gx, g(x).detach()) <= TOL[dtype] and err(gx, gx_ref) <= TOL[dtype]
    assert torch.equal(L.batch_jacobian(g, x), jac)


def test_registry_serves_lipschitz_mlp_and_paused_wrapper():
    g = make_mlp([2, 5, 2], "sin")
    assert L.get_jacobian(g) is mlp_jacobian.mlp_value_and_jacobian
    assert L.get_jacobian(nn.Linear(2, 2)) is L.autograd_jacobian
    # The blocks hand a PausedPowerIteration wrapper over: it delegates to the wrapped network.
    calls = []

    def spy(net, x, *, create_graph):
        calls.append(type(net))
        return mlp_jacobian.mlp_value_and_jacobian(net, x, create_graph=create_graph)

    remove = L.register_jacobian(LipschitzMLP, spy)
    try:
        x = torch.randn(3, 2, dtype=F64)
        L.exact_logdet(PausedPowerIteration(g), x)
        L.exact_logdet(g, x)
        assert calls == [LipschitzMLP, LipschitzMLP]
        with L.autograd_products():  # the switch: no registered implementation runs
            assert L.get_jacobian(g) is L.autograd_jacobian
            L.exact_logdet(PausedPowerIteration(g), x)
            L.exact_logdet(g, x)
        assert len(calls) == 2
    finally:
        remove()
    assert L.get_jacobian(g) is mlp_jacobian.mlp_value_and_jacobian
    with pytest.raises(TypeError, match="module_type must be a class"):
        L.register_jacobian("LipschitzMLP", spy)
    with pytest.raises(TypeError, match="fn must be callable"):
        L.register_jacobian(LipschitzMLP, None)


def test_a_registered_jacobian_of_the_wrong_shape_is_refused():
    # A (B, 2, 2) Jacobian for 3-dimensional samples gave a log-det of zeros, silently.
    g = make_mlp([3, 5, 3], "sin")

    def wrong(net, x, *, create_graph):
        return net(x), torch.zeros(x.shape[0], 2, 2, dtype=x.dtype)

    remove = L.register_jacobian(LipschitzMLP, wrong)
    try:
        with pytest.raises(ValueError, match=r"wrong for LipschitzMLP returned \(4, 2, 2\), "):
            L.exact_logdet(g, torch.randn(4, 3, dtype=F64))
    finally:
        remove()
    assert torch.isfinite(L.exact_logdet(g, torch.randn(4, 3, dtype=F64))).all()


def test_graph_only_when_asked():
    g = make_mlp([3, 6, 3], "tanh")
    x = torch.randn(4, 3, dtype=F64)
    gx, jac = L.value_and_jacobian(g, x)
    assert gx.requires_grad and jac.requires_grad  # parameters require grad
    gx, jac = L.value_and_jacobian(g, x, create_graph=False)
    assert not gx.requires_grad and not jac.requires_grad
    with torch.no_grad():
        gx, jac = L.value_and_jacobian(g, x)
    assert not gx.requires_grad and not jac.requires_grad
    assert err(jac, reference(g, x)[1].detach()) <= 1e-12


# ------------------------------------------------------------------ fallbacks


class ShiftedSin(Sin):
    """A subclass may change the forward: its derivative is not Sin's."""

    def forward(self, x):
        return super().forward(x + 0.1)


def test_unsupported_structures_fall_back_to_autograd():
    x = torch.randn(5, 3, dtype=F64)
    # Another module type.
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    assert err(L.batch_jacobian(seq, x), reference(seq, x)[1]) == 0
    # An activation subclass, per-sample shapes (B, n, d), forward hooks, another dtype.
    sub = LipschitzMLP([3, 6, 3], activation=ShiftedSin(), coeff=0.9).double().eval()
    shaped = make_mlp([3, 6, 3], "elu")
    hooked = make_mlp([3, 6, 3], "elu")
    hooked.register_forward_hook(lambda module, args, out: 0.5 * out)
    cases = [(sub, x), (shaped, x.reshape(5, 1, 3)), (hooked, x), (shaped, x.float())]
    for g, t in cases:
        assert not mlp_jacobian.supports_forward_jacobian(g, t)
    for g, t in cases[:3]:
        jac = L.batch_jacobian(g, t)
        assert err(jac, reference(g, t)[1]) == 0
    # The hook's factor is in the Jacobian (a fast path that ignored it would miss it).
    plain = copy.deepcopy(hooked)
    plain._forward_hooks.clear()
    assert err(L.batch_jacobian(hooked, x), 0.5 * L.batch_jacobian(plain, x)) <= 1e-12
    with pytest.raises(RuntimeError):  # float32 input, float64 weights: g itself refuses
        L.batch_jacobian(shaped, x.float())


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dims", [[1, 6, 1], [2, 7, 5, 2], [3, 4, 3], [5, 6, 4, 3, 5], [2, 2]])
def test_logdet_gradients_match_autograd(dims, activation):
    g = make_mlp(dims, activation, coeff=0.7)
    x = torch.randn(6, dims[0], dtype=F64)
    w = torch.linspace(-1, 2, 6, dtype=F64)

    def autograd_logdet(g, t):
        with L.autograd_products():
            return L.exact_logdet(g, t)

    fast = grads_of(L.exact_logdet, g, x, w)
    ref = grads_of(autograd_logdet, g, x, w)
    names = ["x"] + [n for n, _ in g.named_parameters()]
    for name, got, want in zip(names, fast, ref):
        if want is None:  # a bias that does not enter the Jacobian (the last; identity's)
            assert got is None or got.abs().max() == 0, name
            continue
        assert got is not None, name
        assert err(got, want) <= 1e-10, name
    # Every weight and LipSwish β reaches the log-det.
    reached = {n for n, got in zip(names, fast) if got is not None}
    assert {n for n in names if "weight" in n or "beta" in n} <= reached


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_logdet_and_value_gradcheck(d, activation):
    g = make_mlp([d, 4, 3, d], activation, coeff=0.8)

    class LogdetAndValue(nn.Module):  # functional_call swaps the parameters in g
        def __init__(self):
            super().__init__()
            self.g = g

        def forward(self, x):
            gx, jac = L.value_and_jacobian(self.g, x)
            logdet, _ = logdet_identity_plus(jac)
            return logdet + (gx * torch.linspace(0.5, 1.5, d, dtype=F64)).sum(1)

    module = LogdetAndValue()
    names = [n for n, _ in module.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    x = torch.randn(3, d, dtype=F64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


# ------------------------------------------------------------------ power iteration


def _count_power_iterations(g):
    counts = {}
    for name, m in g.named_modules():
        if isinstance(m, SpectralLinear):
            counts[name] = 0

            def counted(*args, _m=m, _name=name, _orig=m._iterate):
                counts[_name] += 1
                return _orig(*args)

            m._iterate = counted
    return counts


def test_training_mode_runs_the_forwards_power_iteration_once():
    g = make_mlp([3, 8, 8, 3], "lipswish").train()
    twin = copy.deepcopy(g)
    x = torch.randn(5, 3, dtype=F64)
    counts = _count_power_iterations(g)
    gx, jac = L.value_and_jacobian(g, x)
    assert set(counts.values()) == {1}  # once per layer, as one forward
    want = twin(x)  # one forward of the same network from the same state
    for a, b in zip(g.buffers(), twin.buffers()):
        assert torch.equal(a, b)
    assert err(gx, want) <= 1e-14
    assert err(jac, reference(twin.eval(), x)[1]) <= 1e-12  # the weights of that forward
    # Paused (as inside a block call): no iteration at all, buffers untouched.
    before = [b.clone() for b in g.buffers()]
    with power_iteration_paused(g):
        L.value_and_jacobian(g, x)
    L.value_and_jacobian(PausedPowerIteration(g), x)
    assert set(counts.values()) == {1}
    assert all(torch.equal(a, b) for a, b in zip(before, g.buffers()))
    assert g.training and all(m.training for m in g.modules())


@pytest.mark.parametrize("kind", ["implicit", "residual"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_blocks_run_power_iteration_once_per_call(direction, kind):
    nets = [make_mlp([2, 8, 2], "sin").train() for _ in range(2 if kind == "implicit" else 1)]
    if kind == "implicit":
        block = inn.ImplicitBlock(*nets, logdet="exact")
    else:
        block = inn.ResidualBlock(nets[0], logdet="exact")
    counts = [_count_power_iterations(g) for g in nets]
    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    out, logdet = getattr(block, direction)(x)
    (out.sum() + logdet.sum()).backward()
    assert all(set(c.values()) == {1} for c in counts)  # the refresh, nothing more


# ------------------------------------------------------------------ log det(I + J), ‖J‖₂


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_logdet_identity_plus_matches_slogdet(d):
    jac = (torch.randn(50, d, d, dtype=F64) * 0.4).requires_grad_(True)
    with torch.no_grad():
        jac[0] = -1.5 * torch.eye(d, dtype=F64)  # det(I + J) = (-0.5)^d
    logdet, positive = logdet_identity_plus(jac)
    sign, ref = torch.linalg.slogdet(torch.eye(d, dtype=F64) + jac)
    assert torch.equal(positive, sign > 0) and bool(positive[0]) == (d % 2 == 0)
    assert (logdet - ref)[positive].abs().max() <= 1e-12
    w = torch.randn(50, dtype=F64) * positive
    (got,) = torch.autograd.grad((logdet * w).sum(), jac)
    (want,) = torch.autograd.grad((ref * w).sum(), jac)
    assert err(got, want) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_spectral_norm_bound_decides_like_the_svd(d, dtype):
    jac = torch.randn(400, d, d, dtype=F64)
    jac *= torch.empty(400, 1, 1, dtype=F64).uniform_(0.3, 1.7) / torch.linalg.matrix_norm(
        jac, 2
    ).reshape(-1, 1, 1)
    if d > 1:  # ‖J‖_F ≥ 1 but ‖J‖₂ < 1: the SVD decides
        jac[0] = torch.diag(torch.tensor([0.8] * 2 + [0.0] * (d - 2), dtype=F64))
    jac = jac.to(dtype)
    bound = spectral_norm_bound(jac)
    exact = torch.linalg.matrix_norm(jac.double(), 2)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert torch.equal(bound < 1, exact < 1)
    assert (bound.double() >= exact - tol).all()
    large = exact >= 1
    assert large.any() and ((bound.double() - exact).abs() <= tol)[large].all()
    if d <= 2:  # closed form: exact everywhere
        assert err(bound, exact) <= tol
    assert not spectral_norm_bound(torch.full((1, d, d), float("nan"), dtype=dtype)) < 1


# ------------------------------------------------------------------ det ≤ 0 and ‖J‖ ≥ 1


@pytest.mark.parametrize("d", [2, 3])
def test_nonpositive_determinant_raises(d):
    g = set_unnormalised_weight(
        LipschitzMLP([d, d], activation="identity", coeff=0.9).double(),
        torch.diag(torch.tensor([-1.5] + [0.5] * (d - 1), dtype=F64)),
    )
    x = torch.randn(4, d, dtype=F64)
    with pytest.raises(ValueError, match="det"):
        L.exact_logdet(g, x)
    with pytest.raises(ValueError, match=r"det\(I \+ J\) <= 0 for g"):
        inn.ResidualBlock(g, logdet="exact")(x)


@pytest.mark.parametrize("d", [2, 3])
def test_non_contractive_jacobian_warns_or_raises(d):
    g = set_unnormalised_weight(
        LipschitzMLP([d, d], activation="identity", coeff=0.9).double(),
        torch.diag(torch.tensor([1.2] + [0.1] * (d - 1), dtype=F64)),
    )
    x = torch.randn(4, d, dtype=F64)
    with pytest.warns(NonContractiveWarning, match="spectral norm >= 1 at 4 of 4"):
        inn.ResidualBlock(g, logdet="exact")(x)
    with pytest.raises(inn.ImplicitSolveError, match="spectral norm >= 1"):
        inn.ResidualBlock(g, logdet="exact", on_failure="raise")(x)
    # ‖J‖_F = 1.13 but ‖J‖₂ = 0.8: no warning (an error here would fail the test).
    fine = set_unnormalised_weight(
        LipschitzMLP([d, d], activation="identity", coeff=0.9).double(),
        torch.diag(torch.tensor([0.8, 0.8] + [0.0] * (d - 2), dtype=F64)),
    )
    inn.ResidualBlock(fine, logdet="exact", on_failure="raise")(x)


# ------------------------------------------------------------------ what the blocks reuse


def _block_grads(block, direction, x):
    for p in block.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    out, logdet = getattr(block, direction)(x)
    loss = (out**2).sum() * 0.3 + (logdet * torch.linspace(-1, 1, x.shape[0], dtype=F64)).sum()
    loss.backward()
    return out.detach(), logdet.detach(), [x.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("activation", ["sin", "lipswish"])
@pytest.mark.parametrize("kind", ["implicit", "residual"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_block_gradients_match_autograd_jacobian_and_iterative_adjoint(direction, kind, activation):
    nets = [make_mlp([2, 9, 7, 2], activation) for _ in range(2)]
    tight = {"tol": 1e-13, "max_iter": 200}
    # The reference shares nothing between the log-det and the solves: a custom estimator (the
    # same exact log-det, through autograd products) gives the block neither g(u) nor J, and
    # the adjoint is iterative, on vector-Jacobian products.
    ref_options = {
        "logdet": lambda g, t: L.exact_logdet(g, t),
        "adjoint_solver": {"method": "broyden", **tight},
        "inverse_solver": tight,
    }

    def build(logdet="exact", **options):
        if kind == "implicit":
            return inn.ImplicitBlock(*nets, logdet=logdet, forward_solver=tight, **options)
        return inn.ResidualBlock(nets[0], logdet=logdet, **options)

    x = torch.randn(9, 2, dtype=F64)
    block = build(inverse_solver=tight)
    out, logdet, grads = _block_grads(block, direction, x)
    adjoint = "adjoint" if direction == "forward" else "inverse_adjoint"
    stats = getattr(block.last_stats, adjoint)
    if stats is not None:  # the exact adjoint took J from the log-det term: no products
        assert stats.method == "exact" and stats.n_fn_evals == 0 and stats.all_converged
    ref_block = build(**ref_options)
    with L.autograd_products():
        ref_out, ref_logdet, ref_grads = _block_grads(ref_block, direction, x)
    assert err(out, ref_out) <= 1e-11 and err(logdet, ref_logdet) <= 1e-11
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert err(got, want) <= 1e-9


def test_residual_forward_takes_g_x_from_the_logdet_pass():
    g = make_mlp([3, 8, 3], "softplus")
    x = torch.randn(5, 3, dtype=F64)
    z, _ = inn.ResidualBlock(g, logdet="exact")(x)
    assert err(z, x + g(x)) <= 1e-15
