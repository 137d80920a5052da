"""Tests of backward-in-forward (impflow.logdet.backward_in_forward, DESIGN.md §7, issue 4):
its gradients equal those of the graph-carrying Neumann estimator for any loss."""

import weakref

import pytest
import torch
from torch import nn

import impflow.logdet as L
from impflow.nn import LipschitzConvNet, LipschitzMLP
from testing import DEVICES, TanhMLP

DT = torch.float64


class MLP(TanhMLP):
    """tanh MLP with Lip ≤ lip; every parameter but the output bias enters the Jacobian."""

    def __init__(self, d, hidden=6, lip=0.6):
        super().__init__(d, hidden, lip)


class DropoutMLP(MLP):
    """Random in training mode: the recomputation must replay the forward's mask."""

    def __init__(self, d):
        super().__init__(d, hidden=8, lip=0.4)
        self.drop = nn.Dropout(0.25)

    def forward(self, x):
        return self.l2(self.drop(torch.tanh(self.l1(x))))


class Elementwise(nn.Module):
    """``g(x) = a ⊙ tanh(b ⊙ x + c)``: a diagonal Jacobian, on which a Rademacher probe gives
    exact traces; with many exact terms the estimator is then deterministic and exact, and its
    Neumann gradient is the true gradient of its value (so ``gradcheck`` applies)."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Parameter(0.5 * torch.rand(d, dtype=DT) + 0.2)
        self.b = nn.Parameter(torch.rand(d, dtype=DT) * 2 - 1)
        self.c = nn.Parameter(torch.randn(d, dtype=DT))

    def forward(self, x):
        return self.a * torch.tanh(self.b * x + self.c)


def _lipschitz_mlp():
    g = LipschitzMLP([4, 12, 12, 4], activation="lipswish", coeff=0.8, n_power_iterations=1)
    return g.double().train()


def _fresh_convnet():
    # Fresh: its power-iteration vectors are created (from the random state) at the first
    # forward, so the recomputation must replay that too.
    g = LipschitzConvNet(2, 4, kernel_sizes=(3, 1), coeff=0.8, n_power_iterations=1)
    return g.double().train()


MODELS = {
    "mlp": (lambda: MLP(4), (5, 4)),
    "lipschitz_mlp": (_lipschitz_mlp, (5, 4)),
    "dropout": (lambda: DropoutMLP(4), (5, 4)),
    "lipschitz_convnet": (_fresh_convnet, (3, 2, 5, 5)),
}


def _estimate(g, x, bif, seed=5, **kw):
    kw = {"n_exact_terms": 3, "n_samples": 2, **kw}
    return L.roulette_logdet(
        g,
        x,
        neumann_grad=True,
        backward_in_forward=bif,
        generator=torch.Generator(device=x.device).manual_seed(seed),
        **kw,
    )


def _loss_sum(ld, x, g):
    return ld.sum()


def _loss_mean(ld, x, g):
    return ld.mean()


def _loss_weighted(ld, x, g):
    c = torch.linspace(-1.0, 2.0, ld.shape[0], dtype=ld.dtype, device=ld.device)
    return (c * ld).sum()


def _loss_square(ld, x, g):
    return (ld**2).sum()


def _loss_mixed(ld, x, g):
    # The log-det next to other terms depending on x and on g's parameters (a flow's NLL-like
    # loss with a per-sample weight).
    z = x + g(x)
    return (z**2).sum() + (ld * z.flatten(1)[:, 0]).sum() - ld.mean()


LOSSES = [_loss_sum, _loss_mean, _loss_weighted, _loss_square, _loss_mixed]


def _gradients(g, x0, bif, loss_fn, **kw):
    """Value, and gradients of the loss with respect to x and every parameter (None if none)."""
    state = {k: v.clone() for k, v in g.state_dict().items()}
    g.load_state_dict(state)  # same buffers and random state for every call being compared
    torch.manual_seed(11)
    x = x0.clone().requires_grad_(True)
    ld = _estimate(g, x, bif, **kw)
    grads = torch.autograd.grad(loss_fn(ld, x, g), [x, *g.parameters()], allow_unused=True)
    g.load_state_dict(state)
    return ld.detach(), grads


def _assert_same(grads_a, grads_b, atol=1e-12):
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=atol, rtol=1e-10), (a - b).abs().max()


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: f.__name__[6:])
@pytest.mark.parametrize("model", list(MODELS))
def test_gradients_equal_plain_neumann(loss_fn, model):
    make, shape = MODELS[model]
    g = make()
    x0 = torch.randn(*shape, dtype=DT)
    value_plain, plain = _gradients(g, x0, False, loss_fn)
    value_bif, bif = _gradients(g, x0, True, loss_fn)
    assert torch.equal(value_plain, value_bif)
    # Every parameter but the output bias (last; it does not enter the Jacobian) has a gradient.
    assert all(t is not None for t in plain[:-1])
    _assert_same(plain, bif)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputation_replays_dropout_on_device(device):
    """The random state replayed is that of x's device (CUDA has its own generator)."""
    g = DropoutMLP(4).to(device)
    x0 = torch.randn(5, 4, dtype=DT, device=device)
    value_plain, plain = _gradients(g, x0, False, _loss_weighted)
    value_bif, bif = _gradients(g, x0, True, _loss_weighted)
    assert torch.equal(value_plain, value_bif)
    _assert_same(plain, bif)


