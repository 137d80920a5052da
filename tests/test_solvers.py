"""Behaviour of the batched root finders (DESIGN.md §2): convergence to known roots,
per-sample statistics, agreement with scipy and between Broyden implementations, frozen
converged samples, the ring buffer, the registry, the relative stopping rule and the
precision floor of the tolerance."""

import math
import random
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch

import impflow
from impflow.solvers import SolverStats, SolverWarning, anderson, broyden, fixed_point, solve
from testing import DEVICES, DTYPES

METHODS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}
BROYDEN_MODULE = sys.modules["impflow.solvers.broyden"]  # `impflow.solvers.broyden` is the function


# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(B, n, generator, dtype=torch.float64):
    Q, R = torch.linalg.qr(torch.randn(B, n, n, generator=generator, dtype=torch.float64))
    # Fix the signs so that Q is Haar-distributed, then make det Q = +1: a reflection
    # (det -1) can be symmetric (always for n = 2), a random rotation is not.
    Q = Q * torch.sign(torch.diagonal(R, dim1=1, dim2=2))[:, None, :]
    flip = torch.ones(B, n, dtype=torch.float64)
    flip[:, 0] = torch.sign(torch.linalg.det(Q))
    return (Q * flip[:, None, :]).to(dtype)


def contraction_problem(B, shape, L, *, kind="tanh", dtype=torch.float64, seed=0, scale=1.0):
    """Root-form problem ``fn(z) = g(z) - g(z*) + z* - z`` with known root ``z*``, where
    ``g`` has Lipschitz constant ``L`` (per sample, 2-norm) and a non-symmetric Jacobian.

    kind "tanh": ``g(z) = L Q tanh(z)``, Q random orthogonal; kind "linear": ``g(z) = A z``
    with ``A = L * U diag(s) W^T``, ``max s = 1`` (so ``||A||_2 = L``).
    Returns (fn, z_star, M) with M the (B, n, n) matrix of g."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "tanh":
        M = L * _orthogonal(B, n, gen)
    elif kind == "linear":
        U, W = _orthogonal(B, n, gen), _orthogonal(B, n, gen)
        s = torch.rand(B, n, generator=gen, dtype=torch.float64) * 0.9 + 0.1
        s[:, 0] = 1.0
        M = L * U @ torch.diag_embed(s) @ W.transpose(1, 2)
    elif kind == "orthogonal_linear":  # spectral radius = norm = L: slow for fixed point
        M = L * _orthogonal(B, n, gen)
    else:
        raise AssertionError(kind)
    if n > 1:
        assert not torch.allclose(M, M.transpose(1, 2)), "Jacobian should be non-symmetric"
    M = M.to(dtype)
    z_star = (scale * torch.randn(B, *shape, generator=gen, dtype=torch.float64)).to(dtype)
    act = torch.tanh if kind == "tanh" else (lambda x: x)

    def g(z):
        return torch.einsum("bij,bj->bi", M, act(z.reshape(z.shape[0], n))).reshape(z.shape)

    g_star = g(z_star)

    def fn(z):
        return g(z) - g_star + z_star - z

    return fn, z_star, M


def flat_norm(x):
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def check_stats(stats, B, method):
    assert isinstance(stats, SolverStats)
    assert stats.method == method
    for name in (
        "nstep",
        "residual",
        "rel_residual",
        "converged",
        "diverged",
        "nonfinite",
        "tol_floor",
    ):
        assert getattr(stats, name).shape == (B,), name
    assert stats.nstep.dtype == torch.long
    assert stats.converged.dtype == torch.bool
    assert stats.diverged.dtype == torch.bool
    assert stats.nonfinite.dtype == torch.bool
    assert int(stats.nstep.min()) >= 0
    assert int(stats.nstep.max()) <= stats.max_iter
    # One call for z0, then one per iteration of the longest-running sample.
    assert stats.n_fn_evals == int(stats.nstep.max()) + 1


# --------------------------------------------------------------------------- known roots

SHAPES = [(1,), (2,), (3,), (64,), (3, 4, 5)]


@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["tanh", "linear"])
@pytest.mark.parametrize("L", [0.5, 0.99])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_solves_contraction_to_known_root(method, L, kind, shape, B):
    tol = 1e-9
    fn, z_star, _ = contraction_problem(
        B, shape, L, kind=kind, seed=zlib.crc32(repr((L, kind, shape, B)).encode())
    )
    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    max_iter = 10000 if method == "fixed_point" else 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)  # a converged solve must not warn
        z, stats = METHODS[method](fn, z0, max_iter=max_iter, tol=tol)
    check_stats(stats, B, method)
    assert z.shape == z0.shape and z.dtype == z0.dtype
    assert bool(stats.converged.all()), stats.summary()
    assert stats.all_converged
    assert not bool(stats.diverged.any()) and not bool(stats.nonfinite.any())
    assert bool((stats.residual <= tol).all()), stats.residual
    assert int(stats.nstep.max()) < max_iter
    # The reported residual is that of the returned iterate.
    res = flat_norm(fn(z))
    torch.testing.assert_close(stats.residual, res, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(
        stats.rel_residual, res / (flat_norm(z) + 1e-12), rtol=1e-9, atol=1e-15
    )
    # ||z - z*|| <= ||fn(z)|| / (1 - L) for a contraction g (plus rounding of fn itself).
    err = flat_norm(z - z_star)
    assert bool((err <= res / (1 - L) + 1e-11).all()), (err, res)
    assert bool((err <= 1e-6).all())


Z0_LAYOUTS = {
    # (4, 5, 3) starting points stored in other ways. Flattened to (4, 15), the first needs a
    # copy; the others stay strided views (batch as the fastest dimension, every other
    # sample of a larger batch, one sample broadcast to all).
    "transposed": lambda: torch.randn(4, 3, 5, dtype=torch.float64).transpose(1, 2),
    "batch last": lambda: torch.randn(5, 3, 4, dtype=torch.float64).permute(2, 0, 1),
    "sliced": lambda: torch.randn(8, 5, 3, dtype=torch.float64)[::2],
    "expanded": lambda: torch.randn(1, 5, 3, dtype=torch.float64).expand(4, 5, 3),
}


@pytest.mark.parametrize("layout", sorted(Z0_LAYOUTS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_z0_of_other_shapes_and_layouts(method, layout):
    # A non-contiguous z0 and a leaf requiring grad are accepted and neither is modified.
    fn, z_star, _ = contraction_problem(4, (5, 3), 0.7, seed=3)
    z0 = Z0_LAYOUTS[layout]()
    if layout != "expanded":  # an expanded tensor cannot require grad in place
        z0.requires_grad_()
    assert not z0.is_contiguous()
    before = z0.detach().clone()
    z, stats = METHODS[method](fn, z0, max_iter=500, tol=1e-10)
    assert stats.all_converged
    assert torch.equal(z0.detach(), before)
    assert not z.requires_grad
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, d", [(600, 2), (37, 64), (5, 300)])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_samples_solution_does_not_depend_on_its_batch(method, B, d, device, dtype):
    # Solved alone, in a slice of the batch or in the whole batch, a sample gets the same
    # iterate and step count: the kernels' vector lanes, thread splits and history layouts
    # (batch-minor for d <= 4 on the CPU) must not leak between samples. Bitwise on the CPU,
    # with either step kernel for d <= 4 (IMPFLOW_DISABLE_AVX512=1 picks the compiler-vectorised
    # one); on CUDA, batched linear algebra (Anderson) may pick another algorithm per batch size.
    gen = torch.Generator().manual_seed(B + d)
    c = torch.randn(B, d, generator=gen, dtype=dtype).to(device)

    def coupled(c):
        return lambda z: 0.9 * torch.tanh(0.5 * (z + torch.roll(z, 1, dims=1))) + c - z

    tol = 1e-5 if dtype == torch.float32 else 1e-10
    solve_rows = lambda rows: METHODS[method](  # noqa: E731
        coupled(c[rows]), torch.zeros_like(c[rows]), tol=tol, max_iter=200
    )
    z, stats = solve_rows(slice(None))
    assert stats.all_converged
    for rows in (slice(0, 1), slice(B - 1, B), slice(B // 3, B // 3 + 17), slice(1, None, 2)):
        z_part, stats_part = solve_rows(rows)
        if device == "cpu":
            assert torch.equal(z_part, z[rows]), rows
            assert torch.equal(stats_part.nstep, stats.nstep[rows]), rows
            assert torch.equal(stats_part.residual, stats.residual[rows]), rows
        else:
            torch.testing.assert_close(z_part, z[rows], atol=10 * tol, rtol=0)


# ---------------------------------------------------------------------------- float32


@pytest.mark.parametrize("shape", [(3,), (64,), (3, 4, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_float32_default_tol(method, shape):
    B = 5
    fn, z_star, _ = contraction_problem(B, shape, 0.9, dtype=torch.float32, seed=11)
    z0 = torch.zeros(B, *shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        z, stats = METHODS[method](fn, z0, max_iter=500)  # default tol
    check_stats(stats, B, method)
    assert z.dtype == torch.float32
    assert stats.all_converged, stats.summary()
    assert int(stats.nstep.max()) < 500
    F = fn(z).reshape(B, -1)
    assert float(F.abs().max()) <= 1e-5
    # Converged means below max(tol, floor), the floor being a few ulps per element.
    assert bool((stats.residual <= torch.clamp(stats.tol_floor, min=stats.tol)).all())
    assert bool((stats.tol_floor < 1e-4).all())
    err = flat_norm(z - z_star)
    assert bool((err <= 1e-3).all()), err


# ------------------------------------------------------------------------------ scipy


@pytest.mark.parametrize("d", [2, 3, 5])
def test_broyden_matches_scipy_root(d):
    import scipy.optimize as scipy_optimize  # a test requirement: never skipped

    B = 4
    gen = torch.Generator().manual_seed(100 + d)
    M = 0.9 * _orthogonal(B, d, gen)
    b = torch.randn(B, d, generator=gen, dtype=torch.float64)
    c = torch.randn(B, d, generator=gen, dtype=torch.float64)

    def fn(z):  # unique root: z -> 0.9 Q tanh(z + c) + b is a contraction
        return torch.einsum("bij,bj->bi", M, torch.tanh(z + c)) + b - z

    z0 = torch.zeros(B, d, dtype=torch.float64)
    z, stats = broyden(fn, z0, max_iter=200, tol=1e-12)
    assert stats.all_converged, stats.summary()
    for i in range(B):
        Mi, bi, ci = M[i].numpy(), b[i].numpy(), c[i].numpy()
        fi = lambda x: Mi @ np.tanh(x + ci) + bi - x  # noqa: E731
        sol = scipy_optimize.root(fi, np.zeros(d), method="hybr", options={"xtol": 1e-13})
        assert np.linalg.norm(fi(sol.x)) < 1e-12, sol.message
        np.testing.assert_allclose(z[i].numpy(), sol.x, rtol=0, atol=1e-8)


# ------------------------------------------------------------------------- efficiency


def test_broyden_needs_fewer_evaluations_than_fixed_point_near_lipschitz_one():
    B, d = 3, 8
    # g(z) = 0.99 Q z: spectral radius 0.99, so fixed-point error shrinks by only 0.99 per step.
    fn, z_star, _ = contraction_problem(B, (d,), 0.99, kind="orthogonal_linear", seed=5)
    z0 = torch.zeros(B, d, dtype=torch.float64)
    z_fp, s_fp = fixed_point(fn, z0, max_iter=10000, tol=1e-9)
    z_b, s_b = broyden(fn, z0, max_iter=200, tol=1e-9)
    assert s_fp.all_converged and s_b.all_converged
    # log(1e-9 / ||F(z0)||) / log(0.99) is about 2000 fixed-point steps.
    assert s_fp.n_fn_evals > 1000
    # On a linear problem Broyden terminates in at most 2d steps (Gay 1979).
    assert s_b.n_fn_evals <= 2 * d + 2, s_b.summary()
    assert s_b.n_fn_evals * 20 < s_fp.n_fn_evals
    torch.testing.assert_close(z_b, z_star, atol=1e-8, rtol=0)
    torch.testing.assert_close(z_fp, z_star, atol=1e-6, rtol=0)


# -------------------------------------------------------------- fused vs reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("history", [3, 30])
def test_broyden_fused_and_reference_agree(history, dtype):
    B, shape = 6, (4, 8)
    fn, z_star, _ = contraction_problem(B, shape, 0.95, dtype=dtype, seed=21)
    z0 = torch.zeros(B, *shape, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    z_f, s_f = broyden(fn, z0, max_iter=300, tol=tol, history=history, impl="fused")
    z_r, s_r = broyden(fn, z0, max_iter=300, tol=tol, history=history, impl="reference")
    assert s_f.all_converged and s_r.all_converged
    # history=3 wraps the ring buffer many times.
    assert int(s_f.nstep.max()) > history or history == 30
    # The reference's einsums round differently from the fused kernel, and differently on
    # another CPU (BLAS picks its kernels by instruction set): a sample whose residual lands
    # within rounding of tol may stop one step earlier in one of them. All others agree.
    same = s_f.nstep == s_r.nstep
    assert int((~same).sum()) <= 1 and int((s_f.nstep - s_r.nstep).abs().max()) <= 1
    assert abs(s_f.n_fn_evals - s_r.n_fn_evals) <= 1
    assert torch.equal(s_f.converged, s_r.converged)
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(z_f[same], z_r[same], atol=atol, rtol=0)
    torch.testing.assert_close(s_f.residual[same], s_r.residual[same], atol=atol, rtol=0)
    # |z - z*| <= |F(z)| / (1 - L) for either stop
    torch.testing.assert_close(z_f, z_r, atol=2 * tol / (1 - 0.95), rtol=0)


@pytest.mark.parametrize("case", range(16))
def test_fused_and_reference_agree_on_random_problems(case):
    # Seeded random configurations: batches that leave vector tails, per-sample sizes of both
    # CPU history layouts (batch-minor for n <= 4), histories that wrap, both stop modes,
    # strided starting points, easy and stiff contractions, roots of several scales.
    rng = random.Random(case)
    B = rng.choice([1, 5, 17, 600])
    shape = rng.choice([(1,), (2,), (3,), (4,), (9,), (2, 3)])
    method = rng.choice(["broyden", "broyden", "anderson"])
    options = {
        "history": rng.choice([1, 2, 5, 30]),
        "stop_mode": rng.choice(["abs", "rel"]),
        "tol": 1e-9,
        "max_iter": 400,
    }
    L = rng.uniform(0.5, 0.99)
    fn, z_star, _ = contraction_problem(B, shape, L, seed=100 + case, scale=rng.choice([0.1, 10]))
    z0 = torch.randn(*shape[::-1], B, dtype=torch.float64).permute(
        -1, *range(len(shape) - 1, -1, -1)
    )
    runs = [METHODS[method](fn, z0, impl=impl, **options) for impl in ("fused", "reference")]
    (z_f, s_f), (z_r, s_r) = runs
    assert s_f.all_converged and s_r.all_converged, (s_f.summary(), s_r.summary())
    # Rounding may move a sample whose residual lands within rounding of tol by one step.
    same = s_f.nstep == s_r.nstep
    assert int((~same).sum()) <= max(1, B // 100), (s_f.nstep[~same], s_r.nstep[~same])
    assert int((s_f.nstep - s_r.nstep).abs().max()) <= 1
    scale = 1.0 if options["stop_mode"] == "abs" else 1.0 + float(flat_norm(z_star).max())
    torch.testing.assert_close(z_f[same], z_r[same], atol=1e-11 * scale, rtol=1e-11)
    bound = 2 * options["tol"] * scale / (1 - L)  # |z - z*| <= |F(z)| / (1 - L) for either
    torch.testing.assert_close(z_f, z_r, atol=bound, rtol=0)


@pytest.mark.parametrize("case", range(12))
def test_fused_and_reference_agree_when_samples_fail(case):
    # Seeded random problems where some samples cannot converge: maps with Lipschitz constants
    # up to 1.6 across the batch (divergence, fixed-point fallback), fn turning NaN for some
    # samples after one or two calls, short max_iter. Both paths must flag the same samples the
    # same way, stop them at the same step and return the same finite iterates.
    rng = random.Random(1000 + case)
    B, n = rng.choice([1, 17, 600]), rng.choice([1, 2, 3, 9])
    method = rng.choice(["broyden", "broyden", "anderson", "fixed_point"])
    gen = torch.Generator().manual_seed(case)
    M = _orthogonal(B, n, gen) * torch.linspace(0.3, rng.uniform(1.1, 1.6), B)[:, None, None]
    c = torch.randn(B, n, generator=gen, dtype=torch.float64) * rng.choice([0.1, 3.0])
    poisoned = torch.rand(B, generator=gen) < 0.1
    poisoned[0] = True  # at least one sample fails in every case
    poison_after = rng.randint(1, 2)
    squash = rng.choice([torch.tanh, lambda x: x])

    def problem():
        calls = []

        def fn(z):
            calls.append(1)
            out = squash(torch.einsum("bij,bj->bi", M, z)) + c - z
            return torch.where(poisoned[:, None] & (len(calls) > poison_after), torch.nan, out)

        return fn

    options = {"max_iter": rng.choice([5, 40, 200]), "tol": 1e-9}
    options["stop_mode"] = rng.choice(["abs", "rel"])
    if method != "fixed_point":
        options["history"] = rng.choice([1, 3, 10])
    z0 = torch.zeros(B, n, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        (z_f, s_f), (z_r, s_r) = [
            METHODS[method](problem(), z0, impl=impl, **options) for impl in ("fused", "reference")
        ]
    assert bool(s_f.nonfinite[0]) and not bool(s_f.converged[0])  # a failure to agree on
    for name in ("converged", "diverged", "nonfinite", "nstep"):
        assert torch.equal(getattr(s_f, name), getattr(s_r, name)), name
    assert bool(torch.isfinite(z_f).all())
    torch.testing.assert_close(z_f, z_r, atol=1e-9, rtol=1e-9)


def test_broyden_fused_and_reference_agree_step_by_step(monkeypatch):
    # Same iterates, not only the same end point: record fn's inputs for both impls.
    B, shape = 3, (10,)
    fn, _, _ = contraction_problem(B, shape, 0.99, seed=8)
    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    runs = {}
    for impl in ("fused", "reference"):
        seen = []

        def recording(z, seen=seen):
            seen.append(z.clone())
            return fn(z)

        broyden(recording, z0, max_iter=40, tol=1e-12, history=5, impl=impl, warn=False)
        runs[impl] = torch.stack(seen)
    assert runs["fused"].shape == runs["reference"].shape
    assert runs["fused"].shape[0] > 10
    torch.testing.assert_close(runs["fused"], runs["reference"], atol=1e-9, rtol=1e-9)


def test_broyden_rejects_unknown_impl():
    fn, _, _ = contraction_problem(2, (3,), 0.5)
    with pytest.raises(ValueError, match="impl"):
        broyden(fn, torch.zeros(2, 3, dtype=torch.float64), impl="cuda")


# ---------------------------------------------------------- frozen converged samples


class Recorder:
    """Wraps fn and keeps every (input, output) pair it saw."""

    def __init__(self, fn):
        self.fn = fn
        self.inputs, self.outputs = [], []

    def __call__(self, z):
        out = self.fn(z)
        self.inputs.append(z.detach().clone())
        self.outputs.append(out.detach().clone())
        return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_converged_samples_stop_changing(method):
    B, shape = 5, (6,)
    fn, z_star, _ = contraction_problem(B, shape, 0.9, seed=31)
    z0 = torch.randn(B, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z0[0] = z_star[0]  # sample 0 starts at its root
    z0[3] = z_star[3] + 1e-3  # sample 3 starts close: converges early
    rec = Recorder(fn)
    z, stats = METHODS[method](rec, z0, max_iter=500, tol=1e-10)
    assert stats.all_converged, stats.summary()
    assert int(stats.nstep[0]) == 0
    assert torch.equal(z[0], z0[0])  # untouched, bit for bit
    assert int(stats.nstep[3]) < int(stats.nstep.max())
    assert int(stats.nstep.max()) > 5
    inputs = torch.stack(rec.inputs)  # (calls, B, ...)
    assert inputs.shape[0] == stats.n_fn_evals
    for b in range(B):
        k = int(stats.nstep[b])
        # After its last step, the sample's iterate stays exactly where it converged, and that
        # is the iterate returned.
        frozen = inputs[k:, b]
        assert torch.equal(frozen, frozen[:1].expand_as(frozen)), (
            f"sample {b} moved after converging"
        )
        assert torch.equal(z[b], inputs[k, b])


def test_anderson_combines_the_active_samples_only(monkeypatch):
    # 6 of 8 samples start at their roots: the least-squares combination sees the other two
    # only, and solves them as it would alone.
    module = sys.modules["impflow.solvers.anderson"]
    combine, rows_seen = module._anderson_combination, []

    def recording(Z, R, *args):
        rows_seen.append(R.shape[0])
        return combine(Z, R, *args)

    monkeypatch.setattr(module, "_anderson_combination", recording)
    fn, z_star, _ = contraction_problem(8, (5,), 0.9, seed=7)
    z0 = z_star.clone()
    z0[[2, 5]] = 0
    z, stats = anderson(fn, z0, max_iter=100, tol=1e-10)
    assert stats.all_converged, stats.summary()
    assert rows_seen and max(rows_seen) == 2  # and 1 once the first of them is done
    rows_seen.clear()
    alone, alone_stats = anderson(lambda t: fn_rows(fn, t, [2, 5], 8), z0[[2, 5]], tol=1e-10)
    assert max(rows_seen) == 2
    assert torch.equal(z[[2, 5]], alone)
    assert torch.equal(stats.nstep[[2, 5]], alone_stats.nstep)


def fn_rows(fn, t, rows, B):
    """``fn`` of a sub-batch: ``t`` placed at ``rows`` of a full batch (others zero)."""
    full = torch.zeros(B, *t.shape[1:], dtype=t.dtype)
    full[rows] = t
    return fn(full)[rows]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_returns_lowest_residual_iterate(method):
    # Few iterations on a hard problem: nothing converges and residuals are not monotone for
    # the accelerated methods; the returned iterate must be the best one seen, not the last.
    B, shape = 6, (12,)
    fn, _, _ = contraction_problem(B, shape, 0.99, kind="orthogonal_linear", seed=41)
    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    rec = Recorder(fn)
    with pytest.warns(SolverWarning, match="did not reach"):
        z, stats = METHODS[method](rec, z0, max_iter=12, tol=1e-12)
    assert not bool(stats.converged.any())
    assert torch.equal(stats.nstep, torch.full((B,), 12))
    inputs, outputs = torch.stack(rec.inputs), torch.stack(rec.outputs)
    res = torch.linalg.vector_norm(outputs.reshape(outputs.shape[0], B, -1), dim=2)  # (calls, B)
    best = res.argmin(0)
    torch.testing.assert_close(stats.residual, res.min(0).values, rtol=1e-12, atol=0)
    for b in range(B):
        assert torch.equal(z[b], inputs[best[b], b])
    # And that residual is what fn gives at the returned z.
    torch.testing.assert_close(stats.residual, flat_norm(fn(z)), rtol=1e-12, atol=0)
    if method == "fixed_point":
        # Contraction: fixed-point residuals shrink monotonically, the last iterate is best.
        assert bool((best == res.shape[0] - 1).all())


def test_broyden_returns_best_not_last_iterate():
    # Broyden's residual is not monotone: on this problem some samples' last iterate is
    # worse than an earlier one, and the earlier one must be returned.
    B, shape = 8, (12,)
    fn, _, _ = contraction_problem(B, shape, 0.99, kind="orthogonal_linear", seed=41)
    rec = Recorder(fn)
    z, stats = broyden(
        rec, torch.zeros(B, *shape, dtype=torch.float64), max_iter=12, tol=1e-12, warn=False
    )
    outputs = torch.stack(rec.outputs)
    res = torch.linalg.vector_norm(outputs.reshape(outputs.shape[0], B, -1), dim=2)
    not_last = res.argmin(0) != res.shape[0] - 1
    assert bool(not_last.any()), "the problem should make Broyden non-monotone"
    assert bool((stats.residual[not_last] < res[-1, not_last]).all())


# -------------------------------------------------------------------------- ring buffer


def test_broyden_ring_buffer_history_two(monkeypatch):
    calls = []
    fused = BROYDEN_MODULE._STEPS["fused"]

    def spy(U, V, dz, dF, F, active, slot, n_valid):
        calls.append((tuple(U.shape), slot, n_valid))
        return fused(U, V, dz, dF, F, active, slot, n_valid)

    monkeypatch.setitem(BROYDEN_MODULE._STEPS, "fused", spy)
    B, d = 3, 16
    fn, z_star, _ = contraction_problem(B, (d,), 0.9, seed=51)
    z, stats = broyden(
        fn, torch.zeros(B, d, dtype=torch.float64), max_iter=100, tol=1e-9, history=2
    )
    assert stats.all_converged, stats.summary()
    torch.testing.assert_close(z, z_star, atol=1e-7, rtol=0)
    assert len(calls) > 4  # the ring wrapped several times
    # Storage is (B, history, d) whatever max_iter is; slots cycle 0, 1, 0, 1, ...
    assert {shape for shape, _, _ in calls} == {(B, 2, d)}
    assert [slot for _, slot, _ in calls] == [i % 2 for i in range(len(calls))]
    assert [n for _, _, n in calls] == [min(i, 2) for i in range(len(calls))]


@pytest.mark.parametrize("method", ["broyden", "anderson"])
def test_history_one_and_two_converge(method):
    B, d = 3, 16
    fn, z_star, _ = contraction_problem(B, (d,), 0.5, seed=52)
    for history in (1, 2):
        z, stats = METHODS[method](
            fn, torch.zeros(B, d, dtype=torch.float64), max_iter=100, tol=1e-9, history=history
        )
        assert stats.all_converged, (history, stats.summary())
        torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)


# ----------------------------------------------------------------------------- registry


def test_registry_solve_runs_named_method():
    fn, z_star, _ = contraction_problem(3, (5,), 0.8, seed=61)
    z0 = torch.zeros(3, 5, dtype=torch.float64)
    z, stats = solve(fn, z0, method="anderson", history=3, tol=1e-10, max_iter=200)
    assert stats.method == "anderson" and stats.all_converged
    torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
    z, stats = solve(fn, z0, tol=1e-10)  # default method
    assert stats.method == "broyden" and stats.all_converged
    assert sorted(impflow.solvers.SOLVERS) == ["anderson", "broyden", "fixed_point"]
    for name in impflow.solvers.SOLVERS:
        z, stats = solve(fn, z0, method=name, tol=1e-9, max_iter=1000)
        assert stats.method == name and stats.all_converged


@pytest.mark.parametrize(
    "method, option",
    [
        ("anderson", "damping"),
        ("fixed_point", "history"),
        ("broyden", "mixing"),
        ("broyden", "tolerance"),
    ],
)
def test_registry_unknown_option_is_type_error(method, option):
    fn, _, _ = contraction_problem(2, (3,), 0.5)
    with pytest.raises(TypeError, match=option):
        solve(fn, torch.zeros(2, 3, dtype=torch.float64), method=method, **{option: 1})


def test_registry_unknown_method_is_value_error():
    fn, _, _ = contraction_problem(2, (3,), 0.5)
    with pytest.raises(ValueError, match="newton"):
        solve(fn, torch.zeros(2, 3, dtype=torch.float64), method="newton")


# ---------------------------------------------------------------------- relative stop


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stop_mode_rel(method):
    B, shape = 4, (8,)
    tol = 1e-8
    fn, z_star, _ = contraction_problem(B, shape, 0.8, kind="linear", seed=71, scale=1e4)
    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    z, stats = METHODS[method](fn, z0, max_iter=2000, tol=tol, stop_mode="rel")
    assert stats.stop_mode == "rel"
    assert stats.all_converged, stats.summary()
    res = flat_norm(fn(z))
    rel = res / flat_norm(z)
    assert bool((rel <= tol).all()), rel
    torch.testing.assert_close(stats.rel_residual, res / (flat_norm(z) + 1e-12), rtol=1e-9, atol=0)
    # ||z|| ~ 3e4: the absolute residual is far above tol, so "abs" would not have stopped here.
    assert bool((res > 10 * tol).all()), res
    z_abs, s_abs = METHODS[method](fn, z0, max_iter=2000, tol=tol, stop_mode="abs")
    assert s_abs.all_converged
    assert bool((s_abs.nstep >= stats.nstep).all()) and int(s_abs.nstep.sum()) > int(
        stats.nstep.sum()
    )
    assert bool((s_abs.residual <= tol).all())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_stop_mode_rel_not_converged_reports_false(method):
    # A sample counts as converged exactly when its relative residual reached max(tol, floor).
    B, shape = 4, (8,)
    fn, _, _ = contraction_problem(B, shape, 0.99, seed=72)
    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        z, stats = METHODS[method](fn, z0, max_iter=3, tol=1e-10, stop_mode="rel")
    expected = stats.rel_residual <= torch.clamp(stats.tol_floor, min=stats.tol)
    assert torch.equal(stats.converged, expected)
    assert not bool(stats.converged.any())


# ------------------------------------------------------------- precision floor of tol


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_tol_below_float32_floor_stops_early(method, stop_mode):
    B, shape = 5, (16,)
    fn, z_star, _ = contraction_problem(B, shape, 0.9, dtype=torch.float32, seed=81)
    z0 = torch.zeros(B, *shape, dtype=torch.float32)
    max_iter = 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)
        z, stats = METHODS[method](fn, z0, max_iter=max_iter, tol=1e-12, stop_mode=stop_mode)
    assert stats.all_converged, stats.summary()
    assert int(stats.nstep.max()) < max_iter // 5  # did not spin on an unreachable tol
    assert stats.tol == 1e-12
    assert bool((stats.tol_floor > stats.tol).all())
    measure = stats.residual if stop_mode == "abs" else stats.rel_residual
    assert bool((measure <= stats.tol_floor).all())
    assert bool((measure > stats.tol).all())  # 1e-12 is out of float32's reach
    torch.testing.assert_close(z, z_star, atol=1e-4, rtol=0)


def test_tol_floor_is_negligible_in_float64():
    fn, z_star, _ = contraction_problem(3, (16,), 0.9, seed=82)
    z, stats = broyden(fn, torch.zeros(3, 16, dtype=torch.float64), max_iter=200, tol=1e-9)
    assert stats.all_converged
    assert bool((stats.tol_floor < 1e-12).all())
    assert bool((stats.residual <= 1e-9).all())


# -------------------------------------------------------------- fn's output ownership


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fn_reusing_its_output_buffer(method):
    # A fn may hand back the same tensor on every call (a preallocated out= buffer, a CUDA
    # graph's static output). The solver must not keep a reference to an earlier output that
    # the next call overwrites: the iterates must be those of a fn with fresh outputs.
    # (Broyden used to see dF = F_new - F = 0 and silently fall back to fixed-point steps.)
    B, shape = 3, (8,)
    fn, z_star, _ = contraction_problem(B, shape, 0.95, seed=91)
    buffer = torch.empty(B, *shape, dtype=torch.float64)

    def fn_into_buffer(z):
        buffer.copy_(fn(z))
        return buffer

    z0 = torch.zeros(B, *shape, dtype=torch.float64)
    z_fresh, s_fresh = METHODS[method](fn, z0, max_iter=2000, tol=1e-10)
    z_buf, s_buf = METHODS[method](fn_into_buffer, z0, max_iter=2000, tol=1e-10)
    assert s_fresh.all_converged and s_buf.all_converged
    assert torch.equal(s_buf.nstep, s_fresh.nstep), (s_buf.summary(), s_fresh.summary())
    assert torch.equal(z_buf, z_fresh)
    torch.testing.assert_close(z_buf, z_star, atol=1e-8, rtol=0)
