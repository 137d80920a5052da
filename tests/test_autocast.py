"""Under ``torch.autocast`` the solvers, the blocks and the spectral layers' power iteration
compute exactly as without it (impflow/_autocast.py): a root or a spectral norm in bfloat16 /
float16 would miss its tolerance or let ``Lip(g)`` reach 1. Before, every solve of an
autocast-ed network failed ("fn must return z0's dtype").

On the CPU the results are compared bit for bit with a run without autocast; on CUDA closely
(the same kernels, but cuBLAS may pick another algorithm between two calls)."""

import contextlib
import copy

import pytest
import torch

import impflow
import impflow.nn as inn
from impflow.nn.spectral import power_iteration_dense
from impflow.solvers import SOLVERS
from testing import DEVICES

# The low-precision dtype autocast uses by default on each device.
AUTOCAST_DTYPE = {"cpu": torch.bfloat16, "cuda": torch.float16}


def autocast(device):
    return torch.autocast(device, dtype=AUTOCAST_DTYPE[device])


def assert_same(a, b, device):
    if device == "cpu":
        assert torch.equal(a, b), (a - b).abs().max()
    else:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def coupled_contraction(device, n=5, seed=0):
    """``fn(z) = 0.5·tanh(z Aᵀ) + c - z`` (root form of a contraction; the matmul is one of the
    operations autocast runs in low precision)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen)
    a = (a / torch.linalg.matrix_norm(a, 2)).to(device)
    c = torch.randn(7, n, generator=gen).to(device)
    return lambda z: 0.5 * torch.tanh(z @ a.T) + c - z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "method,options",
    [
        ("broyden", {}),
        ("broyden", {"impl": "reference"}),  # einsums, which autocast would also lower
        ("anderson", {}),
        ("fixed_point", {}),
    ],
)
def test_solvers_solve_as_without_autocast(device, method, options):
    fn = coupled_contraction(device)
    z0 = torch.zeros(7, 5, device=device)
    plain, plain_stats = SOLVERS[method](fn, z0, max_iter=100, tol=1e-6, **options)
    with autocast(device):
        z, stats = SOLVERS[method](fn, z0, max_iter=100, tol=1e-6, **options)
    assert z.dtype == torch.float32
    assert bool(stats.converged.all())
    assert_same(z, plain, device)
    assert torch.equal(stats.nstep, plain_stats.nstep)


@pytest.mark.parametrize("device", DEVICES)
def test_fn_may_turn_autocast_on_again_inside(device):
    # The documented way to evaluate fn in low precision: autocast inside fn, output cast back.
    fn = coupled_contraction(device)

    def low_precision_fn(z):
        with autocast(device):
            return fn(z).float()

    with autocast(device):
        z, stats = impflow.solvers.broyden(
            low_precision_fn, torch.zeros(7, 5, device=device), tol=0.05
        )
    assert bool(stats.converged.all())
    exact, _ = impflow.solvers.broyden(fn, torch.zeros(7, 5, device=device), tol=1e-6)
    assert (z - exact).abs().max() < 0.05


def flow_blocks(d, logdet):
    torch.manual_seed(0)
    implicit = inn.ImplicitBlock(
        inn.LipschitzMLP([d, 16, d], coeff=0.9), inn.LipschitzMLP([d, 16, d], coeff=0.9), logdet
    )
    residual = inn.ResidualBlock(inn.LipschitzMLP([d, 16, d], coeff=0.9), logdet)
    return implicit, residual


def run_block(block, x, seed, context):
    """Forward and inverse in ``context``, then the backward of ``z² + logdet`` outside it
    (autocast wraps forward passes only; backward ops follow the forward's dtypes)."""
    torch.manual_seed(seed)  # the series estimator's probes and roulette draws
    x = x.clone().requires_grad_(True)
    with context:
        z, logdet = block(x)
        x_back, logdet_inv = block.inverse(z.detach())
        loss = z.square().sum() + logdet.sum()
    loss.backward()
    grads = [p.grad for p in block.parameters()]
    return [z, logdet, x.grad, x_back, logdet_inv, *grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logdet,d", [("exact", 2), ("series", 6)])
@pytest.mark.parametrize("kind", ["implicit", "residual"])
def test_blocks_compute_as_without_autocast(device, logdet, d, kind):
    implicit, residual = flow_blocks(d, logdet)
    block = (implicit if kind == "implicit" else residual).to(device).train()
    twin = copy.deepcopy(block)  # training forwards run power iteration: both start alike
    x = torch.randn(9, d, device=device)
    plain = run_block(twin, x, 1, contextlib.nullcontext())
    cast = run_block(block, x, 1, autocast(device))
    for a, b in zip(cast, plain):
        assert a.dtype == b.dtype
        assert_same(a, b, device)
    for name, buf in block.named_buffers():
        assert_same(buf, dict(twin.named_buffers())[name], device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_low_precision_input_is_cast_up_under_autocast(device):
    implicit, _ = flow_blocks(3, "exact")
    block = implicit.to(device).eval()
    x = torch.randn(5, 3, device=device).to(AUTOCAST_DTYPE[device])
    with autocast(device):
        z, logdet = block(x)
        x_back, _ = block.inverse(z.to(AUTOCAST_DTYPE[device]))
    expected_z, expected_logdet = block(x.float())
    assert z.dtype == logdet.dtype == torch.float32
    assert_same(z, expected_z, device)
    assert_same(logdet, expected_logdet, device)
    assert x_back.dtype == torch.float32


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["forward", "inverse"])
def test_a_low_precision_input_without_autocast_is_refused(low, method):
    implicit, residual = flow_blocks(3, "exact")
    for block in (implicit, residual):
        arg = "x" if method == "forward" else "z"
        with pytest.raises(TypeError, match=rf"\.{method}: {arg} must be float32 or float64"):
            getattr(block, method)(torch.randn(4, 3).to(low))


@pytest.mark.parametrize("device", DEVICES)
def test_spectral_layers_estimate_sigma_as_without_autocast(device):
    torch.manual_seed(0)
    dense = inn.SpectralLinear(6, 5, coeff=0.97).to(device).train()
    conv = inn.SpectralConv2d(2, 3, 3, padding=1, coeff=0.97).to(device).train()
    for layer, x in ((dense, torch.randn(4, 6)), (conv, torch.randn(4, 2, 5, 5))):
        x = x.to(device)
        twin = copy.deepcopy(layer)
        torch.manual_seed(1)  # a convolution draws its vectors at its first input
        plain = twin(x)
        torch.manual_seed(1)
        with autocast(device):
            out = layer(x)
            sigma = layer.sigma()
            steps = layer.power_iteration(30, atol=1e-7)
        # The layer's own product runs in low precision (what autocast is for); its σ does not.
        assert out.dtype == AUTOCAST_DTYPE[device]
        torch.testing.assert_close(out.float(), plain, rtol=2e-2, atol=2e-2)
        assert sigma.dtype == torch.float32
        assert_same(sigma, twin.sigma(), device)
        assert steps == twin.power_iteration(30, atol=1e-7)
        assert_same(layer.u, twin.u, device)
        assert_same(layer.v, twin.v, device)


@pytest.mark.parametrize("device", DEVICES)
def test_power_iteration_with_a_tolerance_runs_in_float32(device):
    torch.manual_seed(0)
    w, u, v = (
        torch.randn(8, 6, device=device),
        torch.randn(8, device=device),
        torch.randn(6, device=device),
    )
    expected = power_iteration_dense(w, u, v, 50, atol=1e-7)
    with autocast(device):
        got = power_iteration_dense(w, u, v, 50, atol=1e-7)
    assert got[2] == expected[2]
    for a, b in zip(got[:2], expected[:2]):
        assert a.dtype == torch.float32
        assert_same(a, b, device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_flow_computes_as_without_autocast(device):
    implicit, residual = flow_blocks(2, "exact")
    flow = impflow.Flow(inn.SequentialFlow(inn.ActNorm(2), implicit, residual)).to(device)
    twin = copy.deepcopy(flow)
    x = torch.randn(11, 2, device=device)
    plain = twin.log_prob(x)
    plain.mean().backward()
    with autocast(device):
        log_prob = flow.log_prob(x)
        loss = log_prob.mean()
    loss.backward()
    assert log_prob.dtype == torch.float32
    assert_same(log_prob, plain, device)
    for p, q in zip(flow.parameters(), twin.parameters()):
        assert_same(p.grad, q.grad, device)
    torch.manual_seed(3)
    with torch.no_grad(), autocast(device):
        samples = flow.sample((6,))
    torch.manual_seed(3)
    with torch.no_grad():
        expected = twin.sample((6,))
    assert_same(samples, expected, device)