def test_first_sample_scaling_would_be_wrong():
    """The case ResFlow gets wrong: Σ_b c_b ∂ℓ_b/∂θ ≠ c_0 Σ_b ∂ℓ_b/∂θ when the c_b differ."""
    g = MLP(4)
    x0 = torch.randn(6, 4, dtype=DT)
    _, weighted = _gradients(g, x0, True, _loss_weighted)
    _, summed = _gradients(g, x0, True, _loss_sum)
    c0 = float(torch.linspace(-1.0, 2.0, 6, dtype=DT)[0])
    naive = [c0 * s for s in summed[1:] if s is not None]
    right = [w for w in weighted[1:] if w is not None]
    rel = max(float((n - r).norm() / r.norm()) for n, r in zip(naive, right))
    assert rel > 0.5, rel
    _assert_same(weighted, _gradients(g, x0, False, _loss_weighted)[1])


def test_state_of_g_between_forward_and_backward_does_not_matter():
    """Other forwards of g (a solver's evaluations) advance its power-iteration vectors and the
    random state before the backward pass; the recomputation still replays the forward."""
    g = _lipschitz_mlp()
    g.append(nn.Dropout(0.1))
    x0 = torch.randn(5, 4, dtype=DT)
    _, plain = _gradients(g, x0, False, _loss_square)
    state = {k: v.clone() for k, v in g.state_dict().items()}
    torch.manual_seed(11)
    x = x0.clone().requires_grad_(True)
    ld = _estimate(g, x, True)
    after_forward = {k: v.clone() for k, v in g.state_dict().items()}
    g(torch.randn(3, 4, dtype=DT))  # moves u, v and the random state
    moved = {k: v.clone() for k, v in g.state_dict().items()}
    assert any(not torch.equal(moved[k], after_forward[k]) for k in moved)
    rng = torch.get_rng_state()
    grads = torch.autograd.grad(_loss_square(ld, x, g), [x, *g.parameters()], allow_unused=True)
    _assert_same(plain, grads)
    # The recomputation left the live buffers and random state alone.
    assert all(torch.equal(v, moved[k]) for k, v in g.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    g.load_state_dict(state)


@pytest.mark.parametrize("loss_fn", [_loss_sum, _loss_weighted], ids=["stored", "recomputed"])
def test_repeated_backward_gives_the_same_gradients(loss_fn):
    g = MLP(3)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    loss = loss_fn(_estimate(g, x, True), x, g)
    first = torch.autograd.grad(loss, [x, *g.parameters()], retain_graph=True, allow_unused=True)
    second = torch.autograd.grad(loss, [x, *g.parameters()], allow_unused=True)
    _assert_same(first, second, atol=0)


def test_parameter_free_callable_and_x_without_grad():
    x0 = torch.randn(4, 3, dtype=DT)

    def h(t):
        return 0.5 * torch.sin(t)

    for loss_fn in (_loss_sum, _loss_square):
        xs = [x0.clone().requires_grad_(True) for _ in range(2)]
        grads = [
            torch.autograd.grad(loss_fn(_estimate(h, x, bif), x, h), x)[0]
            for x, bif in zip(xs, (False, True))
        ]
        _assert_same(grads[:1], grads[1:])
    # x without grad: only the parameters get a gradient.
    g = MLP(3)
    plain, bif = (
        torch.autograd.grad(_loss_weighted(_estimate(g, x0, b), x0, g), list(g.parameters())[:3])
        for b in (False, True)
    )
    _assert_same(plain, bif)


def test_swappable_products_are_used_in_forward_and_recomputation():
    class Tagged(MLP):
        pass

    g = Tagged(3)
    used = []

    def counting(g, x, gx, v, n, *, create_graph):
        used.append((n, create_graph))
        return L.autograd_vjp_powers(g, x, gx, v, n, create_graph=create_graph)

    remove = L.register_vjp_powers(Tagged, counting)
    try:
        x = torch.randn(3, 3, dtype=DT, requires_grad=True)
        ld, stats = _estimate(g, x, True, n_samples=1, return_stats=True)
        assert used == [(stats.n_terms, False), (1, True)]
        _loss_square(ld, x, g).backward()
        assert used[2:] == [(1, True)]
    finally:
        remove()


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("batch", [1, 3])
def test_gradcheck_deterministic_estimator(batch):
    g = Elementwise(3)
    x = torch.randn(batch, 3, dtype=DT, requires_grad=True)

    def fn(x, *params):  # params are g's own tensors: gradcheck perturbs them in place
        return _estimate(g, x, True, n_exact_terms=60, n_samples=1)

    # In this regime the estimate is the exact log-det, so the check compares real gradients.
    assert torch.allclose(fn(x).detach(), L.exact_logdet(g, x).detach(), atol=1e-14, rtol=0)
    assert torch.autograd.gradcheck(fn, (x, *g.parameters()))


# ----------------------------------------------------------------------------- autograd plumbing


@pytest.mark.parametrize("loss_fn", [_loss_mean, _loss_weighted], ids=["stored", "recomputed"])
def test_parameters_get_grad_through_backward_and_autograd_grad(loss_fn):
    g = MLP(3)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    params = list(g.parameters())
    by_grad = torch.autograd.grad(loss_fn(_estimate(g, x, True), x, g), params, allow_unused=True)
    assert all(p.grad is None for p in params)  # autograd.grad does not accumulate
    loss_fn(_estimate(g, x, True), x, g).backward()
    for (name, p), ref in zip(g.named_parameters(), by_grad):
        if name == "l2.bias":  # does not enter the Jacobian: no gradient, as without bif
            assert p.grad is None and ref is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0
            assert torch.allclose(p.grad, ref, atol=1e-14, rtol=0)


@pytest.mark.parametrize("loss_fn", [_loss_mean, _loss_weighted], ids=["stored", "recomputed"])
def test_hooks_fire_once_in_backward_only(loss_fn):
    g = MLP(3)
    leaf = torch.randn(4, 3, dtype=DT, requires_grad=True)
    x = leaf * 1.0
    seen = {"x": [], "weight": [], "accumulated": []}
    x.register_hook(lambda grad: seen["x"].append(grad.clone()))
    g.l1.weight.register_hook(lambda grad: seen["weight"].append(grad.clone()))
    g.l1.weight.register_post_accumulate_grad_hook(lambda p: seen["accumulated"].append(1))
    loss = loss_fn(_estimate(g, x, True), x, g)
    assert seen == {"x": [], "weight": [], "accumulated": []}
    loss.backward()
    assert len(seen["x"]) == 1 and len(seen["weight"]) == 1 and seen["accumulated"] == [1]
    assert torch.equal(seen["weight"][0], g.l1.weight.grad)
    assert torch.equal(seen["x"][0], leaf.grad)  # x = leaf * 1


def test_double_backward_is_refused():
    g = MLP(3)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    for loss_fn in (_loss_sum, _loss_weighted):
        loss = loss_fn(_estimate(g, x, True), x, g)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, list(g.parameters()), create_graph=True)


