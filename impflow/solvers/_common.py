"""What every solver shares: argument checks, the checked call of ``fn``, and the per-sample
bookkeeping (residuals, convergence, lowest-residual iterate, divergence)."""

import math
import numbers
import torch

from impflow._warnings import warn_at_caller
from impflow.ops.reference import solver_track_reference, track_limits
from impflow.ops.track import ACTIVE, BLOWUP, CONVERGED, DIVERGED, FALLBACK, NONFINITE, solver_track
from impflow.solvers.stats import SolverStats, SolverWarning

_TRACK = {"fused": solver_track, "reference": solver_track_reference}
_FLAG_MASKS = {}  # (bits, device) -> (len(bits), 1) uint8 masks, made once

# Rounding leaves fn(z) at about an ulp of z per element: the absolute stopping measure
# cannot be trusted below this many machine epsilons of (||z|| + sqrt(n)), nor the relative
# one below this many epsilons. A tol under that floor is replaced by it (see SolverStats).
_FLOOR_ULPS = 1.0
_REL_EPS = 1e-12

# A sample's reach, ||z0|| + _REACH_RATIO * ||fn(z0)||, bounds where a root can lie: the root
# of a contraction z -> z + fn(z) with Lipschitz constant L lies within ||fn(z0)|| / (1 - L) of
# z0, so the reach covers L <= 0.999. Beyond it the precision floor no longer stands in for
# tol (see impflow.ops.reference.track_limits): a floor growing with a runaway iterate would
# call a residual of any size converged (atan(z) - 2 "solved" at |z| = 4e16).
_REACH_RATIO = 1e3


def check_common_args(z0, max_iter, tol, stop_mode, divergence_ratio):
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() == 1:
        # (d,) would be taken as d samples of one element each: with an fn that couples them,
        # each "sample" would be judged on its own element (30 of 64 converged while
        # ||fn(z)|| was 8.96).
        raise ValueError(
            f"z0 must have a batch dimension, shape (B, ...); got the 1-D shape "
            f"{tuple(z0.shape)}: use z0[None] for one sample of {z0.shape[0]} elements, or "
            f"z0[:, None] for {z0.shape[0]} samples of one element"
        )
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
    if z0[0].numel() == 0:
        raise ValueError(f"z0 must have at least one element per sample, got {tuple(z0.shape)}")
    if not z0.is_floating_point() or z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"z0 must be float32 or float64, got {z0.dtype}")
    # A finite sum proves every element finite, in one cheap pass (4 -> 1.6 µs at 5000 x 2);
    # an infinite one may be an overflow of finite values, so the elements are looked at then.
    if not math.isfinite(float(z0.sum())):
        bad = (~torch.isfinite(z0.reshape(z0.shape[0], -1))).any(1).nonzero().flatten()
        if bad.numel():
            raise ValueError(f"z0 contains NaN or Inf (samples {bad[:8].tolist()})")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not math.isfinite(tol)
        or tol <= 0
    ):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if (
        isinstance(divergence_ratio, bool)
        or not isinstance(divergence_ratio, numbers.Real)
        or not divergence_ratio > 1
    ):
        raise ValueError(f"divergence_ratio must be a number > 1, got {divergence_ratio!r}")


def check_history(history, name="history"):
    if isinstance(history, bool) or not isinstance(history, numbers.Integral) or history < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {history!r}")


def check_impl(impl):
    if impl not in _TRACK:
        raise ValueError(f"impl must be one of {sorted(_TRACK)}, got {impl!r}")


def flat_start(z0):
    """A private, contiguous (B, n) copy of ``z0`` to iterate on (z0 may have any strides;
    the ops take contiguous iterates)."""
    return z0.detach().reshape(z0.shape[0], -1).clone(memory_format=torch.contiguous_format)


