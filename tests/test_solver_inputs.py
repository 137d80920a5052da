"""Bad input to the solvers fails with the right error type and a message naming the
argument; non-finite and diverging residuals are reported, never returned as NaN
(DESIGN.md §2)."""

import math
import warnings

import pytest
import torch

from impflow.solvers import SolverWarning, anderson, broyden, fixed_point, solve

METHODS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}
ALL = sorted(METHODS)
WITH_HISTORY = ["anderson", "broyden"]


# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def contraction(z):
    """Elementwise root form of the contraction ``z -> 0.5 tanh(z) + 0.3``."""
    return 0.5 * torch.tanh(z) + 0.3 - z


def z0_like(B=3, n=4, dtype=torch.float64):
    return torch.linspace(-1, 1, B * n, dtype=dtype).reshape(B, n)


def run(method, fn=contraction, z0=None, **options):
    return METHODS[method](fn, z0_like() if z0 is None else z0, **options)


def flat_norm(x):
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


# --------------------------------------------------------------------------------- z0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", ALL)
def test_nonfinite_z0(method, bad):
    z0 = z0_like()
    z0[1, 2] = bad
    with pytest.raises(ValueError, match=r"z0 contains NaN or Inf \(samples \[1\]\)"):
        run(method, z0=z0)


@pytest.mark.parametrize("method", ALL)
def test_huge_finite_z0_is_accepted(method):
    """Finite values whose sum overflows to Inf are still a valid starting point."""
    z0 = torch.full((4, 3), 3e38, dtype=torch.float32)
    assert not torch.isfinite(z0.sum())
    z, stats = run(method, z0=z0, fn=lambda z: 0.5 * torch.tanh(z) - z, max_iter=3, warn=False)
    assert z.shape == z0.shape and int(stats.nstep.max()) >= 1


@pytest.mark.parametrize("method", ALL)
def test_empty_batch(method):
    with pytest.raises(ValueError, match=r"z0 must have shape \(B, \.\.\.\) with B >= 1"):
        run(method, z0=torch.zeros(0, 3, dtype=torch.float64))


@pytest.mark.parametrize("method", ALL)
def test_empty_sample_and_scalar_z0(method):
    with pytest.raises(ValueError, match="z0 must have at least one element per sample"):
        run(method, z0=torch.zeros(3, 0, dtype=torch.float64))
    with pytest.raises(ValueError, match="z0 must have shape"):
        run(method, z0=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.bfloat16, torch.complex64]
)
@pytest.mark.parametrize("method", ALL)
def test_z0_wrong_dtype(method, dtype):
    with pytest.raises(TypeError, match="z0 must be float32 or float64"):
        run(method, z0=torch.ones(2, 3, dtype=dtype))


@pytest.mark.parametrize("method", ALL)
def test_z0_not_a_tensor(method):
    with pytest.raises(TypeError, match="z0 must be a torch.Tensor"):
        run(method, z0=[[0.0, 1.0]])


# --------------------------------------------------------------------------------- fn


@pytest.mark.parametrize("method", ALL)
def test_fn_not_callable(method):
    with pytest.raises(TypeError, match="fn must be callable"):
        run(method, fn=torch.zeros(3, 4))


@pytest.mark.parametrize("method", ALL)
def test_fn_returns_non_tensor(method):
    with pytest.raises(TypeError, match="fn must return a tensor"):
        run(method, fn=lambda z: z.tolist())


@pytest.mark.parametrize(
    "reshape",
    [lambda z: z[:, :-1], lambda z: z.reshape(-1), lambda z: z.reshape(3, 2, 2), lambda z: z[:2]],
    ids=["fewer-features", "flat", "more-dims", "fewer-samples"],
)
@pytest.mark.parametrize("method", ALL)
def test_fn_returns_wrong_shape(method, reshape):
    with pytest.raises(ValueError, match=r"fn must return the shape of z0 \(3, 4\)"):
        run(method, fn=lambda z: reshape(contraction(z)))


