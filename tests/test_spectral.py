"""Spectrally normalised layers (DESIGN.md §1, §7): σ against exact singular values (dense and
the explicit convolution matrix), the normalisation W / max(1, σ/c) and its gradient, the
training/eval behaviour of the power-iteration vectors, the tolerance-based stop, save/load
(including the lazily created convolution vectors) and argument checks."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from impflow.nn import SpectralConv2d, SpectralLinear, update_lipschitz
from impflow.nn._frozen import power_iteration_paused
from impflow.nn.spectral import power_iteration_conv2d, power_iteration_dense

D64 = torch.float64


# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return abs(float(a) - float(b)) / abs(float(b))


def _orthogonal(n, generator):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=D64))
    return q * torch.sign(torch.diagonal(r))


def _conv_matrix(weight, size, stride, padding):
    """The explicit matrix A of x ↦ conv2d(x, weight) on (C_in, H, W) inputs: A[:, j] = A e_j."""
    c_in = weight.shape[1]
    n = c_in * size[0] * size[1]
    basis = torch.eye(n, dtype=weight.dtype).view(n, c_in, *size)
    return F.conv2d(basis, weight, stride=stride, padding=padding).reshape(n, -1).t()


def _conv(c_in=2, c_out=3, k=3, stride=1, padding=0, size=(6, 6), seed=0, **kw):
    torch.manual_seed(seed)
    layer = SpectralConv2d(c_in, c_out, k, stride=stride, padding=padding, dtype=D64, **kw)
    layer(torch.randn(1, c_in, *size, dtype=D64))  # creates u, v at this size
    return layer


# ------------------------------------------------------------------------------------------
# σ against the exact largest singular value


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (12, 4), (4, 12), (16, 16), (40, 9)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_sigma_matches_matrix_norm(shape, seed):
    out_f, in_f = shape
    torch.manual_seed(seed)
    layer = SpectralLinear(in_f, out_f, dtype=D64)
    with torch.no_grad():
        layer.weight.normal_()
    exact = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    assert layer.power_iteration(1000) == 1000
    assert _rel(layer.sigma(), exact) < 1e-4
    # u and v are unit vectors, and σ = uᵀWv = ||Wv||.
    assert abs(float(layer.u.norm()) - 1) < 1e-12 and abs(float(layer.v.norm()) - 1) < 1e-12
    assert _rel(layer.sigma(), torch.mv(layer.weight, layer.v).norm()) < 1e-12


def test_dense_sigma_two_close_singular_values():
    # s1 = 1, s2 = 0.999: power iteration converges at the rate (s2/s1)^2 per step, so it takes
    # thousands of steps; a tolerance-based stop gets there without guessing a count.
    g = torch.Generator().manual_seed(3)
    m, n = 20, 15
    s = torch.cat([torch.tensor([1.0, 0.999], dtype=D64), torch.linspace(0.5, 0.05, n - 2)])
    U, V = _orthogonal(m, g)[:, :n], _orthogonal(n, g)
    W = U @ torch.diag(s) @ V.t()
    assert _rel(torch.linalg.matrix_norm(W, 2), 1.0) < 1e-12

    torch.manual_seed(0)
    layer = SpectralLinear(n, m, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(W)
        layer.u.copy_(F.normalize(torch.randn(m, dtype=D64), dim=0))
        layer.v.copy_(F.normalize(torch.randn(n, dtype=D64), dim=0))
    start = float(layer.sigma().detach())
    assert _rel(start, 1.0) > 1e-2  # the test starts far from the answer

    steps = layer.power_iteration(20000, atol=1e-7, rtol=0.0)
    assert 20 < steps < 20000  # stopped on the tolerance, after many steps
    assert _rel(layer.sigma(), 1.0) < 1e-4
    layer.power_iteration(5000)  # the converged estimate stays put
    assert _rel(layer.sigma(), 1.0) < 1e-6


@pytest.mark.parametrize("size", [(5, 5), (6, 6), (5, 6)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", [0, 1])
def test_conv_sigma_matches_explicit_matrix(size, stride, padding):
    layer = _conv(stride=stride, padding=padding, size=size, seed=stride * 10 + padding)
    with torch.no_grad():
        layer.weight.normal_()
    A = _conv_matrix(layer.weight.detach(), size, stride, padding)
    exact = torch.linalg.matrix_norm(A, 2)
    layer.power_iteration(1000)
    assert _rel(layer.sigma(), exact) < 1e-4
    # The vectors have the shapes of the input and of the output of the convolution.
    out = layer(torch.zeros(2, 2, *size, dtype=D64))
    assert layer.v.shape == (1, 2, *size) and layer.u.shape == (1, *out.shape[1:])
    assert layer.input_size.tolist() == list(size) and layer.input_size.dtype == torch.long
    # The operator norm, not the norm of the reshaped kernel.
    kernel_norm = torch.linalg.matrix_norm(layer.weight.detach().flatten(1), 2)
    assert _rel(exact, kernel_norm) > 1e-3


def test_conv_normalised_operator_norm_at_most_coeff():
    for stride, padding in [(1, 1), (2, 0), (2, 1)]:
        layer = _conv(stride=stride, padding=padding, coeff=0.9)
        with torch.no_grad():
            layer.weight.mul_(5)
        layer.power_iteration(1000)
        A = _conv_matrix(layer.normalized_weight().detach(), (6, 6), stride, padding)
        norm = float(torch.linalg.matrix_norm(A, 2))
        assert 0.9 * (1 - 1e-4) <= norm <= 0.9 * (1 + 1e-5)


def test_power_iteration_functions_match_exact_transpose():
    # conv_transpose2d with the chosen output_padding is the exact adjoint of conv2d:
    # <A v, u> = <v, Aᵀ u>, so the iteration is power iteration on AᵀA.
    for stride, padding, size in [(2, 0, (6, 6)), (2, 1, (5, 6)), (1, 0, (5, 5))]:
        layer = _conv(stride=stride, padding=padding, size=size)
        A = _conv_matrix(layer.weight.detach(), size, stride, padding)
        u0, v0 = layer.u.clone(), layer.v.clone()
        u1, v1, n = power_iteration_conv2d(
            layer.weight.detach(), u0, v0, 1, layer.stride, layer.padding, layer._output_padding()
        )
        assert n == 1
        u_ref, v_ref, _ = power_iteration_dense(A, u0.flatten(), v0.flatten(), 1)
        torch.testing.assert_close(v1.flatten(), v_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u1.flatten(), u_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# The normalisation and its gradient


def test_normalized_weight_is_w_over_max_one_sigma_over_c():
    torch.manual_seed(0)
    layer = SpectralLinear(6, 9, coeff=0.8, dtype=D64)
    with torch.no_grad():
        layer.weight.normal_()
    layer.power_iteration(2000)
    W = layer.weight.detach()
    sigma = torch.linalg.matrix_norm(W, 2)
    assert sigma > 0.8
    Wn = layer.normalized_weight().detach()
    torch.testing.assert_close(Wn, W * (0.8 / layer.sigma().detach()), rtol=1e-14, atol=0)
    norm = float(torch.linalg.matrix_norm(Wn, 2))
    assert 0.8 * (1 - 1e-6) <= norm <= 0.8 * (1 + 1e-5)
    # The forward uses it, in both modes.
    x = torch.randn(5, 6, dtype=D64)
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, Wn, layer.bias), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_small_weight_left_unchanged(kind):
    if kind == "dense":
        torch.manual_seed(1)
        layer = SpectralLinear(5, 7, coeff=0.9, dtype=D64)
        exact = torch.linalg.matrix_norm(layer.weight.detach(), 2)
    else:
        layer = _conv(coeff=0.9)
        exact = torch.linalg.matrix_norm(_conv_matrix(layer.weight.detach(), (6, 6), 1, 0), 2)
    with torch.no_grad():
        layer.weight.mul_(0.5 / exact)  # true σ = 0.5 < coeff
    layer.power_iteration(500)
    assert torch.equal(layer.normalized_weight(), layer.weight)


class _NormalizedWeight(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self):
        return self.layer.normalized_weight()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_normalized_weight(seed):
    torch.manual_seed(seed)
    layer = SpectralLinear(4, 3, coeff=0.7, dtype=D64)
    with torch.no_grad():
        layer.weight.mul_(4)
    layer.power_iteration(50)
    layer.eval()  # u, v fixed
    W = layer.weight.detach().clone().requires_grad_()
    assert layer.sigma() > 0.7  # the normalisation is active

    wrapper = _NormalizedWeight(layer)

    def fn(w):
        return torch.func.functional_call(wrapper, {"layer.weight": w}, ())

    assert torch.autograd.gradcheck(fn, (W,))
    x = torch.eye(4, dtype=D64)

    def fwd(w):
        return torch.func.functional_call(layer, {"weight": w}, (x,))

    assert torch.autograd.gradcheck(fwd, (W,))
    # And the gradient is not that of a constant rescaling (σ depends on W).
    g = torch.autograd.grad(fn(W).sum(), W)[0]
    assert (g - 0.7 / layer.sigma().detach()).abs().max() > 1e-3


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_gradcheck_conv(stride, padding):
    layer = _conv(c_in=2, c_out=2, stride=stride, padding=padding, size=(5, 5), coeff=0.7)
    with torch.no_grad():
        layer.weight.mul_(4)
    layer.power_iteration(50)
    layer.eval()
    x = torch.randn(2, 2, 5, 5, dtype=D64)
    W = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def fwd(w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(fwd, (W, b))


def test_training_gradient_equals_eval_gradient_at_the_updated_vectors():
    # In training mode u and v are constants of the graph (updated without gradient): the
    # gradient is that of the eval-mode layer at the vectors the training forward stored.
    torch.manual_seed(0)
    layer = SpectralLinear(5, 4, coeff=0.6, n_power_iterations=2, dtype=D64)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(3, 5, dtype=D64)
    layer.train()
    g_train = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    with power_iteration_paused(layer):  # eval mode at the stored vectors: no step, no refresh
        g_eval = torch.autograd.grad(layer(x).square().sum(), layer.weight)[0]
    torch.testing.assert_close(g_train, g_eval, rtol=1e-13, atol=1e-13)


def test_two_training_forwards_then_one_backward():
    # The second forward updates the buffers in place; the first graph must not depend on them.
    layer = SpectralLinear(4, 4)
    x = torch.randn(2, 4)
    loss = layer(x).sum() + layer(x).sum()
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


# ------------------------------------------------------------------------------------------
# Training and eval modes


def test_training_forward_runs_n_power_iterations():
    torch.manual_seed(0)
    layer = SpectralLinear(6, 5, coeff=0.9, n_power_iterations=3, dtype=D64)
    with torch.no_grad():
        layer.weight.normal_()  # u, v are now far from converged for this weight
    u0, v0 = layer.u.clone(), layer.v.clone()
    x = torch.randn(4, 6, dtype=D64)

    y = layer(x)
    u3, v3, n = power_iteration_dense(layer.weight.detach(), u0, v0, 3)
    assert n == 3
    torch.testing.assert_close(layer.u, u3, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.v, v3, rtol=1e-14, atol=1e-14)
    assert (layer.u - u0).abs().max() > 1e-3
    sigma3 = torch.dot(u3, layer.weight.detach() @ v3)
    W3 = layer.weight.detach() / max(1.0, float(sigma3) / 0.9)
    torch.testing.assert_close(y.detach(), F.linear(x, W3, layer.bias.detach()))
    # One more training forward moves them again; of the eval forwards that follow, only the
    # first does (it refreshes them), and only if a step moves them by more than 1e-6.
    layer(x)
    assert not torch.equal(layer.u, u3)
    layer.eval()
    layer(x)
    u_now = layer.u.clone()
    layer(x)
    assert torch.equal(layer.u, u_now)


def test_conv_eval_forward_refreshes_vectors_of_a_changed_weight():
    layer = _conv(n_power_iterations=2)
    x = torch.randn(2, 2, 6, 6, dtype=D64)
    layer(x)
    layer.eval()
    with torch.no_grad():
        layer.weight.normal_()
    layer(x)
    reference = copy.deepcopy(layer)
    reference.power_iteration(2000, rtol=1e-12)
    torch.testing.assert_close(layer.sigma(), reference.sigma(), rtol=1e-9, atol=0)
    u_now = layer.u.clone()
    layer(x)
    assert torch.equal(layer.u, u_now)


@pytest.mark.parametrize("change", ["in_place", "optimizer", "load_state_dict", "to"])
def test_eval_forward_refreshes_vectors_of_a_changed_weight(change):
    """An eval-mode forward after the weight changed first iterates u, v to convergence on
    the new weight (σ of the old weight normalised the new one: log_prob was off by up to
    0.48 nats); the next one runs nothing."""
    torch.manual_seed(0)
    layer = SpectralLinear(6, 5, coeff=0.9, n_power_iterations=3, dtype=D64)
    x = torch.randn(4, 6, dtype=D64)
    layer.eval()
    if change == "in_place":
        with torch.no_grad():
            layer.weight.normal_()
    elif change == "optimizer":
        opt = torch.optim.SGD(layer.parameters(), lr=1.0)
        layer.train()
        layer(x).square().sum().backward()
        opt.step()
        layer.eval()
    elif change == "load_state_dict":
        other = SpectralLinear(6, 5, coeff=0.9, dtype=D64)
        state = {k: v for k, v in other.state_dict().items() if k not in ("u", "v")}
        layer.load_state_dict(state, strict=False)
    else:
        layer = layer.to(torch.float32).to(D64)
    W = layer.weight.detach()
    sigma = torch.linalg.matrix_norm(W, ord=2)
    y = layer(x)
    # (Refreshed until a step moves the vectors by less than 1e-6, so σ within far less.)
    torch.testing.assert_close(float(layer.sigma().detach()), float(sigma), rtol=1e-7, atol=0)
    expected = F.linear(x, W / max(1.0, float(sigma) / 0.9), layer.bias.detach())
    torch.testing.assert_close(y.detach(), expected, rtol=1e-7, atol=1e-12)
    u_now = layer.u.clone()
    layer(x)
    assert torch.equal(layer.u, u_now)


def test_conv_training_forward_updates_and_eval_does_not():
    layer = _conv(n_power_iterations=2)
    x = torch.randn(2, 2, 6, 6, dtype=D64)
    layer.eval()
    layer(x)  # refreshes after the training forward of _conv
    u_init = layer.u.clone()
    layer(x)  # the weight did not change since: nothing runs
    assert torch.equal(layer.u, u_init)
    with torch.no_grad():
        layer.weight.normal_()
    u0, v0 = layer.u.clone(), layer.v.clone()
    layer.train()
    layer(x)
    u2, v2, _ = power_iteration_conv2d(
        layer.weight.detach(), u0, v0, 2, layer.stride, layer.padding, layer._output_padding()
    )
    torch.testing.assert_close(layer.u, u2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(layer.v, v2, rtol=1e-14, atol=1e-14)
    assert (layer.v - v0).abs().max() > 1e-3


def test_tolerance_stops_training_iterations_early():
    torch.manual_seed(0)
    tol = SpectralLinear(6, 5, n_power_iterations=500, atol=10.0, rtol=0.0, dtype=D64)
    with torch.no_grad():
        tol.weight.normal_()
    u0, v0 = tol.u.clone(), tol.v.clone()
    tol(torch.randn(2, 6, dtype=D64))
    u1, _v1, _ = power_iteration_dense(tol.weight.detach(), u0, v0, 1)
    torch.testing.assert_close(tol.u, u1, rtol=1e-14, atol=1e-14)  # a huge tolerance: 1 step
    # power_iteration with a tolerance reports the steps it took; without one it runs them all.
    assert tol.power_iteration(10000, atol=1e-6, rtol=1e-6) < 10000
    assert tol.power_iteration(37) == 37


def test_update_lipschitz_counts_and_iterates():
    torch.manual_seed(0)
    dense = SpectralLinear(8, 8)
    conv_seen = SpectralConv2d(2, 2, 3)
    conv_seen(torch.randn(1, 2, 5, 5))
    conv_fresh = SpectralConv2d(2, 2, 3)  # never saw an input: skipped
    model = nn.Sequential(dense, nn.ReLU(), nn.Sequential(conv_seen, conv_fresh))
    with torch.no_grad():
        dense.weight.normal_()
        conv_seen.weight.normal_()
    u0, cv0 = dense.u.clone(), conv_seen.v.clone()
    assert update_lipschitz(model, n_iterations=3) == 2
    assert not torch.equal(dense.u, u0) and not torch.equal(conv_seen.v, cv0)
    assert conv_fresh.u.numel() == 0
    assert update_lipschitz(dense, 200) == 1
    assert _rel(dense.sigma(), torch.linalg.matrix_norm(dense.weight.detach(), 2)) < 1e-4
    assert update_lipschitz(nn.ReLU()) == 0
    with pytest.raises(ValueError, match="n_iterations"):
        update_lipschitz(model, 0)


def test_update_lipschitz_with_tolerance_runs_layers_to_convergence(monkeypatch):
    steps = []
    for cls in (SpectralLinear, SpectralConv2d):
        run = cls.power_iteration  # record the steps each layer ran

        def spy(self, *args, _run=run, **kwargs):
            steps.append(_run(self, *args, **kwargs))
            return steps[-1]

        monkeypatch.setattr(cls, "power_iteration", spy)
    torch.manual_seed(3)
    conv = SpectralConv2d(3, 3, 3, padding=1, dtype=torch.float64)
    dense = SpectralLinear(6, 6, dtype=torch.float64)
    conv(torch.randn(1, 3, 6, 6, dtype=torch.float64))
    with torch.no_grad():
        conv.weight.normal_()
        dense.weight.normal_()
        conv.u.normal_(), conv.v.normal_()  # far from converged
        dense.u.normal_(), dense.v.normal_()
    model = nn.Sequential(dense, conv)
    with pytest.raises(ValueError, match="rtol"):
        update_lipschitz(model, 10, rtol=-1.0)
    steps.clear()
    assert update_lipschitz(model, 20000, atol=0.0, rtol=1e-10) == 2
    assert len(steps) == 2 and all(1 <= n < 20000 for n in steps), steps  # stopped early
    conv_exact = torch.linalg.matrix_norm(
        _conv_matrix(conv.weight.detach(), (6, 6), (1, 1), (1, 1)), 2
    )
    assert _rel(conv.sigma(), conv_exact) < 1e-8
    assert _rel(dense.sigma(), torch.linalg.matrix_norm(dense.weight.detach(), 2)) < 1e-8


def test_fresh_layers_start_converged():
    # INIT_POWER_ITERATIONS steps at construction (dense) or first forward (conv): a layer that
    # is only ever evaluated is still normalised.
    torch.manual_seed(0)
    dense = SpectralLinear(10, 30, dtype=D64)
    assert _rel(dense.sigma(), torch.linalg.matrix_norm(dense.weight.detach(), 2)) < 1e-4
    conv = SpectralConv2d(2, 3, 3, padding=1, dtype=D64).eval()
    with pytest.raises(RuntimeError, match="has not seen an input"):
        conv.sigma()
    conv(torch.randn(1, 2, 5, 5, dtype=D64))
    A = _conv_matrix(conv.weight.detach(), (5, 5), 1, 1)
    # Convolution operators have clustered top singular values: close, not yet at 1e-4.
    assert _rel(conv.sigma(), torch.linalg.matrix_norm(A, 2)) < 1e-3


# ------------------------------------------------------------------------------------------
# Save and load


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_dense_state_dict_roundtrip():
    torch.manual_seed(0)
    a = SpectralLinear(5, 4, coeff=0.6, n_power_iterations=2)
    with torch.no_grad():
        a.weight.normal_()
    state = _roundtrip(a.state_dict())
    assert set(state) == {"weight", "bias", "u", "v"}
    torch.manual_seed(1)
    b = SpectralLinear(5, 4, coeff=0.6, n_power_iterations=2)
    b.load_state_dict(state)
    x = torch.randn(3, 5)
    for mode in (False, True, True):
        a.train(mode)
        b.train(mode)
        assert torch.equal(a(x), b(x))
    assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_state_dict_roundtrip_into_fresh_layer(stride, padding):
    a = _conv(stride=stride, padding=padding, n_power_iterations=2, coeff=0.5)
    state = _roundtrip(a.state_dict())
    assert set(state) == {"weight", "bias", "u", "v", "input_size"}
    b = SpectralConv2d(2, 3, 3, stride=stride, padding=padding, n_power_iterations=2, coeff=0.5)
    b = b.double()
    assert b.u.numel() == 0  # never saw an input
    b.load_state_dict(state)  # no extra call needed
    assert b.u.shape == a.u.shape and b.v.shape == a.v.shape
    assert torch.equal(b.input_size, a.input_size)
    # Into a layer that was set up at another size: it takes the saved size.
    c = SpectralConv2d(2, 3, 3, stride=stride, padding=padding, n_power_iterations=2, coeff=0.5)
    c = c.double()
    c(torch.randn(1, 2, 9, 9, dtype=D64))
    c.load_state_dict(state)
    x = torch.randn(2, 2, 6, 6, dtype=D64)
    for mode in (False, True, True):
        for layer in (a, b, c):
            layer.train(mode)
        y = a(x)
        assert torch.equal(y, b(x)) and torch.equal(y, c(x))
    with pytest.raises(ValueError, match="6x6"):
        b(torch.randn(1, 2, 5, 5, dtype=D64))
    # A layer that never saw an input saves and loads as one.
    d = SpectralConv2d(2, 3, 3)
    e = SpectralConv2d(2, 3, 3)
    e(torch.randn(1, 2, 7, 7))
    e.load_state_dict(_roundtrip(d.state_dict()))
    assert e.u.numel() == 0 and e.input_size.tolist() == [0, 0]
    e(torch.randn(1, 2, 8, 8))  # set up afresh at the new size
    assert e.input_size.tolist() == [8, 8]


def test_conv_input_size_at_construction():
    torch.manual_seed(0)
    layer = SpectralConv2d(2, 3, 3, stride=2, padding=1, input_size=(6, 5))
    assert layer.v.shape == (1, 2, 6, 5) and layer.u.shape == (1, 3, 3, 3)
    assert layer(torch.randn(2, 2, 6, 5)).shape == (2, 3, 3, 3)
    assert layer(torch.randn(2, 6, 5)).shape == (3, 3, 3)  # unbatched input
    with pytest.raises(ValueError, match="6x5.*7x5"):
        layer(torch.randn(2, 2, 7, 5))


# ------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("coeff", [0, 1.5, -1, float("nan"), True, "0.9"])
def test_bad_coeff(coeff):
    with pytest.raises(ValueError, match="coeff"):
        SpectralLinear(3, 3, coeff=coeff)
    with pytest.raises(ValueError, match="coeff"):
        SpectralConv2d(3, 3, 3, coeff=coeff)


def test_coeff_one_allowed():
    assert SpectralLinear(3, 3, coeff=1).coeff == 1.0


@pytest.mark.parametrize("n", [0, -2, 2.5, None, True])
def test_bad_n_power_iterations(n):
    with pytest.raises(ValueError, match="n_power_iterations"):
        SpectralLinear(3, 3, n_power_iterations=n)
    with pytest.raises(ValueError, match="n_power_iterations"):
        SpectralConv2d(3, 3, 3, n_power_iterations=n)
    layer = SpectralLinear(3, 3)
    if n is not None:
        with pytest.raises(ValueError, match="n_iterations"):
            layer.power_iteration(n)


@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("value", [-1e-3, float("inf"), "1e-3"])
def test_bad_tolerances(name, value):
    with pytest.raises(ValueError, match=name):
        SpectralLinear(3, 3, **{name: value})
    with pytest.raises(ValueError, match=name):
        SpectralConv2d(3, 3, 3, **{name: value})


def test_bad_conv_arguments():
    with pytest.raises(ValueError, match="groups"):
        SpectralConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding"):
        SpectralConv2d(4, 4, 3, padding="same")
    with pytest.raises(ValueError, match="stride"):
        SpectralConv2d(4, 4, 3, stride=0)
    with pytest.raises(ValueError, match="too small"):
        SpectralConv2d(4, 4, 3)(torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match="expects"):
        SpectralConv2d(4, 4, 3)(torch.randn(4, 5))


def test_conv_different_spatial_size_rejected():
    layer = SpectralConv2d(2, 2, 3, padding=1)
    layer(torch.randn(1, 2, 6, 6))
    for mode in (True, False):
        layer.train(mode)
        with pytest.raises(ValueError, match=r"normalised for .*6x6.* got 5x6"):
            layer(torch.randn(1, 2, 5, 6))
    assert layer(torch.randn(3, 2, 6, 6)).shape == (3, 2, 6, 6)  # other batch sizes are fine


def test_wrong_feature_size_is_torchs_error():
    with pytest.raises(RuntimeError):
        SpectralLinear(3, 4)(torch.randn(2, 5))
    with pytest.raises(RuntimeError):
        SpectralConv2d(3, 4, 3)(torch.randn(1, 2, 6, 6))


def test_parameters_as_in_torch_layers():
    torch.manual_seed(0)
    lin, ref = SpectralLinear(5, 7), nn.Linear(5, 7)
    assert lin.weight.shape == ref.weight.shape and lin.bias.shape == ref.bias.shape
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    assert SpectralLinear(5, 7, bias=False).bias is None
    bound = 1 / math.sqrt(5)  # nn.Linear's initialisation range
    assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    conv, cref = SpectralConv2d(2, 4, (3, 2)), nn.Conv2d(2, 4, (3, 2))
    assert conv.weight.shape == cref.weight.shape and conv.bias.shape == cref.bias.shape
    assert conv.weight.abs().max() <= 1 / math.sqrt(12)
    # .to() carries the buffers.
    assert lin.double().u.dtype == D64