def test_in_place_change_before_backward_is_detected():
    g = MLP(3)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    loss = _estimate(g, x, True).sum()
    with torch.no_grad():
        g.l1.weight.mul_(0.9)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_trainable_tensor_outside_the_parameters_is_refused():
    scale = torch.tensor(0.5, dtype=DT, requires_grad=True)

    def h(t):
        return scale * torch.tanh(t)

    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="not parameters of g"):
        _estimate(h, x, True)
    # Without backward-in-forward the closure is fine (ordinary autograd reaches scale).
    assert _estimate(h, x, False).requires_grad


def test_graph_of_g_is_freed_in_the_forward():
    """What backward-in-forward saves: the plain Neumann estimator keeps tensors of g's graph
    (hidden activations) alive until the backward pass; backward-in-forward keeps only the
    probes and Neumann vectors it stores on purpose (shaped as x), beyond x and θ."""
    g = MLP(4, hidden=16)
    x = torch.randn(8, 4, dtype=DT, requires_grad=True)
    own = {id(x), *(id(p) for p in g.parameters())}

    def shapes_alive_after_forward(bif):
        refs = []

        def pack(t):
            if id(t) not in own:
                refs.append(weakref.ref(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = _estimate(g, x, bif, n_exact_terms=6, n_samples=2)
        shapes = [tuple(r().shape) for r in refs if r() is not None]
        return out, shapes

    _, plain = shapes_alive_after_forward(False)
    _, bif = shapes_alive_after_forward(True)
    assert (8, 16) in plain, plain
    assert all(shape == (8, 4) for shape in bif) and len(bif) <= 2 * 2, bif


# ----------------------------------------------------------------------------- options, modes


def test_option_checks():
    g = MLP(2)
    x = torch.randn(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="neumann_grad=True"):
        L.roulette_logdet(g, x, backward_in_forward=True)
    with pytest.raises(ValueError, match="neumann_grad=True"):
        L.RouletteLogdet(backward_in_forward=True)
    with pytest.raises(TypeError, match="backward_in_forward"):
        L.roulette_logdet(g, x, neumann_grad=True, backward_in_forward=1)


def test_module_option_and_plain_values_without_graph():
    g = MLP(3)
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    est = L.RouletteLogdet(neumann_grad=True, backward_in_forward=True, distribution="poisson")
    assert "backward_in_forward=True" in repr(est)

    def call(module_or_none, **kw):
        gen = torch.Generator().manual_seed(2)
        if module_or_none is None:
            return L.roulette_logdet(g, x, distribution="poisson", generator=gen, **kw)
        return module_or_none(g, x, generator=gen)

    out = call(est)
    assert type(out.grad_fn).__name__ == "_BackwardInForwardBackward"
    assert torch.equal(out.detach(), call(None).detach())
    with torch.no_grad():  # no graph: plain values, no Function
        out = call(est)
    assert out.grad_fn is None and torch.equal(out, call(None).detach())
    est.eval()  # evaluation: 20 exact terms, ordinary graph
    out = call(est)
    assert type(out.grad_fn).__name__ != "_BackwardInForwardBackward"
    assert torch.equal(out.detach(), call(None, n_exact_terms=20).detach())
    assert est.last_stats.n_exact_terms == 20
