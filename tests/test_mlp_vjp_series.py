"""The fused Hutchinson-series op for MLPs (impflow.ops.mlp_vjp_series) against its pure-PyTorch
reference: values, both internal strategies, gradients, opcheck and bad input."""

import re

import pytest
import torch

from impflow.ops import mlp_vjp_series
from impflow.ops.reference import mlp_vjp_series_reference
from testing import DEVICES, DTYPES, HAS_CUDA, noncontiguous, rel_error

# Relative error against the float64 reference on the CPU (issue 4: 1e-5 and 1e-10).
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Hidden widths (odd) for 1..4 linear layers; with (129, 127), d <= 5 and 12 terms take the
# explicit-Jacobian strategy (see test_strategy_choice), the other cases the stepwise one.
HIDDEN = [(), (7,), (5, 9), (129, 127), (9, 3, 11)]


def make_problem(d, hidden, batch, n_terms, dtype, device, seed, lip=0.9):
    """Weights of spectral norm ``lip^(1/L)`` (so ``‖J‖ ≤ lip``), derivatives in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    widths = [d, *hidden, d]
    weights = []
    for h_in, h_out in zip(widths[:-1], widths[1:]):
        w = torch.randn(h_out, h_in, generator=gen, dtype=torch.float64)
        w *= lip ** (1 / (len(widths) - 1)) / torch.linalg.matrix_norm(w, 2)
        weights.append(w)
    derivs = [torch.rand(batch, h, generator=gen, dtype=torch.float64) * 2 - 1 for h in hidden]
    v = torch.randn(batch, d, generator=gen, dtype=torch.float64)
    coeffs = torch.randn(n_terms, generator=gen, dtype=torch.float64)
    cast = lambda ts: [t.to(device, dtype) for t in ts]  # noqa: E731
    return cast(weights), cast(derivs), v.to(device, dtype), coeffs.to(device, dtype)


def reference64(weights, derivs, v, coeffs, n_terms):
    to64 = lambda ts: [t.detach().double().cpu() for t in ts]  # noqa: E731
    return mlp_vjp_series_reference(
        to64(weights),
        to64(derivs),
        v.detach().double().cpu(),
        coeffs.detach().double().cpu(),
        n_terms,
    )


def check_outputs(out, ref, dtype, shape):
    n, b, d = shape
    products, traces, series = out
    assert products.shape == (n, b, d) and traces.shape == (n, b) and series.shape == (b,)
    assert products.dtype == traces.dtype == series.dtype == dtype
    for got, want in zip(out, ref):
        assert rel_error(got, want) <= TOL[dtype], (rel_error(got, want), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 5, 16, 64])
@pytest.mark.parametrize("hidden", HIDDEN, ids=lambda h: "-".join(map(str, h)) or "linear")
@pytest.mark.parametrize("batch", [1, 13])
@pytest.mark.parametrize("n_terms", [1, 3, 12])
def test_matches_reference(n_terms, batch, hidden, d, dtype, device):
    weights, derivs, v, coeffs = make_problem(d, hidden, batch, n_terms, dtype, device, seed=d)
    out = mlp_vjp_series(weights, derivs, v, coeffs, n_terms)
    assert all(t.device.type == device for t in out)
    check_outputs(out, reference64(weights, derivs, v, coeffs, n_terms), dtype, (n_terms, batch, d))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_inputs(dtype, device):
    weights, derivs, v, coeffs = make_problem(6, (9, 5), 11, 4, dtype, device, seed=1)
    strided = (
        [noncontiguous(w) for w in weights],
        [noncontiguous(t) for t in derivs],
        noncontiguous(v),
        torch.stack([coeffs, coeffs], 1)[:, 0],
    )
    assert not any(t.is_contiguous() for t in [*strided[0], *strided[1], strided[2], strided[3]])
    out = mlp_vjp_series(*strided, 4)
    check_outputs(out, reference64(weights, derivs, v, coeffs, 4), dtype, (4, 11, 6))
    # The same numbers as with contiguous inputs, bit for bit (the op copies, then computes).
    for got, want in zip(out, mlp_vjp_series(weights, derivs, v, coeffs, 4)):
        assert torch.equal(got, want)


def _ops_called(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


# (d, hidden, n_terms, explicit Jacobians?): the op builds per-sample Jacobians first when
# d (d x step cost + tiny products) beats n_terms steps; the cost model is in
# csrc/include/impflow/mlp_vjp_series_steps.h.
STRATEGIES = [
    (1, (128, 128), 12, True),
    (2, (128, 128), 12, True),
    (1, (9, 9), 12, True),
    (2, (15, 17), 12, True),
    (2, (15, 17), 3, False),
    (64, (128, 128), 3, False),
]


@pytest.mark.parametrize("d,hidden,n_terms,explicit", STRATEGIES)
def test_strategy_choice(d, hidden, n_terms, explicit):
    """Small d against n_terms: per-sample Jacobians first, then a batched product of tiny
    matrices per term (forward) and per-sample Jacobian gradients (backward); otherwise one
    vector-Jacobian step per term. Which one ran shows in the ops called (aten::bmm); both
    agree with the reference (here, in test_matches_reference and the gradient tests)."""
    problem = make_problem(d, hidden, 50, n_terms, torch.float64, "cpu", 2)
    names = _ops_called(lambda: mlp_vjp_series(*problem, n_terms))
    assert ("aten::bmm" in names) == explicit
    out = mlp_vjp_series(*problem, n_terms)
    check_outputs(out, reference64(*problem, n_terms), torch.float64, (n_terms, 50, d))
    grads = [torch.ones_like(t) for t in out]
    names = _ops_called(lambda: torch.ops.impflow.mlp_vjp_series_backward(*grads, *problem, out[0]))
    assert ("aten::bmm" in names) == explicit


def test_linear_map_closed_form():
    """One layer, J = W: products are v^T W^k, traces v^T W^k v."""
    W = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
    products, traces, series = mlp_vjp_series(
        [W], [], v, torch.tensor([1.0, -0.5, 2.0]).double(), 3
    )
    for k in range(3):
        expected = v @ torch.linalg.matrix_power(W, k + 1)
        torch.testing.assert_close(products[k], expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(traces[k], (expected * v).sum(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(series, traces[0] - 0.5 * traces[1] + 2 * traces[2])


# ----------------------------------------------------------------------------- gradients


def _leaves(weights, derivs, v, coeffs):
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    return [leaf(w) for w in weights], [leaf(t) for t in derivs], leaf(v), leaf(coeffs)


@pytest.mark.parametrize(
    "hidden",
    [h for h in HIDDEN if max(h, default=0) < 100],
    ids=lambda h: "-".join(map(str, h)) or "linear",
)
@pytest.mark.parametrize("d,n_terms", [(1, 2), (3, 4), (2, 12)])
def test_gradcheck(d, n_terms, hidden):
    _gradcheck(d, hidden, n_terms)


@pytest.mark.parametrize("d,hidden", [(1, (9, 9)), (2, (15, 17))])
def test_gradcheck_explicit_jacobians(d, hidden):
    _gradcheck(d, hidden, 12)


def _gradcheck(d, hidden, n_terms):
    problem = make_problem(d, hidden, 3, n_terms, torch.float64, "cpu", seed=3)
    weights, derivs, v, coeffs = _leaves(*problem)
    n_w = len(weights)

    def fn(*flat):
        return torch.ops.impflow.mlp_vjp_series(
            list(flat[:n_w]), list(flat[n_w : 2 * n_w - 1]), flat[-2], flat[-1], n_terms
        )

    assert torch.autograd.gradcheck(fn, (*weights, *derivs, v, coeffs))


def _flat(weights, derivs, v, coeffs):
    return [*weights, *derivs, v, coeffs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", ["all", "products", "traces", "series"])
@pytest.mark.parametrize(
    "d,hidden,n", [(7, (9, 5), 5), (2, (129, 127), 12)], ids=["stepwise", "explicit-jacobian"]
)
def test_gradients_match_reference(d, hidden, n, used, dtype, device):
    """The op's backward against autograd through the float64 reference, with the loss
    reaching all outputs or only one of them (the others then get no gradient)."""
    b = 11
    problem = make_problem(d, hidden, b, n, dtype, device, seed=4)
    gen = torch.Generator().manual_seed(5)
    upstream = [
        torch.randn(s, generator=gen, dtype=torch.float64) for s in [(n, b, d), (n, b), (b,)]
    ]

    def loss(out):
        terms = [(o * u.to(o)).sum() for o, u in zip(out, upstream)]
        pick = {"all": terms, "products": terms[:1], "traces": terms[1:2], "series": terms[2:]}
        return sum(pick[used])

    inputs = _leaves(*problem)
    grads = torch.autograd.grad(loss(mlp_vjp_series(*inputs, n)), _flat(*inputs))
    ref_inputs = _leaves(
        [w.double().cpu() for w in problem[0]],
        [t.double().cpu() for t in problem[1]],
        problem[2].double().cpu(),
        problem[3].double().cpu(),
    )
    ref_flat = _flat(*ref_inputs)
    ref_out = mlp_vjp_series_reference(*ref_inputs, n)
    ref_grads = torch.autograd.grad(loss(ref_out), ref_flat, allow_unused=True)
    for got, want, leaf in zip(grads, ref_grads, ref_flat):
        want = torch.zeros_like(leaf) if want is None else want  # coeffs, when only products count
        assert got.dtype == dtype and got.device.type == device
        if leaf is ref_flat[-1]:
            # dL/dcoeffs = traces @ dL/dseries sums over the batch with cancellation: bound
            # the error by the size of the summands, not of the sum.
            scale = (ref_out[1].detach().abs() @ upstream[2].abs()).norm()
            assert (got.double().cpu() - want).norm() <= TOL[dtype] * scale
        else:
            assert rel_error(got, want) <= TOL[dtype]


def test_double_backward_is_refused():
    inputs = _leaves(*make_problem(3, (5,), 4, 3, torch.float64, "cpu", seed=6))
    _, _, series = mlp_vjp_series(*inputs, 3)
    (grad_v,) = torch.autograd.grad(series.sum(), inputs[2], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad_v.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_opcheck(strided, requires_grad, dtype, device):
    problem = make_problem(3, (5, 4), 6, 4, dtype, device, seed=7)
    if strided:  # outputs are contiguous whatever the inputs' strides (as the fake kernel says)
        weights, derivs, v, coeffs = problem
        problem = (
            [noncontiguous(w) for w in weights],
            [noncontiguous(t) for t in derivs],
            noncontiguous(v),
            coeffs,
        )
    weights, derivs, v, coeffs = _leaves(*problem) if requires_grad else problem
    torch.library.opcheck(torch.ops.impflow.mlp_vjp_series.default, (weights, derivs, v, coeffs, 4))
    products, traces, series = mlp_vjp_series(*problem, 4)
    gen = torch.Generator().manual_seed(8)
    grads = [
        torch.randn(t.shape, generator=gen, dtype=dtype).to(device)
        for t in (products, traces, series)
    ]
    torch.library.opcheck(
        torch.ops.impflow.mlp_vjp_series_backward.default,
        (*grads, *problem[:2], problem[2], problem[3], products),
    )


# ----------------------------------------------------------------------------- bad input


def _spoil_weight(i, t):
    def spoil(w, dv, v, c):
        w = list(w)
        w[i] = t(w[i])
        return w, dv, v, c

    return spoil


BAD = [
    ("at least one matrix", lambda w, dv, v, c: ([], [], v, c)),
    ("one tensor per hidden layer", lambda w, dv, v, c: (w, dv[:1], v, c)),
    ("v must have shape \\(B, d\\)", lambda w, dv, v, c: (w, dv, v[0], c)),
    ("weights\\[0\\] must have 2 columns", lambda w, dv, v, c: (w, dv, v[:, :2], c)),
    ("weights\\[1\\] must have 5 columns", _spoil_weight(1, lambda t: t[:, :4])),
    ("weights\\[1\\] must be a matrix", _spoil_weight(1, lambda t: t[0])),
    ("last weight must have d = 3 rows", _spoil_weight(2, lambda t: t[:2])),
    (
        "act_derivs\\[1\\] must have shape \\(6, 4\\)",
        lambda w, dv, v, c: (w, [dv[0], dv[1][:5]], v, c),
    ),
    ("coeffs must have shape \\(n_terms,\\) = \\(4\\)", lambda w, dv, v, c: (w, dv, v, c[:3])),
    (
        "float32 or float64",
        lambda w, dv, v, c: ([t.half() for t in w], [t.half() for t in dv], v.half(), c.half()),
    ),
    ("weights\\[2\\] must have v's dtype", _spoil_weight(2, lambda t: t.float())),
    (
        "act_derivs\\[0\\] must have v's dtype",
        lambda w, dv, v, c: (w, [dv[0].float(), dv[1]], v, c),
    ),
    ("coeffs must have v's dtype", lambda w, dv, v, c: (w, dv, v, c.float())),
    (
        "act_derivs\\[0\\] must be on v's device",
        lambda w, dv, v, c: (w, [dv[0].to("meta"), dv[1]], v, c),
    ),
]


@pytest.mark.parametrize("message,spoil", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(message, spoil):
    problem = make_problem(3, (5, 4), 6, 4, torch.float64, "cpu", seed=9)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.impflow.mlp_vjp_series(*spoil(*problem), 4)


@pytest.mark.parametrize("n_terms", [0, -1])
def test_bad_term_count(n_terms):
    weights, derivs, v, _ = make_problem(3, (5,), 6, 1, torch.float64, "cpu", seed=10)
    with pytest.raises(RuntimeError, match="n_terms must be >= 1"):
        mlp_vjp_series(weights, derivs, v, v.new_zeros(max(n_terms, 0)), n_terms)


@pytest.mark.parametrize("where", ["weights[1]", "act_derivs[0]", "v", "coeffs"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_named(where, value):
    weights, derivs, v, coeffs = make_problem(3, (5, 4), 6, 4, torch.float64, "cpu", seed=11)
    target = {"weights[1]": weights[1], "act_derivs[0]": derivs[0], "v": v, "coeffs": coeffs}
    target[where].view(-1)[1] = value
    with pytest.raises(ValueError, match=re.escape(f"{where} contains NaN or Inf")):
        mlp_vjp_series(weights, derivs, v, coeffs, 4)
    # Unchecked, the op propagates the non-finite value instead of hiding it.
    products, traces, series = mlp_vjp_series(weights, derivs, v, coeffs, 4, check_finite=False)
    assert not torch.isfinite(series).all()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_mixed_devices_are_refused():
    weights, derivs, v, coeffs = make_problem(3, (5,), 6, 2, torch.float32, "cuda", seed=12)
    with pytest.raises(RuntimeError, match="must be on v's device"):
        mlp_vjp_series([weights[0].cpu(), weights[1]], derivs, v, coeffs, 2)
    # Unchecked in Python, a CUDA weight picks the CUDA kernel, whose checks name the CPU v
    # (a CUDA device guard on v refused it first).
    message = "weights\\[0\\] must be on v's device \\(cpu\\), got cuda"
    with pytest.raises(RuntimeError, match=message):
        mlp_vjp_series(
            weights, [t.cpu() for t in derivs], v.cpu(), coeffs.cpu(), 2, check_finite=False
        )


# ----------------------------------------------------------------------------- empty batch


def _empty_batch(n_terms, dtype=torch.float64, d=3, batch=0):
    weights, derivs, v, _ = make_problem(d, (5, 4), batch, 1, dtype, "cpu", seed=14)
    return weights, derivs, v, torch.ones(n_terms, dtype=dtype)


@pytest.mark.parametrize("batch,d", [(0, 3), (4, 0)])
def test_empty_batch_takes_no_step(batch, d):
    """No sample (or no element): the results at once, without n_terms empty steps (each a
    few matrix products of empty operands: 30 s for n_terms = 10^7), forward and backward."""
    n = 1000
    weights, derivs, v, coeffs = _leaves(*_empty_batch(n, d=d, batch=batch))
    names = _ops_called(lambda: mlp_vjp_series(weights, derivs, v, coeffs, n))
    assert not names & {"aten::mm", "aten::mm_out", "aten::bmm", "aten::addmm"}, names
    products, traces, series = mlp_vjp_series(weights, derivs, v, coeffs, n)
    assert products.shape == (n, batch, d) and traces.shape == (n, batch)
    assert series.shape == (batch,)
    assert not traces.any() and not series.any()  # a trace over no element is 0
    ref = mlp_vjp_series_reference(weights, derivs, v, coeffs, n)
    for got, want in zip((products, traces, series), ref):
        assert torch.equal(got, want)
    loss = products.sum() + traces.sum() + series.sum()
    names = _ops_called(
        lambda: torch.autograd.grad(loss, _flat(weights, derivs, v, coeffs), retain_graph=True)
    )
    assert not names & {"aten::mm", "aten::mm_out", "aten::bmm", "aten::addmm"}, names
    grads = torch.autograd.grad(loss, _flat(weights, derivs, v, coeffs))
    for g, t in zip(grads, _flat(weights, derivs, v, coeffs)):
        assert g.shape == t.shape and not g.any()


def test_empty_batch_with_ten_million_terms_is_quick():
    import time

    n = 10_000_000
    weights, derivs, v, coeffs = _empty_batch(n, dtype=torch.float32)
    start = time.perf_counter()
    products, traces, series = mlp_vjp_series(weights, derivs, v, coeffs, n)
    grads = torch.ops.impflow.mlp_vjp_series_backward(
        products, traces, series, weights, derivs, v, coeffs, products
    )
    assert time.perf_counter() - start < 5.0  # about 0.05 s; 30 s each way before
    assert products.shape == (n, 0, 3) and grads[2].shape == (0, 3)


EMPTY_BATCH_BAD = [
    ("n_terms must be >= 1", lambda w, dv, v, c: (w, dv, v, c[:0], 0)),
    ("coeffs must have shape \\(n_terms,\\) = \\(7\\)", lambda w, dv, v, c: (w, dv, v, c[:6], 7)),
    (
        "weights\\[1\\] must have 5 columns",
        lambda w, dv, v, c: ([w[0], w[1][:, :4], w[2]], dv, v, c, 7),
    ),
    (
        "act_derivs\\[0\\] must have v's dtype",
        lambda w, dv, v, c: (w, [dv[0].float(), dv[1]], v, c, 7),
    ),
    ("at least one matrix", lambda w, dv, v, c: ([], [], v, c, 7)),
]


@pytest.mark.parametrize("message,spoil", EMPTY_BATCH_BAD, ids=[b[0] for b in EMPTY_BATCH_BAD])
def test_empty_batch_arguments_are_still_checked(message, spoil):
    args = spoil(*_empty_batch(7))
    with pytest.raises(RuntimeError, match=message):
        mlp_vjp_series(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.impflow.mlp_vjp_series(*args)


def test_empty_batch_backward_arguments_are_still_checked():
    problem = _empty_batch(7)
    products, traces, series = mlp_vjp_series(*problem, 7)
    backward = torch.ops.impflow.mlp_vjp_series_backward
    with pytest.raises(RuntimeError, match="grad_traces must have shape \\[7, 0\\]"):
        backward(products, traces[:3], series, *problem, products)
    with pytest.raises(RuntimeError, match="coeffs must have shape \\(n_terms,\\) = \\(7\\)"):
        backward(products, traces, series, *problem[:3], problem[3][:5], products)


# ----------------------------------------------------------------------------- devices


def test_a_meta_tensor_among_cpu_ones_is_refused():
    """A meta tensor sends the call to the fake kernel, which computes nothing: forward (v or
    any other input) and backward must refuse it by name."""
    weights, derivs, v, coeffs = make_problem(3, (5,), 6, 2, torch.float64, "cpu", seed=15)
    message = "mlp_vjp_series: weights\\[0\\] must be on v's device \\(meta\\), got cpu"
    with pytest.raises(RuntimeError, match=message):
        mlp_vjp_series(weights, derivs, v.to("meta"), coeffs, 2, check_finite=False)
    with pytest.raises(RuntimeError, match="coeffs must be on v's device \\(cpu\\), got meta"):
        torch.ops.impflow.mlp_vjp_series(weights, derivs, v, coeffs.to("meta"), 2)
    products, traces, series = mlp_vjp_series(weights, derivs, v, coeffs, 2)
    backward = torch.ops.impflow.mlp_vjp_series_backward
    message = "mlp_vjp_series_backward: products must be on v's device \\(cpu\\), got meta"
    with pytest.raises(RuntimeError, match=message):
        backward(products, traces, series, weights, derivs, v, coeffs, products.to("meta"))
    message = "mlp_vjp_series_backward: grad_series must be on v's device \\(cpu\\), got meta"
    with pytest.raises(RuntimeError, match=message):
        backward(products, traces, series.to("meta"), weights, derivs, v, coeffs, products)


def test_no_kernel_for_the_chosen_device_names_the_argument(monkeypatch):
    """As in test_broyden_step.py: a stand-in op raises as the dispatcher does when a build
    without CUDA kernels meets a CUDA tensor; a meta tensor plays that tensor."""

    def no_kernel(*args):
        raise NotImplementedError("Could not run 'impflow::mlp_vjp_series' with arguments ...")

    monkeypatch.setattr(torch.ops.impflow, "mlp_vjp_series", no_kernel)
    weights, derivs, v, coeffs = make_problem(3, (5,), 6, 2, torch.float64, "cpu", seed=16)
    with pytest.raises(RuntimeError, match="act_derivs\\[0\\] must be on v's device"):
        mlp_vjp_series(weights, [derivs[0].to("meta")], v, coeffs, 2, check_finite=False)


def test_bad_backward_arguments():
    problem = make_problem(3, (5,), 6, 4, torch.float64, "cpu", seed=13)
    products, traces, series = mlp_vjp_series(*problem, 4)
    grads = [torch.ones_like(t) for t in (products, traces, series)]
    backward = torch.ops.impflow.mlp_vjp_series_backward
    with pytest.raises(RuntimeError, match="products must have shape \\(n_terms, B, d\\)"):
        backward(*grads, *problem, products[0])
    with pytest.raises(RuntimeError, match="grad_traces must have shape \\[4, 6\\]"):
        backward(grads[0], grads[1][:, :5], grads[2], *problem, products)
    with pytest.raises(RuntimeError, match="grad_series must have v's dtype"):
        backward(grads[0], grads[1], grads[2].float(), *problem, products)
