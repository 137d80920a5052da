"""The fused power-iteration op against its pure-PyTorch reference, opcheck, and checks."""

import pytest
import torch
from torch.torch_version import TorchVersion

from impflow.ops import power_iteration
from impflow.ops.reference import power_iteration_reference
from testing import DEVICES, DTYPES, HAS_CUDA, REL_TOL, rel_error

SHAPES = [(1, 1), (3, 5), (5, 3), (128, 128), (7, 300), (6, 128)]


def make_problem(shapes, dtype, device, seed, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    weights, us, vs = [], [], []
    for rows, cols in shapes:
        W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        if transposed:  # the same values behind other strides
            W = W.t().contiguous().t()
        weights.append(W.to(device, dtype))
        us.append(
            torch.nn.functional.normalize(
                torch.randn(rows, generator=gen, dtype=torch.float64), dim=0
            ).to(device, dtype)
        )
        vs.append(
            torch.nn.functional.normalize(
                torch.randn(cols, generator=gen, dtype=torch.float64), dim=0
            ).to(device, dtype)
        )
    return weights, us, vs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_iterations", [0, 1, 5, 20])
@pytest.mark.parametrize("transposed", [False, True])
def test_matches_reference(n_iterations, transposed, dtype, device):
    weights, us, vs = make_problem(SHAPES, dtype, device, seed=n_iterations, transposed=transposed)
    assert transposed == (not weights[1].is_contiguous())
    ref_u = [u.double().cpu().clone() for u in us]
    ref_v = [v.double().cpu().clone() for v in vs]
    ref_sigma = power_iteration_reference(
        [W.double().cpu() for W in weights], ref_u, ref_v, n_iterations
    )
    sigma = power_iteration(weights, us, vs, n_iterations)
    assert sigma.shape == (len(SHAPES),) and sigma.dtype == dtype and sigma.device.type == device
    # Float32 drifts from float64 over the steps; the tolerance grows with them.
    tol = REL_TOL[dtype] * max(1, n_iterations) * 10
    assert rel_error(sigma, ref_sigma) <= tol
    for got, want in zip(us + vs, ref_u + ref_v):
        assert rel_error(got, want) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_converges_to_the_spectral_norm(device):
    weights, us, vs = make_problem(SHAPES, torch.float64, device, seed=1)
    sigma = power_iteration(weights, us, vs, 3000)
    exact = torch.stack([torch.linalg.matrix_norm(W, 2) for W in weights])
    assert rel_error(sigma, exact) <= 1e-6
    for W, u, v, s in zip(weights, us, vs, sigma):
        assert float(u.norm()) == pytest.approx(1.0, abs=1e-12)
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(torch.mv(W, v), s * u, rtol=0, atol=1e-5)


def test_zero_matrix_keeps_finite_vectors():
    W = torch.zeros(3, 4)
    u, v = torch.ones(3) / 3**0.5, torch.ones(4) / 2
    sigma = power_iteration([W], [u], [v], 3)
    assert float(sigma) == 0.0 and torch.isfinite(u).all() and torch.isfinite(v).all()


def test_empty_list():
    assert power_iteration([], [], [], 5).shape == (0,)
    assert power_iteration_reference([], [], [], 5).shape == (0,)


@pytest.mark.parametrize("fn", [power_iteration, power_iteration_reference])
def test_empty_lists_are_checked(fn):
    """Without a tensor no kernel runs, but the arguments are still checked."""
    with pytest.raises(RuntimeError, match="n_iterations must be >= 0, got -1"):
        fn([], [], [], -1)
    with pytest.raises(RuntimeError, match="must have the same length, got 0, 1 and 0"):
        fn([], [torch.ones(2)], [], 1)
    with pytest.raises(RuntimeError, match="must have the same length, got 1, 0 and 0"):
        fn([torch.ones(2, 2)], [], [], 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    weights, us, vs = make_problem([(3, 4), (5, 2)], dtype, device, seed=2)
    checks = ["test_schema", "test_autograd_registration", "test_faketensor"]
    # torch < 2.5 cannot functionalize an op that mutates a list of tensors; under
    # torch.compile there, impflow.ops.power_iteration runs its reference (test_compile.py).
    if TorchVersion(torch.__version__) >= (2, 5):
        checks.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.impflow.power_iteration.default, (weights, us, vs, 3), test_utils=checks
    )


BAD = [
    ("same length", lambda w, u, v: (w, u[:1], v)),
    ("must be a matrix", lambda w, u, v: ([w[0][0]] + w[1:], u, v)),
    ("us\\[1\\] must have shape", lambda w, u, v: (w, [u[0], u[0]], v)),
    ("vs\\[0\\] must have shape", lambda w, u, v: (w, u, [v[1], v[1]])),
    (
        "weights\\[1\\] must have the dtype of weights\\[0\\]",
        lambda w, u, v: ([w[0], w[1].double()], u, v),
    ),
    (
        "us\\[1\\] must have the dtype of weights\\[1\\]",
        lambda w, u, v: (w, [u[0], u[1].double()], v),
    ),
    (
        "float32 or float64",
        lambda w, u, v: ([x.half() for x in w], [x.half() for x in u], [x.half() for x in v]),
    ),
    ("must be contiguous", lambda w, u, v: (w, [torch.stack([u[0], u[0]], 1)[:, 0], u[1]], v)),
    # Written in place, within a layer...
    (
        "us\\[0\\] is written in place and must not share memory with weights\\[0\\]",
        lambda w, u, v: (w, [w[0].view(-1)[:3], u[1]], v),
    ),
    (
        "vs\\[1\\] is written in place and must not share memory with us\\[1\\]",
        lambda w, u, v: (w, u, [v[0], u[1][:2]]),
    ),
]


@pytest.mark.parametrize("message,spoil", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(message, spoil):
    weights, us, vs = make_problem([(3, 4), (5, 2)], torch.float32, "cpu", seed=3)
    with pytest.raises(RuntimeError, match=message):
        power_iteration(*spoil(weights, us, vs), 2)


def _cross_layer(case):
    """Three layers (3 x 4, 3 x 4, 4 x 3) whose vectors share memory as `case` says."""
    weights, us, vs = make_problem([(3, 4), (3, 4), (4, 3)], torch.float64, "cpu", seed=6)
    buffer = torch.zeros(12, dtype=torch.float64)
    if case == "same u":  # the issue's power_iteration([W0, W1], [u, u], [v, v], n)
        us[1] = us[0]
    elif case == "v of one layer is u of another":
        vs[2] = us[1]
    elif case == "partial overlap":
        vs[0], us[2] = buffer[0:4], buffer[2:6]
    elif case == "u inside another layer's weight":
        us[0] = weights[2].view(-1)[:3]
    elif case == "v inside another layer's weight":
        vs[2] = weights[0].view(-1)[5:8]
    return weights, us, vs


CROSS_LAYER = [
    ("same u", "us\\[1\\] is written in place and must not share memory with us\\[0\\]"),
    (
        "v of one layer is u of another",
        "vs\\[2\\] is written in place and must not share memory with us\\[1\\]",
    ),
    ("partial overlap", "vs\\[0\\] is written in place and must not share memory with us\\[2\\]"),
    (
        "u inside another layer's weight",
        "us\\[0\\] is written in place and must not share memory with weights\\[2\\]",
    ),
    (
        "v inside another layer's weight",
        "vs\\[2\\] is written in place and must not share memory with weights\\[0\\]",
    ),
]


@pytest.mark.parametrize("case,message", CROSS_LAYER, ids=[c[0] for c in CROSS_LAYER])
def test_memory_shared_across_layers_is_refused(case, message):
    """The layers run at once (one task or one CUDA block each): a vector written by one
    layer and read or written by another gave a different sigma from run to run."""
    weights, us, vs = _cross_layer(case)
    before = [t.clone() for t in us + vs]
    with pytest.raises(RuntimeError, match=message):
        power_iteration(weights, us, vs, 3)
    assert all(torch.equal(a, b) for a, b in zip(us + vs, before))  # refused before any work


def test_the_race_of_the_issue_is_refused():
    gen = torch.Generator().manual_seed(7)
    W0, W1 = torch.randn(300, 300, generator=gen), torch.randn(300, 300, generator=gen)
    u, v = torch.ones(300) / 300**0.5, torch.ones(300) / 300**0.5
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="us\\[1\\] is written in place .* with us\\[0\\]"):
            power_iteration([W0, W1], [u, u], [v, v], 30)
    finally:
        torch.set_num_threads(threads)


def test_shared_reads_and_packed_vectors_are_accepted():
    """A weight used by two layers (read only), and the vectors of all layers as disjoint
    slices of one buffer, are fine."""
    weights, us, vs = make_problem([(3, 4), (3, 4), (4, 3)], torch.float64, "cpu", seed=8)
    weights[1] = weights[0]
    packed = torch.cat(us + vs)
    sizes = [t.numel() for t in us + vs]
    views = list(packed.split(sizes))
    ref_u, ref_v = [u.clone() for u in us], [v.clone() for v in vs]
    ref = power_iteration_reference(weights, ref_u, ref_v, 5)
    sigma = power_iteration(weights, views[:3], views[3:], 5)
    assert rel_error(sigma, ref) <= 1e-12
    assert rel_error(packed, torch.cat(ref_u + ref_v)) <= 1e-12


def test_long_lists_are_checked_across_all_layers():
    """100 layers: the first layer's u shared with the last layer's v is found and named."""
    weights, us, vs = make_problem([(4, 4)] * 100, torch.float32, "cpu", seed=9)
    vs[99] = us[0]
    with pytest.raises(RuntimeError, match="vs\\[99\\] is written in place .* with us\\[0\\]"):
        power_iteration(weights, us, vs, 1)


MIXED = [
    ("weights\\[1\\] must be on weights\\[0\\]'s device \\(cpu\\), got meta", "weights", 1),
    ("us\\[0\\] must be on weights\\[0\\]'s device \\(cpu\\), got meta", "us", 0),
    ("vs\\[1\\] must be on weights\\[0\\]'s device \\(cpu\\), got meta", "vs", 1),
]


@pytest.mark.parametrize("message,which,index", MIXED, ids=[f"{m[1]}[{m[2]}]" for m in MIXED])
def test_a_meta_tensor_among_cpu_ones_is_refused(message, which, index):
    """A meta tensor sends the call to the fake kernel (the dispatcher takes the device of
    highest priority): it returned a result without touching u and v."""
    weights, us, vs = make_problem([(3, 4), (5, 2)], torch.float32, "cpu", seed=10)
    lists = {"weights": weights, "us": us, "vs": vs}
    lists[which][index] = lists[which][index].to("meta")
    with pytest.raises(RuntimeError, match=message):
        power_iteration(weights, us, vs, 2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.impflow.power_iteration(weights, us, vs, 2)


def test_all_meta_tensors_reach_the_fake_kernel():
    weights, us, vs = make_problem([(3, 4), (5, 2)], torch.float32, "meta", seed=11)
    sigma = power_iteration(weights, us, vs, 2)
    assert sigma.device.type == "meta" and sigma.shape == (2,)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_cpu_tensor_among_cuda_ones_is_refused():
    weights, us, vs = make_problem([(3, 4), (5, 2)], torch.float32, "cuda", seed=12)
    vs[1] = vs[1].cpu()
    with pytest.raises(RuntimeError, match="vs\\[1\\] must be on weights\\[0\\]'s device"):
        power_iteration(weights, us, vs, 2)


def test_gradients_through_the_op_are_refused():
    weights, us, vs = make_problem([(3, 4)], torch.float64, "cpu", seed=5)
    sigma = power_iteration([weights[0].requires_grad_(True)], us, vs, 2)
    with pytest.raises(RuntimeError, match="derivative for impflow::power_iteration is not impl"):
        sigma.sum().backward()


def test_negative_iterations():
    weights, us, vs = make_problem([(3, 4)], torch.float32, "cpu", seed=4)
    with pytest.raises(RuntimeError, match="n_iterations must be >= 0"):
        power_iteration(weights, us, vs, -1)
