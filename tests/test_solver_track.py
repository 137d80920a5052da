"""The fused solver bookkeeping op against its pure-PyTorch reference, opcheck, and checks."""

import math

import pytest
import torch

from impflow.ops import solver_track
from impflow.ops.reference import solver_track_reference
from impflow.ops.track import ACTIVE, BLOWUP, CONVERGED, FALLBACK, NONFINITE
from testing import DEVICES, DTYPES, HAS_CUDA, noncontiguous

SETTINGS = dict(tol=1e-3, floor_scale=1e-7, divergence_ratio=10.0)


def make_state(B, n, dtype, device, seed):
    """Iterates whose residuals straddle tol, improve or not, blow up, or are NaN/Inf; some
    samples inactive, some in fallback."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, n, generator=gen, dtype=torch.float64)
    scale = 10.0 ** torch.randint(-6, 2, (B, 1), generator=gen)  # residual norms ~1e-6 .. 10
    F = scale * torch.randn(B, n, generator=gen, dtype=torch.float64) / n**0.5
    F[B // 3] = math.nan if B > 2 else F[B // 3]
    if B > 4:
        F[B // 4, 0] = math.inf
    best = torch.empty(5, B, dtype=torch.float64)
    best[0] = 10.0 ** torch.randint(-5, 1, (B,), generator=gen)  # best measure so far
    best[1] = best[0]
    best[2] = 0.1 * 10.0 ** torch.randint(-1, 2, (B,), generator=gen)  # first residual
    best[3] = torch.rand(B, generator=gen)  # norm of the best z
    # reach: some below ||z|| (~sqrt(n)), which then caps the floor and the relative measure
    best[4] = torch.rand(B, generator=gen) * 2 * n**0.5
    if B > 5:
        best[4, B // 5] = math.inf
    status = torch.full((B,), ACTIVE, dtype=torch.uint8)
    status[torch.rand(B, generator=gen) < 0.2] = CONVERGED  # done: left alone
    status[torch.rand(B, generator=gen) < 0.2] |= FALLBACK
    status[torch.rand(B, generator=gen) < 0.1] |= BLOWUP  # a stale flag must be cleared
    nstep = torch.randint(0, 5, (B,), generator=gen)
    best_z = torch.randn(B, n, generator=gen, dtype=torch.float64)
    best_F = torch.randn(B, n, generator=gen, dtype=torch.float64)
    tensors = [z, F, best_z, best_F]
    return [t.to(device, dtype) for t in tensors] + [t.to(device) for t in (best, status, nstep)]


def run(op, state, relative):
    state = [t.clone() for t in state]
    counts, mask = op(
        *state, SETTINGS["tol"], SETTINGS["floor_scale"], SETTINGS["divergence_ratio"], relative
    )
    return [counts, mask] + state[2:]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize(
    "B,n",
    # 600 and 1000: several blocks of the CPU kernel (256 samples) and a partial last one.
    [(1, 1), (1, 5), (7, 1), (7, 2), (33, 3), (1000, 2), (600, 8), (256, 64), (9, 3072)],
)
def test_matches_reference(B, n, relative, dtype, device):
    state = make_state(B, n, dtype, device, seed=B * 31 + n)
    assert_matches_reference(state, relative)


@pytest.mark.parametrize("n", [1, 2, 4, 9])
def test_threads_split_anywhere(n):
    """Two CPU threads split the batch at a sample inside a block of the kernel."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert_matches_reference(make_state(3001, n, torch.float32, "cpu", seed=n), False)
    finally:
        torch.set_num_threads(threads)


def rows_of(state, rows):
    """The state of the samples `rows` (the rows of every tensor, the columns of `best`)."""
    return [(t[:, rows] if i == 4 else t[rows]).contiguous() for i, t in enumerate(state)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 9])
