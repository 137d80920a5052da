"""The fused products for LipschitzMLP (impflow.logdet.fused_mlp) against autograd products,
and the estimators with either: same probes, same numbers (issue 4 item 3)."""

import contextlib

import pytest
import torch
from torch import nn

import impflow.logdet as L
from impflow.logdet import fused_mlp
from impflow.nn import LipschitzMLP
from testing import DEVICES, DTYPES, rel_error

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
ACTIVATIONS = ["sin", "lipswish", "elu", "softplus", "tanh", "identity"]


def make_mlp(dims, activation, dtype, device="cpu", coeff=0.9):
    g = LipschitzMLP(dims, activation=activation, coeff=coeff).to(device, dtype)
    with torch.no_grad():  # biases spread the pre-activations over the activation's range
        for m in g:
            if hasattr(m, "bias") and m.bias is not None:
                m.bias.uniform_(-1, 1)
            if hasattr(m, "raw_beta"):
                m.raw_beta.fill_(0.3)
    return g.eval()  # fixed power-iteration vectors: both paths see the same weights


def autograd_or_fused(forced):
    return L.autograd_products() if forced else contextlib.nullcontext()


def test_registered_for_lipschitz_mlp_only():
    g = make_mlp([3, 5, 3], "sin", torch.float64)
    assert L.get_vjp_powers(g) is fused_mlp.fused_vjp_powers
    assert L.get_vjp_series(g) is fused_mlp.fused_vjp_series
    assert L.get_vjp_powers(nn.Linear(3, 3)) is L.autograd_vjp_powers
    with L.autograd_products():
        assert L.get_vjp_powers(g) is L.autograd_vjp_powers
        assert L.get_vjp_series(g) is L.autograd_vjp_series
    assert L.get_vjp_powers(g) is fused_mlp.fused_vjp_powers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "dims", [[1, 7, 1], [2, 9, 5, 2], [5, 3, 5], [16, 33, 16], [64, 31, 64], [2, 129, 2]]
)
@pytest.mark.parametrize("batch", [1, 13])
@pytest.mark.parametrize("create_graph", [False, True])
def test_products_match_autograd(create_graph, batch, dims, activation, dtype, device):
    g = make_mlp(dims, activation, dtype, device)
    x = (torch.randn(batch, dims[0], dtype=torch.float64) * 1.5).to(device, dtype)
    v = torch.randn(batch, dims[0], dtype=torch.float64).to(device, dtype)
    n = 12
    coeffs = torch.linspace(1, -1, n, dtype=dtype, device=device)
    with torch.enable_grad(), L.forward_recording(g):
        x_in = x.clone().requires_grad_(True)
        gx = g(x_in)
        fused = fused_mlp.fused_vjp_series(g, x_in, gx, v, n, coeffs, create_graph=create_graph)
        ref = L.autograd_vjp_series(g, x_in, gx, v, n, coeffs, create_graph=create_graph)
    for got, want in zip(
        (fused.products, fused.traces, fused.series), (ref.products, ref.traces, ref.series)
    ):
        assert got.shape == want.shape and got.dtype == dtype
        assert got.requires_grad == want.requires_grad == create_graph
        assert rel_error(got.detach(), want.detach()) <= TOL[dtype]
    assert fused_mlp.supports_fused(g, x_in)


def _estimate_and_grads(g, x, forced, **kw):
    g.zero_grad()
    x = x.clone().requires_grad_(True)
    with autograd_or_fused(forced):
        out = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(11), **kw)
    grads = []
    if out.requires_grad:
        (out * torch.linspace(-1, 2, out.shape[0], dtype=out.dtype)).sum().backward()
        grads = [x.grad] + [p.grad for p in g.parameters()]
    return out.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("d", [1, 2, 5, 16])
@pytest.mark.parametrize("mode", ["no_graph", "graph", "neumann"])
def test_roulette_fused_equals_autograd(mode, d, activation, dtype):
    """The same generator seed gives the same draw and probes on both paths, hence the same
    estimate and (with a graph) the same gradients for x and every parameter."""
    g = make_mlp([d, 17, 9, d], activation, dtype)
    x = torch.randn(7, d, dtype=dtype)
    kw = {"n_exact_terms": 3, "n_samples": 2, "neumann_grad": mode == "neumann"}
    kw["create_graph"] = mode != "no_graph"
    fused, fused_grads = _estimate_and_grads(g, x, False, **kw)
    ref, ref_grads = _estimate_and_grads(g, x, True, **kw)
    assert rel_error(fused, ref) <= TOL[dtype]
    assert (
        len(fused_grads)
        == len(ref_grads)
        == (0 if mode == "no_graph" else 1 + len(list(g.parameters())))
    )
    for got, want in zip(fused_grads, ref_grads):
        if want is None:  # the last bias does not change J
            assert got is None or not got.any()
            continue
        assert rel_error(got, want) <= 10 * TOL[dtype]


