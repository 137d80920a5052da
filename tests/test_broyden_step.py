"""The fused Broyden op against its pure-PyTorch reference, opcheck, and argument checks."""

import os
import subprocess
import sys

import pytest
import torch

from impflow.ops import broyden_step
from impflow.ops.reference import broyden_step_reference
from testing import DEVICES, DTYPES, HAS_CUDA, REL_TOL, noncontiguous, rel_error


def batch_minor(t):
    """The same (B, m, d) values stored as a contiguous (m, d, B) tensor."""
    return t.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def make_state(B, m, d, n_valid, dtype, device, seed, active_fraction=1.0, layout="contiguous"):
    """Histories and vectors as a Broyden solve of a contraction produces them: dF close to
    -dz (F(z) = g(z) - z with Lip(g) < 1), so the update denominators stay away from zero."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    U = torch.zeros(B, m, d, dtype=dtype)
    V = torch.zeros(B, m, d, dtype=dtype)
    U[:, :n_valid] = randn(B, n_valid, d, scale=0.3 / d**0.5)
    V[:, :n_valid] = randn(B, n_valid, d, scale=0.3 / d**0.5)
    dz = randn(B, d)
    dF = (-dz.double() + 0.3 * randn(B, d).double()).to(dtype)
    F = randn(B, d)
    active = torch.rand(B, generator=gen) < active_fraction
    if active_fraction < 1.0:
        active[0] = True  # at least one sample does work
    if layout == "batch_minor":
        U, V = batch_minor(U), batch_minor(V)
    return [t.to(device) for t in (U, V, dz, dF, F, active)]


def reference_on_copies(U, V, dz, dF, F, active, slot, n_valid, dtype):
    """The reference in ``dtype`` on CPU copies of the inputs: (step, U, V)."""
    U_ref, V_ref = U.to("cpu", dtype, copy=True), V.to("cpu", dtype, copy=True)
    vectors = [t.to("cpu", dtype) for t in (dz, dF, F)]
    step = broyden_step_reference(U_ref, V_ref, *vectors, active.cpu(), slot, n_valid)
    return step, U_ref, V_ref


def run_both(U, V, dz, dF, F, active, slot, n_valid):
    """The op on the given tensors, and the float64 reference on copies."""
    ref = reference_on_copies(U, V, dz, dF, F, active, slot, n_valid, torch.float64)
    step = broyden_step(U, V, dz, dF, F, active, slot, n_valid)
    return (step, U, V), ref


def assert_close_to_reference(out, ref, same_dtype_ref, context=""):
    """The op's error against the float64 reference may be at most a few times the error of
    the reference itself run in the op's dtype (a tolerance measured, not guessed), plus
    REL_TOL for results that the same-dtype reference happens to get exactly right."""
    for name, o, r, s in zip(("step", "U", "V"), out, ref, same_dtype_ref):
        err, err_same = rel_error(o, r), rel_error(s, r)
        assert err <= 4 * err_same + REL_TOL[o.dtype], (
            f"{name}: rel error {err:.2e}, reference in {o.dtype}: {err_same:.2e} {context}"
        )


SHAPES = [(B, m, d) for B in (1, 7, 256) for d in (1, 2, 3, 64, 3072) for m in (1, 5, 30)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,m,d", SHAPES)
def test_matches_reference(B, m, d, dtype, device):
    # While the ring fills (slot = n_valid) and once it is full (slot anywhere).
    for n_valid, slot in {(0, 0), (m - 1, m - 1), (m, m // 2), (m, m - 1)}:
        state = make_state(B, m, d, n_valid, dtype, device, seed=B * 1000 + m * 10 + d)
        same = reference_on_copies(*state, slot, n_valid, dtype)
        out, ref = run_both(*state, slot, n_valid)
        assert_close_to_reference(out, ref, same, f"(n_valid={n_valid}, slot={slot})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,m,d", [(B, m, d) for B in (1, 7, 37, 256) for d in (1, 2, 3, 4, 64) for m in (1, 5, 30)]
)
def test_batch_minor_layout_matches_reference(B, m, d, dtype, device):
    """Histories stored as (m, d, B) (the solver's layout for small d on CPU; d <= 4 runs the
    AVX-512 kernel where the CPU has it: B = 7 gives a partial vector block, 256 full ones,
    37 full ones and then a partial one)."""
    for n_valid, slot in {(0, 0), (m - 1, m - 1), (m, m // 2)}:
        state = make_state(
            B,
            m,
            d,
            n_valid,
            dtype,
            device,
            seed=B + m + d,
            layout="batch_minor",
            active_fraction=0.7,
        )
        same = reference_on_copies(*state, slot, n_valid, dtype)
        out, ref = run_both(*state, slot, n_valid)
        assert_close_to_reference(out, ref, same, f"(n_valid={n_valid}, slot={slot})")
        assert out[1].stride() == state[0].stride()  # updated in place, layout kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_batch_minor_threads_split_anywhere(d, dtype):
    """Two CPU threads split the batch at a sample that is not a multiple of the kernel's
    vector width (16 or 8 samples), so each thread's blocks start mid-vector in the flat
    (B, d) vectors and the mask. Samples are independent: the bits must equal one thread's."""
    B, m = 9001, 30  # a full history: work enough for two threads (B / 2 = 4500.5)
    state = make_state(B, m, d, m, dtype, "cpu", seed=d, layout="batch_minor", active_fraction=0.7)
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            U, V = state[0].clone(), state[1].clone()
            assert U.stride() == state[0].stride()  # clone keeps the batch-minor layout
            step = broyden_step(U, V, *state[2:], 1, m)
            results.append((step, U, V))
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(("step", "U", "V"), *results):
        assert torch.equal(one, two), f"{name} differs between one and two threads"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "batch_minor"])