def test_bits_do_not_depend_on_batch_or_threads(n, dtype):
    """A sample's bookkeeping (its norms in `best` included) is the same bit for bit wherever
    it falls in the kernel's vector lanes: 96 samples fill whole vectors, groups of 7 fill none
    (they run in the loops' scalar remainders), and 9001 samples are cut between two threads
    at an odd sample."""
    names = ["counts", "mask", "best_z", "best_F", "best", "status", "nstep"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        state = make_state(96, n, dtype, "cpu", seed=n)
        whole = run(solver_track, state, False)
        groups_of_7 = [torch.arange(k, k + 7) for k in range(0, 91, 7)]
        for rows in groups_of_7 + [torch.arange(5, 96), torch.arange(1, 96, 2)]:
            part = run(solver_track, rows_of(state, rows), False)
            for name, w, p in zip(names[1:], whole[1:], part[1:]):  # counts: another batch
                w = w[:, rows] if name == "best" else w[rows]
                assert torch.equal(w, p), f"{name} differs for samples {rows[:3].tolist()}..."
        big = make_state(9001, n, dtype, "cpu", seed=n)
        runs = []
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            runs.append(run(solver_track, big, False))
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(names, *runs):
        assert torch.equal(one, two), f"{name}: one and two threads differ"


def assert_matches_reference(state, relative):
    out = run(solver_track, state, relative)
    ref = run(solver_track_reference, [t.cpu() for t in state], relative)
    names = ["counts", "mask", "best_z", "best_F", "best", "status", "nstep"]
    for name, o, r in zip(names, out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        if name == "best":  # norms summed in another order
            torch.testing.assert_close(o.cpu(), r, rtol=1e-12, atol=0, equal_nan=True, msg=name)
        else:
            assert torch.equal(o.cpu(), r), f"{name} differs"


@pytest.mark.parametrize("device", DEVICES)
def test_decisions(device):
    """Hand-made samples, one per case, checked bit by bit."""
    z = torch.ones(6, 4, dtype=torch.float64, device=device)
    F = torch.tensor([1e-6, 0.5, 50.0, math.nan, 0.5, 0.2], dtype=torch.float64, device=device)
    F = F[:, None].expand(6, 4) / 2  # ||F|| = the listed value
    best = torch.ones(5, 6, dtype=torch.float64, device=device)
    best[4] = math.inf
    best[0, 5] = 0.01  # sample 5 does not improve on its best
    status = torch.tensor([ACTIVE] * 4 + [0, ACTIVE | FALLBACK], dtype=torch.uint8, device=device)
    nstep = torch.zeros(6, dtype=torch.long, device=device)
    best_z, best_F = torch.zeros_like(z), torch.zeros_like(z)
    counts, mask = solver_track(z, F, best_z, best_F, best, status, nstep, 1e-3, 1e-12, 10.0, False)
    expected_status = [
        CONVERGED,
        ACTIVE,
        ACTIVE | BLOWUP,
        ACTIVE | NONFINITE | BLOWUP,
        0,
        ACTIVE | FALLBACK,
    ]
    assert status.tolist() == expected_status
    assert nstep.tolist() == [1, 1, 1, 1, 0, 1]
    assert counts.tolist() == [4, 2]
    assert mask.tolist() == [False, True, True, True, False, False]
    improved = [True, True, False, False, False, False]  # 50 > best 1; NaN; inactive; 0.2 > 0.01
    for b, yes in enumerate(improved):
        assert torch.equal(best_z[b], z[b] if yes else torch.zeros_like(z[b])), b
    assert best[1, :2].tolist() == pytest.approx([1e-6, 0.5])
    assert best[3, :2].tolist() == pytest.approx([2.0, 2.0])  # ||z|| of a row of four ones
    assert best[3, 2:].tolist() == [1.0] * 4  # not improved: unchanged


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_iterates(device):
    state = make_state(8, 6, torch.float32, device, seed=3)
    state[0], state[1] = noncontiguous(state[0]), noncontiguous(state[1])
    out = run(solver_track, state, False)
    ref = run(solver_track_reference, [t.cpu() for t in state], False)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.cpu(), r, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype, device):
    state = make_state(5, 3, dtype, device, seed=1)
    torch.library.opcheck(
        torch.ops.impflow.solver_track.default, tuple(state) + (1e-3, 1e-7, 10.0, False)
    )


BAD = [
    ("best must be a float64", lambda s: s.__setitem__(4, s[4].float())),
    (
        "best must be a float64 tensor of shape \\(5, 4\\)",
        lambda s: s.__setitem__(4, s[4][:4].contiguous()),
    ),
    ("status must be a uint8", lambda s: s.__setitem__(5, s[5].bool())),
    ("nstep must be an int64", lambda s: s.__setitem__(6, s[6].int())),
    ("must have z's shape", lambda s: s.__setitem__(1, s[1][:, :-1])),
    ("must be contiguous", lambda s: s.__setitem__(2, noncontiguous(s[2]))),
    ("z must have shape", lambda s: s.__setitem__(0, s[0][0])),
    (
        "best_z is written in place and must not share memory with z",
        lambda s: s.__setitem__(2, s[0]),
    ),
    (
        "best_z is written in place and must not share memory with best_F",
        lambda s: s.__setitem__(3, s[2]),
    ),
]


@pytest.mark.parametrize("message,spoil", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(message, spoil):
    state = make_state(4, 3, torch.float32, "cpu", seed=2)
    spoil(state)
    with pytest.raises(RuntimeError, match=message):
        solver_track(*state, 1e-3, 1e-7, 10.0, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_nonfinite_iterate_is_never_best_nor_converged(impl, device):
    """A NaN or Inf in z with a small finite F: was marked converged, and its NaN copied into
    best_z, by the fused op."""
    op = solver_track if impl == "fused" else solver_track_reference
    z = torch.tensor([[math.nan, 0.0], [math.inf, 1.0], [0.5, 0.5]], dtype=torch.float64)
    F = torch.full_like(z, 1e-9)
    best = torch.full((5, 3), math.inf, dtype=torch.float64)
    best[2] = 1.0
    state = [t.to(device) for t in (z, F, torch.zeros_like(z), torch.zeros_like(z), best)]
    status = torch.full((3,), ACTIVE, dtype=torch.uint8, device=device)
    nstep = torch.zeros(3, dtype=torch.long, device=device)
    counts, _ = op(*state, status, nstep, 1e-6, 1e-16, 10.0, False)
    assert status.tolist() == [ACTIVE | NONFINITE | BLOWUP] * 2 + [CONVERGED]
    assert counts.tolist() == [2, 2]
    assert torch.equal(state[2][:2].cpu(), torch.zeros(2, 2, dtype=torch.float64))
    assert state[4][1, :2].tolist() == [math.inf, math.inf]  # no residual recorded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_float64_norms_neither_overflow_nor_underflow(impl, device):
    """||x||^2 leaves float64 above about 1e154 and below 1e-154: such samples were taken for
    NaN/Inf (and given up) or had their residual read as 0."""
    op = solver_track if impl == "fused" else solver_track_reference
    z = torch.tensor([[3e200, 4e200], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    F = torch.tensor(
        [[1.0, 0.0], [3e-170, 4e-170], [3e170, 4e170], [0.0, 0.0]], dtype=torch.float64
    )
    best = torch.full((5, 4), math.inf, dtype=torch.float64)
    best[2] = 1e300
    state = [t.to(device) for t in (z, F, torch.zeros_like(z), torch.zeros_like(z), best)]
    status = torch.full((4,), ACTIVE, dtype=torch.uint8, device=device)
    nstep = torch.zeros(4, dtype=torch.long, device=device)
    op(*state, status, nstep, 1e-6, 1e-16, 10.0, False)
    torch.testing.assert_close(
        state[4][1].cpu(), torch.tensor([1.0, 5e-170, 5e170, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        state[4][3].cpu(), torch.tensor([5e200, 2**0.5, 2**0.5, 0.0], dtype=torch.float64)
    )
    assert not bool((status & NONFINITE).any())


NAMES = ["z", "F", "best_z", "best_F", "best", "status", "nstep"]


@pytest.mark.parametrize("which", range(7), ids=NAMES)
def test_a_meta_tensor_among_cpu_ones_is_refused(which):
    """A meta tensor sends the call to the fake kernel (the dispatcher takes the device of
    highest priority): no error, and nothing updated."""
    state = make_state(4, 3, torch.float32, "cpu", seed=5)
    state[which] = state[which].to("meta")
    if which == 0:
        message = "solver_track: F must be on z's device \\(meta\\), got cpu"
    else:
        message = f"solver_track: {NAMES[which]} must be on z's device \\(cpu\\), got meta"
    with pytest.raises(RuntimeError, match=message):
        solver_track(*state, 1e-3, 1e-7, 10.0, False)


def test_all_meta_tensors_reach_the_fake_kernel():
    state = [t.to("meta") for t in make_state(4, 3, torch.float32, "cpu", seed=5)]
    counts, mask = solver_track(*state, 1e-3, 1e-7, 10.0, False)
    assert counts.device.type == "meta" and mask.shape == (4,)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_a_cpu_tensor_among_cuda_ones_is_refused_by_name():
    state = make_state(4, 3, torch.float32, "cuda", seed=5)
    state[5] = state[5].cpu()
    with pytest.raises(RuntimeError, match="solver_track: status must be on z's device"):
        solver_track(*state, 1e-3, 1e-7, 10.0, False)