@pytest.mark.parametrize("method", ALL)
def test_fn_returns_wrong_dtype(method):
    with pytest.raises(
        TypeError, match="fn must return z0's dtype torch.float64, got torch.float32"
    ):
        run(method, fn=lambda z: contraction(z).float())


@pytest.mark.parametrize("method", ALL)
def test_fn_returns_wrong_device(method):
    with pytest.raises(ValueError, match="fn must return a tensor on z0's device cpu, got meta"):
        run(method, fn=lambda z: contraction(z).to("meta"))


@pytest.mark.parametrize("method", ALL)
def test_fn_wrong_output_mid_solve(method):
    # The checks hold for every call, not only the first one.
    calls = []

    def fn(z):
        calls.append(1)
        out = contraction(z)
        return out if len(calls) < 3 else out[:, :2]

    with pytest.raises(ValueError, match="fn must return the shape of z0"):
        run(method, fn=fn, tol=1e-12)
    assert len(calls) == 3


@pytest.mark.parametrize("shape", [(3, 4), (3, 2, 2)], ids=["flat", "shaped"])
@pytest.mark.parametrize("method", ALL)
def test_fn_modifying_its_input_in_place(method, shape):
    # It would move the solver's iterate behind its back: without the check, every method
    # ran to max_iter and reported non-convergence, with no word about why.
    calls = []

    def fn(z):
        calls.append(1)
        if len(calls) == 3:
            z.mul_(1.0001)  # a careless in-place op, on the third call only
        return contraction(z)

    z0 = z0_like().reshape(shape)
    with pytest.raises(ValueError, match="fn must not modify its input in place"):
        run(method, fn=fn, z0=z0, tol=1e-12)
    assert len(calls) == 3
    # Reading its input, or writing into its own result, is fine.
    z, stats = run(method, fn=lambda z: contraction(z).mul_(1.0), z0=z0)
    assert stats.all_converged
    with torch.inference_mode():  # inference tensors have no version counter to check
        z, stats = run(method, z0=z0_like().reshape(shape))
    assert stats.all_converged


# ---------------------------------------------------------------------- scalar options


@pytest.mark.parametrize("max_iter", [0, -1, 2.5, 3.0, "10", None, True])
@pytest.mark.parametrize("method", ALL)
def test_bad_max_iter(method, max_iter):
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        run(method, max_iter=max_iter)


@pytest.mark.parametrize("tol", [0, 0.0, -1, -1e-9, math.nan, math.inf, "1e-6", None])
@pytest.mark.parametrize("method", ALL)
def test_bad_tol(method, tol):
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        run(method, tol=tol)


@pytest.mark.parametrize("stop_mode", ["foo", "ABS", "relative", None])
@pytest.mark.parametrize("method", ALL)
def test_bad_stop_mode(method, stop_mode):
    with pytest.raises(ValueError, match="stop_mode must be 'abs' or 'rel'"):
        run(method, stop_mode=stop_mode)


@pytest.mark.parametrize("ratio", [1, 0.5, -3, math.nan, "big"])
@pytest.mark.parametrize("method", ALL)
def test_bad_divergence_ratio(method, ratio):
    with pytest.raises(ValueError, match="divergence_ratio must be a number > 1"):
        run(method, divergence_ratio=ratio)


@pytest.mark.parametrize("history", [0, -2, 2.5, True, None])
@pytest.mark.parametrize("method", WITH_HISTORY)
def test_bad_history(method, history):
    with pytest.raises(ValueError, match="history must be an integer >= 1"):
        run(method, history=history)


@pytest.mark.parametrize("method", WITH_HISTORY)
def test_bad_history_through_registry(method):
    with pytest.raises(ValueError, match="history must be an integer >= 1"):
        solve(contraction, z0_like(), method=method, history=0)


@pytest.mark.parametrize("damping", [0, -0.5, 1.5, math.nan])
def test_bad_damping(damping):
    with pytest.raises(ValueError, match="damping must be a number in \\(0, 1\\]"):
        fixed_point(contraction, z0_like(), damping=damping)


