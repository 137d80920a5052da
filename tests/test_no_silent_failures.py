"""No solver reports a convergence it did not reach.

Generated problems that a solver cannot or need not solve: functions without a root, roots
that fixed-point steps run away from, residuals that overflow the dtype, and functions that
turn NaN/Inf part of the way. For all three solvers and both implementations, each returned
sample is checked by evaluating ``fn`` again at the returned iterate:

- a sample reported converged has a finite iterate whose ``||fn(z)||`` (in "rel" mode
  divided by ``min(||z||, reach)``, with the reach ``||z0|| + 1000 ||fn(z0)||``) meets tol,
  or, only within the reach, the dtype's precision floor at the iterate
  (``eps * (||z|| + sqrt(n))``, or ``eps`` in "rel" mode);
- the statistics agree with that evaluation (``residual`` is ``||fn(z)||``);
- for the rootless families (whose residual never drops below 0.1), no sample is converged
  in "abs" mode;
- a solve with an unconverged sample warns.
"""

import math
import warnings

import pytest
import torch

from impflow.solvers import SolverWarning, anderson, broyden, fixed_point

METHODS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}

pytestmark = pytest.mark.usefixtures("one_thread")


def rootless(gen, dtype):
    """Elementwise functions whose |value| stays >= 0.1 everywhere: no root, nothing near one."""
    kind = int(torch.randint(0, 5, (), generator=gen))
    c = 0.1 + 3 * float(torch.rand((), generator=gen))
    big = {torch.float32: 3e38, torch.float64: 1e300}[dtype]
    return [
        lambda z: torch.atan(z) - (math.pi / 2 + c),  # runs away towards +inf
        lambda z: torch.sin(z) + 1 + c,
        lambda z: torch.tanh(3 * z) - 1 - c,
        lambda z: torch.full_like(z, big),  # the iterate overflows after a step or two
        lambda z: torch.exp(torch.clamp(z, max=700)) + c,  # overflows in float32
    ][kind], True


def with_roots(gen, dtype):
    """Functions with roots that the methods may or may not find: expanding linear maps,
    a cubic, a sample-coupled map, and a NaN-producing square root."""
    kind = int(torch.randint(0, 4, (), generator=gen))
    if kind == 0:
        scale = 1 + 3 * float(torch.rand((), generator=gen))  # fixed-point steps diverge
        return lambda z: scale * (z - 0.5), False
    if kind == 1:
        return lambda z: z**3 - 2 * z + 1.5, False
    if kind == 2:
        # Each sample's elements coupled through a random rotation-like mix.
        return lambda z: torch.roll(z, 1, dims=-1) * 1.5 - z + 0.25, False
    return lambda z: torch.sqrt(z) - 2, False  # NaN wherever an iterate turns negative


CASES = [(seed, family) for seed in range(24) for family in ("rootless", "with_roots")]


