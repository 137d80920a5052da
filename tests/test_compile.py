"""The fused ops under ``torch.compile`` (DESIGN.md §3): one graph (``fullgraph=True``) around
each op, with its in-place updates and, for the Hutchinson series, its backward, and results
equal to the eager calls. ``aot_eager`` runs the fake kernels, functionalisation and the
autograd formula without code generation; one ``inductor`` case also compiles the graph
around the Broyden op's in-place history writes."""

import pytest
import torch

from impflow.ops import broyden_step, mlp_vjp_series, power_iteration, solver_track
from impflow.ops.track import ACTIVE

from test_broyden_step import make_state
from testing import DEVICES

F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend):
    return torch.compile(fn, fullgraph=True, backend=backend)


# Inductor generates C++ on the CPU; on CUDA it would need Triton, which is not a dependency.
@pytest.mark.parametrize(
    "device, backend",
    [
        ("cpu", "aot_eager"),
        ("cpu", "inductor"),
        pytest.param("cuda", "aot_eager", marks=DEVICES[1].marks),
    ],
)
def test_broyden_step_compiles_with_its_history_writes(device, backend):
    def iterate(U, V, dz, dF, F, active):
        step = broyden_step(U, V, dz, dF, F, active, 2, 5)
        return step * 2.0  # an op around it, so the graph is more than the call

    state = make_state(7, 5, 3, 5, F64, device, seed=0, active_fraction=0.7)
    eager = [t.clone() for t in state]
    graph = [t.clone() for t in state]
    expected = iterate(*eager)
    got = compiled(iterate, backend)(*graph)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, a, b in zip("UV", graph[:2], eager[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"history {name}")
    assert not torch.equal(graph[0], state[0])  # the slot was written


@pytest.mark.parametrize("device", DEVICES)
def test_solver_track_compiles_with_its_state_updates(device):
    gen = torch.Generator().manual_seed(1)
    B, n = 9, 4
    z, F = (torch.randn(B, n, generator=gen, dtype=F64) for _ in "zF")
    F[2] = float("nan")  # one non-finite residual: flags and counts in the graph too
    best_z, best_F = torch.zeros(B, n, dtype=F64), torch.zeros(B, n, dtype=F64)
    best = torch.full((5, B), float("inf"), dtype=F64)
    status = torch.full((B,), ACTIVE, dtype=torch.uint8)
    status[5] = 0
    nstep = torch.zeros(B, dtype=torch.long)
    z, F = z.to(device), F.to(device)
    state = [t.to(device) for t in (best_z, best_F, best, status, nstep)]
    nstep = state[4]

    def track(z, F, *state):
        return solver_track(z, F, *state, 1.0, 1e-7, 1e3, False)

    eager, graph = [t.clone() for t in state], [t.clone() for t in state]
    counts_e, mask_e = track(z, F, *eager)
    counts_g, mask_g = compiled(track, "aot_eager")(z, F, *graph)
    assert torch.equal(counts_g, counts_e) and torch.equal(mask_g, mask_e)
    for a, b in zip(graph, eager):
        assert torch.equal(a, b)
    assert int(nstep.sum()) == 0 and int(graph[4].sum()) == B - 1  # updated in place


@pytest.mark.parametrize("device", DEVICES)
def test_power_iteration_compiles_with_its_vector_updates(device):
    gen = torch.Generator().manual_seed(2)
    weights = [
        torch.randn(5, 3, generator=gen, dtype=F64),
        torch.randn(4, 5, generator=gen, dtype=F64),
    ]
    us = [torch.randn(w.shape[0], generator=gen, dtype=F64).to(device) for w in weights]
    vs = [torch.randn(w.shape[1], generator=gen, dtype=F64).to(device) for w in weights]
    weights = [w.to(device) for w in weights]

    def iterate(weights, us, vs):
        return power_iteration(weights, us, vs, 3)

    eager_u, eager_v = [u.clone() for u in us], [v.clone() for v in vs]
    graph_u, graph_v = [u.clone() for u in us], [v.clone() for v in vs]
    expected = iterate(weights, eager_u, eager_v)
    got = compiled(iterate, "aot_eager")(weights, graph_u, graph_v)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b, start in zip(graph_u + graph_v, eager_u + eager_v, us + vs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.equal(a, start)


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_vjp_series_compiles_forward_and_backward(device):
    gen = torch.Generator().manual_seed(3)
    B, d, h = 6, 3, 8

    def leaf(t):
        return t.to(device).requires_grad_()

    shapes = [(h, d), (h, h), (d, h)]
    weights = [leaf(0.4 * torch.randn(s, generator=gen, dtype=F64)) for s in shapes]
    derivs = [leaf(torch.rand(B, h, generator=gen, dtype=F64)) for _ in range(2)]
    v = leaf(torch.randn(B, d, generator=gen, dtype=F64))
    coeffs = torch.tensor([1.0, -0.5, 1 / 3, -0.25], dtype=F64, device=device)

    def loss(weights, derivs, v):
        products, traces, series = mlp_vjp_series(weights, derivs, v, coeffs, 4)
        return series.square().sum() + products.sum() + traces[0].sum()

    inputs = weights + derivs + [v]
    expected = torch.autograd.grad(loss(weights, derivs, v), inputs)
    value = compiled(loss, "aot_eager")(weights, derivs, v)
    torch.testing.assert_close(value, loss(weights, derivs, v), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(value, inputs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_implicit_block_trains_under_torch_compile():
    """A user's compiled loss around an ImplicitBlock: dynamo splits the graph around the root
    solves (data-dependent loops, host reads), the rest compiles, and the loss and every
    parameter gradient equal the eager ones."""
    import impflow.nn as inn

    torch.manual_seed(0)
    nets = [inn.LipschitzMLP([2, 16, 16, 2], "sin", coeff=0.9).double() for _ in range(2)]
    block = inn.ImplicitBlock(*nets)  # training mode: power iteration updates its vectors
    x = torch.randn(32, 2, dtype=F64)
    start = {k: t.clone() for k, t in block.state_dict().items()}

    def loss_fn(x):
        z, logdet = block(x)
        return (0.5 * (z**2).sum(1) - logdet).mean()

    def value_and_grads(fn):
        block.load_state_dict(start)  # both calls from the same weights and vectors
        block.zero_grad(set_to_none=True)
        loss = fn(x)
        loss.backward()
        state = {k: t.clone() for k, t in block.state_dict().items()}
        return loss.detach(), [p.grad.clone() for p in block.parameters()], state

    loss_e, grads_e, state_e = value_and_grads(loss_fn)
    loss_c, grads_c, state_c = value_and_grads(torch.compile(loss_fn))
    for key in start:
        torch.testing.assert_close(state_c[key], state_e[key], rtol=1e-9, atol=1e-12, msg=key)
    assert any(not torch.equal(state_e[k], start[k]) for k in start)  # vectors moved
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-9, atol=1e-12)
    assert len(grads_c) == len(grads_e) > 0
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