@pytest.mark.parametrize("mixing", [0, -0.5, 1.5, math.nan, True, "0.5", None])
def test_bad_mixing(mixing):
    with pytest.raises(ValueError, match="mixing must be a number in \\(0, 1\\]"):
        anderson(contraction, z0_like(), mixing=mixing)


@pytest.mark.parametrize("regularization", [-1e-8, math.nan, math.inf, True, "1e-8"])
def test_bad_regularization(regularization):
    with pytest.raises(ValueError, match="regularization must be a finite number >= 0"):
        anderson(contraction, z0_like(), regularization=regularization)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        broyden(contraction, z0_like(), impl="cuda")


@pytest.mark.parametrize("method", ALL)
def test_bad_input_does_not_call_fn(method):
    calls = []

    def fn(z):
        calls.append(1)
        return contraction(z)

    with pytest.raises(ValueError, match="tol"):
        run(method, fn=fn, tol=-1.0)
    assert calls == []


# --------------------------------------------------------------- non-finite residuals


class NaNAfter:
    """Root form of a contraction whose output turns NaN (or Inf) for the samples in
    ``bad`` from call ``after`` on (calls counted from 1)."""

    def __init__(self, bad, after, value=math.nan):
        self.bad, self.after, self.value = bad, after, value
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        out = contraction(z)
        if self.calls >= self.after:
            out = out.clone()
            out[self.bad] = self.value
        return out


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ALL)
def test_nonfinite_fn_mid_solve_for_some_samples(method, value):
    B = 5
    z0 = z0_like(B, 6)
    fn = NaNAfter(bad=[2], after=4, value=value)
    with pytest.warns(SolverWarning, match=r"the iterate or fn\(z\) was NaN/Inf for 1"):
        z, stats = METHODS[method](fn, z0, max_iter=200, tol=1e-10)
    assert fn.calls > 4
    assert bool(torch.isfinite(z).all())
    assert stats.nonfinite.tolist() == [False, False, True, False, False]
    assert stats.converged.tolist() == [True, True, False, True, True]
    assert math.isfinite(float(stats.residual[2]))
    # A non-finite residual stops the sample (after at most one fixed-point retry from its
    # best iterate) instead of iterating on NaNs until max_iter.
    assert int(stats.nstep[2]) <= 5, stats.nstep
    assert stats.n_fn_evals < 100
    # Sample 2 is returned at its best finite iterate: the one from before the NaNs
    # (after 3 calls it has moved towards the root, so it is better than z0).
    assert float(stats.residual[2]) < float(flat_norm(contraction(z0))[2])
    torch.testing.assert_close(stats.residual[2], flat_norm(contraction(z))[2], rtol=1e-12, atol=0)
    # The others are unaffected.
    good = [0, 1, 3, 4]
    assert bool((flat_norm(contraction(z))[good] <= 1e-10).all())


@pytest.mark.parametrize("method", ALL)
def test_nonfinite_fn_at_z0(method):
    # fn(z0) is already NaN for one sample: nothing to iterate from; z0 is returned for it.
    z0 = z0_like(4, 3)
    fn = NaNAfter(bad=[1], after=1)
    with pytest.warns(SolverWarning, match="did not reach"):
        z, stats = METHODS[method](fn, z0, max_iter=100, tol=1e-10)
    assert torch.equal(z[1], z0[1])
    assert stats.nonfinite.tolist() == [False, True, False, False]
    assert stats.converged.tolist() == [True, False, True, True]
    assert int(stats.nstep[1]) == 0


@pytest.mark.parametrize("method", ALL)
def test_nonfinite_everywhere_returns_z0(method):
    z0 = z0_like(2, 3)
    with pytest.warns(SolverWarning):
        z, stats = METHODS[method](lambda z: torch.full_like(z, math.nan), z0, max_iter=10)
    assert torch.equal(z, z0)
    assert stats.nonfinite.all() and not stats.converged.any()
    assert stats.n_fn_evals == 1  # no iteration from a NaN residual


# ------------------------------------------------------------------------- divergence