class FlatFunction:
    """Calls ``fn`` on (B, ...) iterates from flat (B, n) ones and checks what comes back."""

    def __init__(self, fn, z0):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.shape = z0.shape
        self.flat = z0.dim() == 2  # (B, n) already: no views needed (1.4 µs a call)
        self.dtype = z0.dtype
        self.device = z0.device
        self.calls = 0

    def __call__(self, z_flat):
        # fn writing into its input would change the solver's iterate behind its back (seen
        # only as a failure to converge): the version counter tells, for 0.2 µs a call.
        # Inference tensors have no counter.
        version = None if z_flat.is_inference() else z_flat._version
        out = self.fn(z_flat if self.flat else z_flat.view(self.shape))
        self.calls += 1
        if version is not None and z_flat._version != version:
            raise ValueError(
                "fn must not modify its input in place (the solver's iterate): use "
                "out-of-place operations, or work on a copy (z.clone())"
            )
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"fn must return a tensor, got {type(out).__name__}")
        if out.shape != self.shape:
            raise ValueError(
                f"fn must return the shape of z0 {tuple(self.shape)}, got {tuple(out.shape)}"
            )
        if out.dtype != self.dtype:
            raise TypeError(f"fn must return z0's dtype {self.dtype}, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(
                f"fn must return a tensor on z0's device {self.device}, got {out.device}"
            )
        # A private copy: fn may hand back the same buffer on every call (an out= buffer, a
        # CUDA graph's static output) and overwrite it inside the next call, while the solver
        # still holds the previous F; only a copy taken now is safe.
        out = out.clone(memory_format=torch.contiguous_format)
        return out if self.flat else out.view(self.shape[0], -1)