def problem(seed, family):
    gen = torch.Generator().manual_seed(seed)
    dtype = (torch.float32, torch.float64)[seed % 2]
    fn, no_root = (rootless if family == "rootless" else with_roots)(gen, dtype)
    B, d = 6, int((1, 2, 5)[seed % 3])
    z0 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    z0 = (z0 * 10.0 ** torch.randint(-2, 3, (B, 1), generator=gen)).to(dtype)
    options = dict(
        tol=float(10.0 ** -int(torch.randint(3, 13, (), generator=gen))),  # below floors too
        stop_mode=("abs", "rel")[(seed // 2) % 2],
        max_iter=int(torch.randint(5, 60, (), generator=gen)),
    )
    return fn, z0, no_root, options


def norms(x):
    """Per-sample 2-norms in float64, scaled so that squares of 1e200 do not overflow."""
    x = x.double().reshape(x.shape[0], -1)
    big = x.abs().amax(1, keepdim=True)
    scale = torch.where(torch.isfinite(big) & (big > 0), big, 1.0)
    return scale[:, 0] * torch.linalg.vector_norm(x / scale, dim=1)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("seed,family", CASES)
def test_converged_only_where_fn_meets_the_tolerance(seed, family, method, impl):
    fn, z0, no_root, options = problem(seed, family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, stats = METHODS[method](fn, z0, impl=impl, **options)
    eps = torch.finfo(z0.dtype).eps
    n = z0[0].numel()
    with torch.no_grad():
        F = fn(z)
    residual = norms(F)
    z_norm = norms(z)
    tol = options["tol"]
    with torch.no_grad():
        reach = norms(z0) + 1e3 * norms(fn(z0))
    within = z_norm <= reach * (1 + 1e-9)
    if options["stop_mode"] == "abs":
        measure = residual
        floor = eps * (z_norm + math.sqrt(n))
    else:
        measure = residual / (torch.minimum(z_norm, reach) + 1e-12)
        floor = torch.full_like(residual, eps)
    for b in range(z.shape[0]):
        where = f"sample {b}: residual {float(residual[b]):.3e}, |z| {float(z_norm[b]):.3e}"
        if bool(stats.converged[b]):
            assert bool(torch.isfinite(z[b]).all()), "converged with a non-finite iterate, " + where
            assert bool(torch.isfinite(F[b]).all()), where
            # tol met, or (only within the reach) the precision floor at the iterate met
            met = float(measure[b]) <= tol * (1 + 1e-9)
            at_floor = bool(within[b]) and float(measure[b]) <= float(floor[b]) * (1 + 1e-9)
            assert met or at_floor, where
            if not bool(within[b]):  # and beyond the reach, tol resolved at the iterate
                assert float(stats.tol_floor[b]) <= tol, where
            # The statistics say the same.
            assert float(measure[b]) <= max(tol, float(stats.tol_floor[b])) * (1 + 1e-9), where
        if math.isfinite(float(stats.residual[b])):
            # The reported residual is the returned iterate's.
            assert bool(torch.isfinite(z[b]).all()), where
            assert float(stats.residual[b]) == pytest.approx(float(residual[b]), rel=1e-5), where
    if no_root and options["stop_mode"] == "abs":
        # (In "rel" mode a residual of 0.1 meets tol * min(||z||, reach) far enough away:
        # the measure's definition, checked above.)
        assert not bool(stats.converged.any()), f"converged without a root: {stats.summary()}"
    if not stats.all_converged:
        assert any(issubclass(w.category, SolverWarning) for w in caught)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "fn,dtype,stop_mode",
    [
        (lambda z: torch.atan(z) - 2, torch.float64, "abs"),
        (lambda z: torch.sin(z) + 1.5, torch.float64, "abs"),
        (lambda z: torch.tanh(z) - 2, torch.float32, "abs"),
        (lambda z: torch.full_like(z, 3e38), torch.float32, "abs"),
        (lambda z: torch.full_like(z, 2e38), torch.float32, "rel"),
        (lambda z: torch.atan(z) - 2, torch.float64, "rel"),
    ],
    ids=["atan-2", "sin+1.5", "tanh-2-f32", "const-3e38", "const-2e38-rel", "atan-2-rel"],
)
def test_reported_cases_without_a_root_are_not_converged(fn, dtype, stop_mode, method, impl):
    """The cases of the report: each was "converged" (no warning) with a residual of 0.6 or
    more, or with an infinite iterate."""
    z0 = torch.zeros(1, 2, dtype=dtype)
    with pytest.warns(SolverWarning, match="did not reach"):
        z, stats = METHODS[method](fn, z0, stop_mode=stop_mode, impl=impl)
    assert not bool(stats.converged.any())
    assert bool(torch.isfinite(z).all())


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_huge_float64_iterates_are_not_taken_for_nan(method, impl):
    """||z||^2 overflows float64 above about 1e154: the norms must not (a sample of one
    element, started at 1e200, solves z = 1 instead of being given up as non-finite)."""
    z0 = torch.tensor([[1e200], [-3e180], [2.0]], dtype=torch.float64)
    z, stats = METHODS[method](lambda z: 1 - z, z0, impl=impl)
    assert stats.all_converged and not bool(stats.nonfinite.any())
    torch.testing.assert_close(z, torch.ones_like(z))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_dimensional_z0_is_refused(method):
    """A (d,) z0 was taken as d samples of one element: with an fn coupling them, the
    statistics judged each element alone."""
    with pytest.raises(ValueError, match=r"z0 must have a batch dimension.*z0\[None\]"):
        METHODS[method](lambda z: z.roll(1) - z, torch.zeros(64, dtype=torch.float64))


class _AtanMinusIdentity(torch.nn.Module):
    def forward(self, x):
        return torch.atan(x) - x


def test_block_inverse_without_a_root_is_not_converged():
    """``x + g_x(x) = atan(x)`` never reaches 6: the inverse ran to |x| = 1e18, where rounding
    makes the evaluated residual exactly 0, and reported that as converged."""
    from impflow.nn import ImplicitBlock, ImplicitSolveError

    block = ImplicitBlock(_AtanMinusIdentity(), torch.nn.Identity())
    z = torch.full((1, 2), 3.0, dtype=torch.float64)
    with pytest.warns(SolverWarning, match="did not converge"):
        block.inverse(z, logdet=False)
    assert not bool(block.last_stats.inverse.converged.any())
    strict = ImplicitBlock(_AtanMinusIdentity(), torch.nn.Identity(), on_failure="raise")
    with pytest.raises(ImplicitSolveError, match="did not converge"):
        strict.inverse(z, logdet=False)


def test_runaway_samples_are_named_in_the_warning_and_summary():
    z0 = torch.zeros(3, 2, dtype=torch.float64)
    z0[0] = 0.5  # the other two samples run away alike

    def fn(z):
        out = torch.atan(z) - 2
        out[0] = 0.3 - z[0]  # a root
        return out

    with pytest.warns(SolverWarning, match="2 ran beyond"):
        _, stats = broyden(fn, z0)
    assert stats.runaway.tolist() == [False, True, True]
    assert stats.summary().endswith("ran away 2")