def no_root(z):
    """Sample 1 has no real root (z^2 + 1 > 0) and explodes under z <- z + fn(z); the
    other samples are contractions."""
    out = contraction(z).clone()
    out[1] = z[1] ** 2 + 1
    return out


@pytest.mark.parametrize("method", ["broyden", "fixed_point"])
def test_divergence_is_reported(method):
    z0 = torch.tensor([[1.0, 2.0], [0.3, -0.2], [-1.0, 0.5]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="1 diverged"):
        z, stats = run(method, fn=no_root, z0=z0, max_iter=200, tol=1e-10)
    assert bool(torch.isfinite(z).all())
    assert stats.diverged.tolist() == [False, True, False]
    assert stats.converged.tolist() == [True, False, True]
    # The returned iterate of the diverged sample is its best one, with the residual it has.
    torch.testing.assert_close(stats.residual, flat_norm(no_root(z)), rtol=1e-12, atol=0)
    assert float(stats.residual[1]) <= float(flat_norm(no_root(z0))[1])
    # It stopped costing work long before max_iter.
    assert int(stats.nstep[1]) < 200


def test_anderson_without_root_is_not_converged():
    z0 = torch.tensor([[1.0, 2.0], [0.3, -0.2], [-1.0, 0.5]], dtype=torch.float64)
    with pytest.warns(SolverWarning, match="1 of 3 samples did not reach"):
        z, stats = anderson(no_root, z0, max_iter=100, tol=1e-10)
    assert bool(torch.isfinite(z).all())
    assert stats.converged.tolist() == [True, False, True]
    torch.testing.assert_close(stats.residual, flat_norm(no_root(z)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", ["broyden", "anderson"])
def test_accelerated_method_diverges_and_fixed_point_rescues(method):
    # fn(z) = -atan(z): z <- z - atan(z) converges from anywhere, but the secant step from
    # z0 = 10 overshoots to about -117. With a tight divergence_ratio the sample is marked
    # diverged and finishes by fixed-point iteration from its best iterate.
    fn = lambda z: -torch.atan(z)  # noqa: E731
    z0 = torch.tensor([[10.0], [0.5]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)  # converged in the end: no warning
        z, stats = run(method, fn=fn, z0=z0, max_iter=200, tol=1e-10, divergence_ratio=1.05)
    assert stats.diverged.tolist() == [True, False]
    assert stats.converged.tolist() == [True, True]
    assert bool((z.abs() <= 1e-9).all())
    _, fp = fixed_point(fn, z0, max_iter=200, tol=1e-10, divergence_ratio=1.05)
    assert fp.all_converged and not fp.diverged.any()


# -------------------------------------------------------------------------------- warn


@pytest.mark.parametrize("method", ALL)
def test_warn_false_suppresses_warning(method):
    z0 = torch.tensor([[1.0, 2.0], [0.3, -0.2], [-1.0, 0.5]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, stats = run(method, fn=no_root, z0=z0, max_iter=50, tol=1e-10, warn=False)
        z, stats2 = run(
            method, fn=NaNAfter(bad=[0], after=3), z0=z0, max_iter=50, tol=1e-10, warn=False
        )
    assert not stats.converged[1] and stats.converged[0]
    assert stats2.nonfinite.tolist() == [True, False, False]
    # Same call with warnings on does warn (so the check above is not vacuous).
    with pytest.warns(SolverWarning):
        run(method, fn=no_root, z0=z0, max_iter=50, tol=1e-10)


@pytest.mark.parametrize("method", ALL)
def test_max_iter_exhausted_warns_with_worst_residual(method):
    z0 = z0_like()
    with pytest.warns(
        SolverWarning, match=r"did not reach tol=1e-14 \(abs\) in 2 iterations"
    ) as record:
        z, stats = run(method, z0=z0, max_iter=2, tol=1e-14)
    assert not stats.converged.any()
    assert torch.equal(stats.nstep, torch.full((3,), 2))
    message = str(record[0].message)
    assert f"{float(stats.residual.max()):.3e}" in message
    assert issubclass(SolverWarning, UserWarning)