class Tracker:
    """Per-sample state of a solve, kept in tensors that the ``solver_track`` op updates in
    place: the status bits (``impflow.ops.track``), iteration counts, and the lowest-residual
    iterate. ``impl`` picks the fused op or its plain-PyTorch reference."""

    def __init__(self, z, F, *, tol, stop_mode, divergence_ratio, impl):
        check_impl(impl)
        B = z.shape[0]
        self._track = _TRACK[impl]
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.divergence_ratio = float(divergence_ratio)
        self.floor_scale = _FLOOR_ULPS * torch.finfo(z.dtype).eps
        self.status = torch.full((B,), ACTIVE, dtype=torch.uint8, device=z.device)
        self.nstep = torch.zeros(B, dtype=torch.long, device=z.device)
        # Rows: best measure, its residual, first residual, ||z|| at the best iterate, reach
        # (unbounded for the first call, whose iterate z0 is within reach by definition).
        self.best = torch.full((5, B), math.inf, dtype=torch.float64, device=z.device)
        self.best_z = z.clone(memory_format=torch.contiguous_format)  # updated in place by
        self.best_F = F.clone(memory_format=torch.contiguous_format)  # the op: contiguous
        self.any_fallback = False
        # The first call records z0: its residual becomes the reference for divergence.
        n_blowup, self.first_mask = self.update(z, F)
        self.nstep.zero_()
        self.best[2] = self.best[1]
        self.best[4] = self.best[3] + _REACH_RATIO * self.best[1]
        if n_blowup:  # fn(z0) is NaN/Inf: nothing to iterate from
            self.give_up(self.flagged(BLOWUP))
            self.first_mask = self.accelerated_mask()

    def update(self, z, F):
        """Records the iterate ``z`` with residual ``F`` for the active samples. Returns
        ``(n_blowup, mask)``: how many samples have a non-finite or exploding residual, and
        which samples the accelerated update applies to (active, not in fallback)."""
        counts, mask = self._track(
            z,
            F,
            self.best_z,
            self.best_F,
            self.best,
            self.status,
            self.nstep,
            self.tol,
            self.floor_scale,
            self.divergence_ratio,
            self.stop_mode == "rel",
        )
        self.n_active, n_blowup = counts.tolist()  # the one host sync of an iteration
        return n_blowup, mask

    def flagged(self, bit):
        # .bool() rather than != 0: the same flags, 1.3 instead of 7 µs at B = 5000 (uint8).
        return (self.status & bit).bool()

    def _flag_rows(self, bits):
        """``flagged(bit)`` for each of ``bits``, computed together: a (len(bits), B) bool
        tensor, unbound into its rows. (Three separate ``flagged`` calls cost 18 µs at
        B = 5000, this 4 µs.)"""
        key = (bits, self.status.device)
        masks = _FLAG_MASKS.get(key)
        if masks is None:
            masks = torch.tensor(bits, dtype=torch.uint8, device=self.status.device)[:, None]
            _FLAG_MASKS[key] = masks
        return (self.status & masks).bool().unbind(0)

    def accelerated_mask(self):
        return self.flagged(ACTIVE) & ~self.flagged(FALLBACK)

    def give_up(self, mask):
        """Stops iterating the samples in ``mask`` (no way forward for them)."""
        self.status &= torch.where(mask, ~ACTIVE & 0xFF, 0xFF).to(torch.uint8)
        self.n_active = int(self.flagged(ACTIVE).sum())

    def start_fallback(self, mask):
        """Marks ``mask`` diverged and iterated by fixed-point steps from now on."""
        self.status |= torch.where(mask, DIVERGED | FALLBACK, 0).to(torch.uint8)
        self.any_fallback = True

    def restart_blown_up(self, z, F):
        """After an update that reported blow-ups: samples of an accelerated method restart
        from their best iterate in fixed-point mode (returned ``z``, ``F`` are reset for them);
        samples already in that mode have nowhere left to go and stop."""
        blowup = self.flagged(BLOWUP)
        fallback = self.flagged(FALLBACK)
        self.give_up(blowup & fallback)
        fresh = blowup & ~fallback
        self.start_fallback(fresh)
        z = torch.where(fresh[:, None], self.best_z, z)
        F = torch.where(fresh[:, None], self.best_F, F)
        return z, F

    def finish(self, method, n_fn_evals, max_iter, shape, warn, on_divergence):
        """The best iterate in ``shape`` and the statistics; warns when some samples did not
        converge. ``on_divergence`` says what the method did with diverged samples."""
        dtype = self.best_z.dtype
        z_norm = self.best[3]
        residual = self.best[1]
        _, floor, _ = track_limits(
            residual,
            z_norm,
            self.best[4],
            self.best_z.shape[1],
            self.tol,
            self.floor_scale,
            self.stop_mode == "rel",
        )
        # The three per-sample flags from one pass over the status bytes (rows of one tensor).
        converged, diverged, nonfinite = self._flag_rows((CONVERGED, DIVERGED, NONFINITE))
        stats = SolverStats(
            method=method,
            nstep=self.nstep,
            residual=residual.to(dtype),
            rel_residual=(residual / (z_norm + _REL_EPS)).to(dtype),
            converged=converged,
            diverged=diverged,
            nonfinite=nonfinite,
            tol_floor=floor.to(dtype),
            n_fn_evals=n_fn_evals,
            tol=self.tol,
            stop_mode=self.stop_mode,
            max_iter=max_iter,
        )
        if warn and not stats.all_converged:
            warn_at_caller(_failure_message(stats, on_divergence), SolverWarning)
        return self.best_z.reshape(shape), stats


def _failure_message(stats, on_divergence):
    n = stats.converged.numel()
    missed = n - int(stats.converged.sum())
    worst = stats.residual[~stats.converged].max()
    text = (
        f"{stats.method}: {missed} of {n} samples did not reach tol={stats.tol:g} "
        f"({stats.stop_mode}) in {stats.max_iter} iterations (worst residual {float(worst):.3e})"
    )
    if bool(stats.diverged.any()):
        text += f"; {int(stats.diverged.sum())} diverged ({on_divergence})"
    if bool(stats.nonfinite.any()):
        text += f"; the iterate or fn(z) was NaN/Inf for {int(stats.nonfinite.sum())}"
    runaway = int(stats.runaway.sum())
    if runaway:
        text += (
            f"; {runaway} ran beyond ||z0|| + 1000 ||fn(z0)||, too far for a root, where "
            "the dtype cannot resolve tol (see tol_floor)"
        )
    return text + ". The best iterate of each sample is returned; see the SolverStats."