def test_training_mode_uses_the_forward_weights():
    """In training mode each forward runs power iterations; the products must use the weights
    of that forward (normalized_weight from the stored vectors), with no further iteration."""
    g = make_mlp([4, 21, 4], "lipswish", torch.float64).train()
    state = {k: t.clone() for k, t in g.state_dict().items()}
    x = torch.randn(6, 4, dtype=torch.float64)
    fused, fused_grads = _estimate_and_grads(g, x, False, n_exact_terms=4)
    after_fused = {k: t.clone() for k, t in g.state_dict().items()}
    g.load_state_dict(state)
    ref, ref_grads = _estimate_and_grads(g, x, True, n_exact_terms=4)
    for k, t in g.state_dict().items():  # one forward each: the same power-iteration steps
        assert torch.equal(t, after_fused[k]), k
    assert rel_error(fused, ref) <= 1e-12
    for got, want in zip(fused_grads, ref_grads):
        if want is not None:
            assert rel_error(got, want) <= 1e-10


def test_forward_preactivations_are_reused():
    """Inside forward_recording the activations run once (the forward); the fused products
    neither re-evaluate them nor the linear layers. Outside it, they are recomputed once."""
    g = make_mlp([3, 11, 7, 3], "sin", torch.float64)
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for m in g]
    x = torch.randn(5, 3, dtype=torch.float64)
    try:
        L.roulette_logdet(g, x, n_exact_terms=5, create_graph=False)
        assert len(calls) == len(g)  # the estimator's own forward only
        calls.clear()
        x_in = x.clone().requires_grad_(True)
        gx = g(x_in)  # not recorded
        v = torch.randn_like(x)
        coeffs = torch.ones(4, dtype=torch.float64)
        res = fused_mlp.fused_vjp_series(g, x_in, gx, v, 4, coeffs, create_graph=False)
        assert len(calls) == len(g) + 2  # the forward, then the two activations again
        ref = L.autograd_vjp_series(g, x_in, gx, v, 4, coeffs, create_graph=False)
        assert rel_error(res.series, ref.series) <= 1e-12
    finally:
        for h in handles:
            h.remove()
    assert not fused_mlp._TAPES  # nothing is kept after the estimator returns


def test_recording_keeps_only_the_forward_of_g():
    g = make_mlp([3, 11, 7, 3], "tanh", torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with L.forward_recording(g):
        gx = g(x)
        g[1](torch.zeros(2, 11, dtype=torch.float64))  # an activation called on its own
        tape = fused_mlp._TAPES[g]
        assert tape.output is gx and len(tape.pre) == 2
        assert all(z.shape == (5, w) for z, w in zip(tape.pre, (11, 7)))
    assert g not in fused_mlp._TAPES


def test_shaped_input_sums_block_diagonal_traces():
    """x of shape (B, S, d): the MLP acts on each of the S rows, J is block diagonal."""
    g = make_mlp([3, 9, 3], "tanh", torch.float64)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    a = L.roulette_logdet(g, x, n_exact_terms=6, generator=torch.Generator().manual_seed(2))
    with L.autograd_products():
        b = L.roulette_logdet(g, x, n_exact_terms=6, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4,) and a.requires_grad
    assert rel_error(a.detach(), b.detach()) <= 1e-12


class CustomTanh(nn.Module):
    """An activation the fused path does not know (it cannot assume it is elementwise)."""

    def forward(self, z):
        return torch.tanh(z)


def test_unsupported_networks_fall_back_to_autograd(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the fused op ran for an unsupported network")

    monkeypatch.setattr(fused_mlp, "mlp_vjp_series", must_not_run)
    x = torch.randn(4, 3, dtype=torch.float64)
    custom = make_mlp([3, 8, 3], CustomTanh(), torch.float64)
    plain = make_mlp([3, 8, 3], "sin", torch.float64)
    appended = make_mlp([3, 8, 3], "sin", torch.float64)
    appended.append(nn.Tanh())  # no longer [linear, act, ..., linear]
    for g in (custom, appended):
        assert not fused_mlp.supports_fused(g, x)
        with L.autograd_products():
            ref = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(0))
        out = L.roulette_logdet(g, x, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, ref)
    assert fused_mlp.supports_fused(plain, x)
    assert not fused_mlp.supports_fused(plain, x.float())  # x's dtype is not the weights'
    assert not fused_mlp.supports_fused(plain, x[:, :2])  # wrong width: g itself will refuse it


def test_neumann_memory_does_not_grow_with_terms():
    g = make_mlp([4, 16, 4], "sin", torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def saved_bytes(n, neumann):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            L.roulette_logdet(
                g,
                x,
                n_exact_terms=n,
                neumann_grad=neumann,
                generator=torch.Generator().manual_seed(0),
            )
        return total[0]

    assert saved_bytes(30, True) == saved_bytes(5, True)
    # With the full graph the op keeps its n products (n B d values), not n graphs of g.
    grow = saved_bytes(30, False) - saved_bytes(5, False)
    assert 0 < grow <= 25 * 3 * 4 * 8 * 2


def test_non_finite_input_is_refused_in_every_mode():
    # NaN/Inf in x is bad input, not a divergence of the series: refused whatever
    # on_divergence says (a NaN produced inside g is covered by test_logdet_divergence.py).
    g = make_mlp([3, 8, 3], "sin", torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    for mode in ("raise", "warn"):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            L.roulette_logdet(g, x, on_divergence=mode)