def test_partially_active_mask(layout, dtype, device):
    B, m, d, n_valid, slot = 33, 5, 17, 5, 2
    U, V, dz, dF, F, active = make_state(
        B, m, d, n_valid, dtype, device, seed=3, active_fraction=0.5, layout=layout
    )
    assert 0 < int(active.sum()) < B
    U0, V0 = U.clone(), V.clone()
    same = reference_on_copies(U, V, dz, dF, F, active, slot, n_valid, dtype)
    out, ref = run_both(U, V, dz, dF, F, active, slot, n_valid)
    assert_close_to_reference(out, ref, same)
    step, U1, V1 = out
    idle = ~active
    assert torch.equal(step[idle], torch.zeros_like(step[idle]))
    assert torch.equal(U1[idle], U0[idle]) and torch.equal(V1[idle], V0[idle])
    # Active samples change the written slot only.
    others = [i for i in range(m) if i != slot]
    assert torch.equal(U1[:, others], U0[:, others]) and torch.equal(V1[:, others], V0[:, others])
    assert not torch.equal(U1[active, slot], U0[active, slot])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_noncontiguous_vectors(dtype, device):
    B, m, d, n_valid, slot = 9, 5, 6, 3, 3
    U, V, dz, dF, F, active = make_state(B, m, d, n_valid, dtype, device, seed=5)
    strided = [noncontiguous(t) for t in (dz, dF, F)]
    assert not any(t.is_contiguous() for t in strided)
    # A strided view of a wider buffer too.
    wide = torch.zeros(B, 2 * d, dtype=dtype, device=device)
    wide[:, ::2] = F
    strided[2] = wide[:, ::2]
    mask = torch.stack([active, active], 1)[:, 0]
    same = reference_on_copies(U, V, *strided, mask, slot, n_valid, dtype)
    out, ref = run_both(U, V, *strided, mask, slot, n_valid)
    assert_close_to_reference(out, ref, same)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,layout", [(5, "contiguous"), (2, "batch_minor"), (4, "batch_minor")])
def test_zero_denominator_drops_update(device, d, layout):
    """dz = 0 carries no information: the slot is cleared and the step uses the rest."""
    B, m, n_valid, slot = 4, 3, 3, 1
    U, V, dz, dF, F, active = make_state(
        B, m, d, n_valid, torch.float64, device, seed=7, layout=layout
    )
    dz.zero_()
    out, ref = run_both(U, V, dz, dF, F, active, slot, n_valid)
    step, U1, V1 = out
    assert torch.equal(U1[:, slot], torch.zeros_like(U1[:, slot]))
    assert torch.equal(V1[:, slot], torch.zeros_like(V1[:, slot]))
    assert torch.isfinite(step).all()
    assert rel_error(step, ref[0]) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,m,d,n_valid,slot", [(1, 1, 1, 0, 0), (5, 4, 3, 4, 2), (6, 3, 70, 1, 1)])
def test_opcheck(B, m, d, n_valid, slot, dtype, device):
    U, V, dz, dF, F, active = make_state(B, m, d, n_valid, dtype, device, seed=11)
    torch.library.opcheck(
        torch.ops.impflow.broyden_step.default, (U, V, dz, dF, F, active, slot, n_valid)
    )


# NaN and Inf: the fused kernels follow the reference (its docstring states the rules). Each
# input gets a value in element d // 2 of three samples: 0 (active), 17 (active; the second
# AVX-512 block in float32) and 36 (inactive: untouched, zero step).
NON_FINITE_INPUTS = ["F", "dz", "dF", "U_kept", "V_kept", "U_slot", "V_slot", "U_unread"]
NON_FINITE_SAMPLES = [0, 17, 36]


def assert_non_finite_match(out, ref, same_dtype_ref, context):
    """NaN where the float64 reference has NaN, the same infinities, and the finite values
    as close as assert_close_to_reference asks."""
    for name, o, r, s in zip(("step", "U", "V"), out, ref, same_dtype_ref):
        o = o.cpu()
        assert torch.equal(o.isnan(), r.isnan()), (
            f"{name}: NaN elsewhere than the reference {context}"
        )
        inf = r.isinf()
        assert torch.equal(o.isinf(), inf) and torch.equal(o[inf].double(), r[inf]), (
            f"{name}: infinities differ from the reference {context}"
        )
        assert torch.equal(s.isfinite(), r.isfinite()), f"reference in {s.dtype} {context}"
        finite = r.isfinite()
        assert_close_to_reference((o[finite],), (r[finite],), (s[finite],), f"{name} {context}")


def non_finite_cases(m):
    """(input, value, n_valid, slot): every input with NaN, Inf and -Inf, with an empty, a
    filling and a full history; history rows only where they are read (or, for U_unread, not)."""
    for n_valid, slot in [(0, 0), (m - 2, m - 2), (m, m // 2)]:
        for where in NON_FINITE_INPUTS:
            kept = 0 if slot != 0 else 1  # a valid row that stays
            if where.endswith("_kept") and kept >= n_valid:
                continue
            if where.endswith("_slot") and slot >= n_valid:
                continue  # the slot holds nothing yet: never read
            if where == "U_unread" and n_valid == m:
                continue
            for value in (float("nan"), float("inf"), float("-inf")):
                yield where, value, n_valid, slot


def poisoned_state(B, m, d, n_valid, slot, where, value, dtype, device, layout, seed):
    state = make_state(B, m, d, n_valid, dtype, "cpu", seed=seed, layout=layout)
    U, V, dz, dF, F, active = state
    active[NON_FINITE_SAMPLES[:2]] = True
    active[NON_FINITE_SAMPLES[2]] = False
    j = d // 2
    if where in ("F", "dz", "dF"):
        target = {"F": F, "dz": dz, "dF": dF}[where]
        target[NON_FINITE_SAMPLES, j] = value
    else:
        history = U if where.startswith("U") else V
        if where == "U_unread":  # rows from max(n_valid, slot + 1) on
            history[:, max(n_valid, slot + 1) :] = value
        else:
            row = slot if where.endswith("_slot") else (0 if slot != 0 else 1)
            history[NON_FINITE_SAMPLES, row, j] = value
    return [t.to(device) for t in state]


def check_non_finite_cases(d, layout, dtype, device):
    """The op against the float64 reference for every case of non_finite_cases."""
    B, m = 37, 5
    for where, value, n_valid, slot in non_finite_cases(m):
        context = f"({where} = {value}, n_valid={n_valid}, slot={slot}, d={d}, {layout})"
        state = poisoned_state(B, m, d, n_valid, slot, where, value, dtype, device, layout, d)
        U0, V0 = state[0].clone(), state[1].clone()
        same = reference_on_copies(*state, slot, n_valid, dtype)
        out, ref = run_both(*state, slot, n_valid)
        assert_non_finite_match(out, ref, same, context)
        step, U1, V1 = out
        off = NON_FINITE_SAMPLES[2]  # inactive
        assert torch.equal(step[off], torch.zeros_like(step[off])), context
        for new, old in ((U1, U0), (V1, V0)):
            torch.testing.assert_close(new[off], old[off], rtol=0, atol=0, equal_nan=True)
        if where == "F":  # the rule of the issue: no part of a step from a non-finite F
            assert step[NON_FINITE_SAMPLES[:2]].isnan().all(), context


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "d,layout",
    [(d, "contiguous") for d in (1, 2, 3, 4, 5, 64, 1031)]
    + [(d, "batch_minor") for d in (1, 2, 3, 4, 5, 64)],
)
def test_non_finite_inputs_match_reference(d, layout, dtype, device, monkeypatch):
    """NaN, Inf and -Inf in each input, with empty, filling and full histories: the fused
    step, U and V have NaN and Inf where the reference has them, the rest agrees (with F =
    [3, nan] the kernels stepped [3, nan], the reference [nan, nan])."""
    kernels = ["block", "split"] if device == "cuda" else [None]
    for kernel in kernels:
        if kernel:
            monkeypatch.setenv("IMPFLOW_CUDA_STEP", kernel)
        check_non_finite_cases(d, layout, dtype, device)


def test_non_finite_residual_of_the_issue():
    U, V = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    dz, dF = torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 0.0]])
    F, active = torch.tensor([[3.0, float("nan")]]), torch.ones(1, dtype=torch.bool)
    ref = broyden_step_reference(U.clone(), V.clone(), dz, dF, F, active, 0, 0)
    step = broyden_step(U, V, dz, dF, F, active, 0, 0)
    assert ref.isnan().all() and step.isnan().all()
    assert not U.any() and not V.any()  # the update is dropped


def test_empty_batch_returns_empty_step():
    U, V, dz, dF, F, active = make_state(1, 2, 3, 0, torch.float32, "cpu", seed=1)
    empty = [t[:0] for t in (U, V, dz, dF, F, active)]
    step = broyden_step(*empty, 0, 0)
    assert step.shape == (0, 3)


BAD_ARGS = [
    ("V must have the shape of U", lambda s: s.update(V=s["V"][:, :-1].contiguous())),
    ("dz, dF and F must have shape", lambda s: s.update(F=s["F"][:, :-1])),
    ("active must be a bool tensor", lambda s: s.update(active=s["active"].float())),
    ("dtype of U", lambda s: s.update(dF=s["dF"].double())),
    (
        "float32 or float64",
        lambda s: s.update(**{k: s[k].half() for k in ("U", "V", "dz", "dF", "F")}),
    ),
    ("must both be contiguous", lambda s: s.update(U=noncontiguous(s["U"]))),
    ("must both be contiguous", lambda s: s.update(U=batch_minor(s["U"]))),  # V stays contiguous
    ("slot must be in", lambda s: s.update(slot=4)),
    ("n_valid must be in", lambda s: s.update(n_valid=5)),
    ("slot must equal n_valid", lambda s: s.update(n_valid=2, slot=3)),
    ("U must have shape", lambda s: s.update(U=s["U"][0], V=s["V"][0])),
    # In-place outputs sharing memory with another argument gave silent garbage before.
    ("U is written in place and must not share memory with V", lambda s: s.update(V=s["U"])),
    (
        "U is written in place and must not share memory with F",
        lambda s: s.update(F=s["U"].view(-1)[:15].view(3, 5)),
    ),
    (
        "V is written in place and must not share memory with dz",
        lambda s: s.update(dz=s["V"].view(-1)[5:20].view(3, 5)),
    ),
]


@pytest.mark.parametrize("message,spoil", BAD_ARGS, ids=[b[0] for b in BAD_ARGS])
def test_bad_arguments(message, spoil):
    names = ("U", "V", "dz", "dF", "F", "active")
    state = dict(zip(names, make_state(3, 4, 5, 4, torch.float32, "cpu", seed=2)))
    state.update(slot=1, n_valid=4)
    spoil(state)
    with pytest.raises(RuntimeError, match=message):
        broyden_step(*(state[k] for k in names), state["slot"], state["n_valid"])


NAMES = ("U", "V", "dz", "dF", "F", "active")


@pytest.mark.parametrize("which", NAMES)
def test_a_meta_tensor_among_cpu_ones_is_refused(which):
    """A meta tensor sends the call to the fake kernel (the dispatcher takes the device of
    highest priority): it returned an empty step and updated nothing, silently."""
    state = dict(zip(NAMES, make_state(3, 4, 5, 2, torch.float32, "cpu", seed=6)))
    state[which] = state[which].to("meta")
    if which == "U":
        message = "broyden_step: V must be on U's device \\(meta\\), got cpu"
    else:
        message = f"broyden_step: {which} must be on U's device \\(cpu\\), got meta"
    args = [state[k] for k in NAMES] + [2, 2]
    with pytest.raises(RuntimeError, match=message):
        broyden_step(*args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.impflow.broyden_step(*args)


def test_all_meta_tensors_reach_the_fake_kernel():
    state = make_state(3, 4, 5, 2, torch.float32, "meta", seed=6)
    step = broyden_step(*state, 2, 2)
    assert step.device.type == "meta" and step.shape == (3, 5)


def test_no_kernel_for_the_chosen_device_names_the_argument(monkeypatch):
    """In a build without CUDA kernels a CUDA tensor among CPU ones finds no kernel; the
    wrapper then names it. Simulated: a stand-in op raises as the dispatcher does, and a meta
    tensor plays the CUDA one."""

    def no_kernel(*args):
        raise NotImplementedError("Could not run 'impflow::broyden_step' with arguments ...")

    monkeypatch.setattr(torch.ops.impflow, "broyden_step", no_kernel)
    state = make_state(3, 4, 5, 2, torch.float32, "cpu", seed=6)
    mixed = state[:3] + [state[3].to("meta")] + state[4:]
    with pytest.raises(RuntimeError, match="dF must be on U's device \\(cpu\\), got meta"):
        broyden_step(*mixed, 2, 2)
    with pytest.raises(NotImplementedError, match="Could not run"):  # one device: as it was
        broyden_step(*state, 2, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("which", NAMES[1:])
def test_a_cpu_tensor_among_cuda_ones_is_refused(which):
    state = dict(zip(NAMES, make_state(3, 4, 5, 2, torch.float32, "cuda", seed=6)))
    state[which] = state[which].cpu()
    with pytest.raises(RuntimeError, match=f"{which} must be on U's device \\(cuda:0\\)"):
        broyden_step(*(state[k] for k in NAMES), 2, 2)


def test_gradients_through_the_op_are_refused():
    # Not differentiable: an output of inputs that require grad must not let a gradient pass
    # as None or zeros (torch's default for an op without an autograd kernel).
    U, V, dz, dF, F, active = make_state(3, 4, 5, 2, torch.float64, "cpu", seed=4)
    step = broyden_step(U, V, dz.requires_grad_(True), dF, F, active, 2, 2)
    assert step.requires_grad
    with pytest.raises(RuntimeError, match="derivative for impflow::broyden_step is not impl"):
        step.sum().backward()


def test_compiler_vectorised_kernel_without_avx512():
    """With IMPFLOW_DISABLE_AVX512=1 the batch-minor layout (d <= 4) runs the kernel that CPUs
    without AVX-512 use; a fresh process, since the switch is read once."""
    script = (
        "import torch, impflow\n"
        "from test_broyden_step import make_state, run_both, reference_on_copies, "
        "assert_close_to_reference, check_non_finite_cases\n"
        "for dtype in (torch.float32, torch.float64):\n"
        "    for B, m, d in ((7, 5, 1), (256, 30, 2), (33, 5, 3), (9, 4, 4)):\n"
        "        state = make_state(B, m, d, m, dtype, 'cpu', seed=B + d, layout='batch_minor',\n"
        "                           active_fraction=0.7)\n"
        "        same = reference_on_copies(*state, m // 2, m, dtype)\n"
        "        out, ref = run_both(*state, m // 2, m)\n"
        "        assert_close_to_reference(out, ref, same, f'{B} {m} {d} {dtype}')\n"
        "    for d in (1, 2, 3, 4):\n"
        "        check_non_finite_cases(d, 'batch_minor', dtype, 'cpu')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "IMPFLOW_DISABLE_AVX512": "1"}
    tests = os.path.dirname(os.path.abspath(__file__))
    paths = [tests, os.path.dirname(tests), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# The split CUDA kernels (csrc/cuda/broyden_step_split.cuh), opt-in with IMPFLOW_CUDA_STEP=split:
# samples cut into chunks of 512 elements, so d = 513, 1024, 1537 give a short last chunk, one
# full chunk, and three chunks with a remainder.
SPLIT_SHAPES = [(1, 1, 1), (7, 5, 3), (7, 30, 64), (7, 5, 513), (3, 30, 1024), (5, 30, 1537)]
SPLIT_SHAPES += [(256, 30, 3072)]


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "batch_minor"])
@pytest.mark.parametrize("B,m,d", SPLIT_SHAPES)
def test_split_cuda_kernel_matches_reference(B, m, d, layout, dtype, device, monkeypatch):
    if B * m * d > 1_000_000 and (dtype == torch.float64 or layout == "batch_minor"):
        pytest.skip("the largest shape runs once (float32, contiguous)")
    monkeypatch.setenv("IMPFLOW_CUDA_STEP", "split")
    for n_valid, slot in {(0, 0), (m - 1, m - 1), (m, m // 2)}:
        state = make_state(
            B, m, d, n_valid, dtype, device, seed=B + m + d, active_fraction=0.7, layout=layout
        )
        U0, V0, active = state[0].clone(), state[1].clone(), state[5]
        same = reference_on_copies(*state, slot, n_valid, dtype)
        out, ref = run_both(*state, slot, n_valid)
        assert_close_to_reference(out, ref, same, f"(n_valid={n_valid}, slot={slot})")
        step, U1, V1 = out
        idle = ~active
        assert torch.equal(step[idle], torch.zeros_like(step[idle]))
        assert torch.equal(U1[idle], U0[idle]) and torch.equal(V1[idle], V0[idle])


@pytest.mark.parametrize("device", DEVICES[1:])
def test_split_cuda_kernel_opcheck_and_switch(device, monkeypatch):
    state = make_state(6, 3, 700, 3, torch.float64, device, seed=11)
    monkeypatch.setenv("IMPFLOW_CUDA_STEP", "split")
    torch.library.opcheck(torch.ops.impflow.broyden_step.default, (*state, 1, 3))
    monkeypatch.setenv("IMPFLOW_CUDA_STEP", "blocks")
    with pytest.raises(RuntimeError, match="IMPFLOW_CUDA_STEP must be 'block' or 'split'"):
        broyden_step(*state, 1, 3)


@pytest.mark.parametrize("kernel", ["block", "split"])
@pytest.mark.parametrize("dtype, max_m", [(torch.float64, 255), (torch.float32, 511)])
@pytest.mark.parametrize("device", DEVICES[1:])
def test_cuda_history_limit_is_checked_at_the_first_step(device, dtype, max_m, kernel, monkeypatch):
    # The kernels keep a block's partial dots in 48 KiB of shared memory. The longest history
    # they hold runs when full; one slot more is refused at n_valid = 0, so a solve with it
    # stops at its first step, not after max_m of them.
    monkeypatch.setenv("IMPFLOW_CUDA_STEP", kernel)
    state = make_state(3, max_m, 5, max_m, dtype, device, seed=max_m)
    same = reference_on_copies(*state, 7, max_m, dtype)
    out, ref = run_both(*state, 7, max_m)
    assert_close_to_reference(out, ref, same, f"(m = n_valid = {max_m})")
    state = make_state(3, max_m + 1, 5, 0, dtype, device, seed=1)
    with pytest.raises(RuntimeError, match=f"at most {max_m} history slots .* got m = {max_m + 1}"):
        broyden_step(*state, 0, 0)
