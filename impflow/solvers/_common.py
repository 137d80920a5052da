"""What every solver shares: argument checks, the checked call of ``fn``, and the per-sample
bookkeeping (residuals, convergence, lowest-residual iterate, divergence)."""

import math
import numbers
import warnings

import torch

from impflow.solvers.stats import SolverStats, SolverWarning

# Rounding leaves |fn(z)| at a few ulps of z per element: the stopping measure cannot go
# below this many machine epsilons (scaled by the sample's norm).
_FLOOR_ULPS = 4.0
_REL_EPS = 1e-12


def check_common_args(z0, max_iter, tol, stop_mode, divergence_ratio):
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
    if z0[0].numel() == 0:
        raise ValueError(f"z0 must have at least one element per sample, got {tuple(z0.shape)}")
    if not z0.is_floating_point() or z0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"z0 must be float32 or float64, got {z0.dtype}")
    if not bool(torch.isfinite(z0).all()):
        bad = (~torch.isfinite(z0.reshape(z0.shape[0], -1))).any(1).nonzero().flatten()
        raise ValueError(f"z0 contains NaN or Inf (samples {bad[:8].tolist()})")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if isinstance(divergence_ratio, bool) or not isinstance(divergence_ratio, numbers.Real) or not divergence_ratio > 1:
        raise ValueError(f"divergence_ratio must be a number > 1, got {divergence_ratio!r}")


def check_history(history, name="history"):
    if isinstance(history, bool) or not isinstance(history, numbers.Integral) or history < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {history!r}")


class FlatFunction:
    """Calls ``fn`` on (B, ...) iterates from flat (B, n) ones and checks what comes back."""

    def __init__(self, fn, z0):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.shape = z0.shape
        self.dtype = z0.dtype
        self.device = z0.device
        self.calls = 0

    def __call__(self, z_flat):
        out = self.fn(z_flat.view(self.shape))
        self.calls += 1
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"fn must return a tensor, got {type(out).__name__}")
        if out.shape != self.shape:
            raise ValueError(
                f"fn must return the shape of z0 {tuple(self.shape)}, got {tuple(out.shape)}"
            )
        if out.dtype != self.dtype:
            raise TypeError(f"fn must return z0's dtype {self.dtype}, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(f"fn must return a tensor on z0's device {self.device}, got {out.device}")
        # A private copy: fn may hand back the same buffer on every call (an out= buffer, a
        # CUDA graph's static output) and overwrite it inside the next call, while the solver
        # still holds the previous F; only a copy taken now is safe.
        return out.clone(memory_format=torch.contiguous_format).view(self.shape[0], -1)


class Tracker:
    """Per-sample state of a solve. ``active`` samples still iterate; the others are frozen
    (converged, or given up after a non-finite residual)."""

    def __init__(self, z, F, *, tol, stop_mode, divergence_ratio):
        B = z.shape[0]
        dev = z.device
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.divergence_ratio = float(divergence_ratio)
        eps = torch.finfo(z.dtype).eps
        self.floor_scale = _FLOOR_ULPS * eps
        self.sqrt_n = math.sqrt(z.shape[1])
        self.nstep = torch.zeros(B, dtype=torch.long, device=dev)
        self.diverged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        measure, res, finite = self._measure(z, F)
        self.best_z = z.clone()
        self.best_F = F.clone()
        self.best_measure = torch.where(finite, measure, torch.inf)
        self.best_res = torch.where(finite, res, torch.inf)
        self.initial_res = torch.where(finite, res, torch.inf)
        self.nonfinite |= ~finite
        self.active &= finite  # nothing to iterate from: fn(z0) is already NaN/Inf
        self._check_converged(z, measure)

    def _measure(self, z, F):
        res = torch.linalg.vector_norm(F, dim=1)
        if self.stop_mode == "abs":
            measure = res
        else:
            measure = res / (torch.linalg.vector_norm(z, dim=1) + _REL_EPS)
        return measure, res, torch.isfinite(res)

    def _floor(self, z):
        if self.stop_mode == "rel":
            return torch.full(z.shape[:1], self.floor_scale, dtype=z.dtype, device=z.device)
        return self.floor_scale * (torch.linalg.vector_norm(z, dim=1) + self.sqrt_n)

    def _check_converged(self, z, measure):
        done = self.active & (measure <= torch.clamp(self._floor(z), min=self.tol))
        self.converged |= done
        self.active &= ~done

    def update(self, z, F):
        """Records the iterate ``z`` with residual ``F`` for the active samples. Returns the
        mask of samples whose residual is non-finite or exploded (needing a fallback)."""
        measure, res, finite = self._measure(z, F)
        was_active = self.active
        self.nstep += was_active
        better = was_active & finite & (measure < self.best_measure)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        self.best_F = torch.where(better[:, None], F, self.best_F)
        self.best_measure = torch.where(better, measure, self.best_measure)
        self.best_res = torch.where(better, res, self.best_res)
        blowup = was_active & (~finite | (res > self.divergence_ratio * self.initial_res.clamp(min=self.tol)))
        self.nonfinite |= was_active & ~finite
        self._check_converged(z, torch.where(finite, measure, torch.inf))
        return blowup

    def give_up(self, mask):
        """Stops iterating the samples in ``mask`` (no way forward for them)."""
        self.active &= ~mask

    def any_active(self) -> bool:
        return bool(self.active.any())

    def finish(self, method, n_fn_evals, max_iter, shape, warn, on_divergence):
        """The best iterate in ``shape`` and the statistics; warns when some samples did not
        converge. ``on_divergence`` says what the method did with diverged samples."""
        z = self.best_z.reshape(shape)
        floor = self._floor(self.best_z)
        rel = self.best_res / (torch.linalg.vector_norm(self.best_z, dim=1) + _REL_EPS)
        stats = SolverStats(
            method=method,
            nstep=self.nstep,
            residual=self.best_res,
            rel_residual=rel,
            converged=self.converged,
            diverged=self.diverged,
            nonfinite=self.nonfinite,
            tol_floor=floor,
            n_fn_evals=n_fn_evals,
            tol=self.tol,
            stop_mode=self.stop_mode,
            max_iter=max_iter,
        )
        if warn and not stats.all_converged:
            warnings.warn(_failure_message(stats, on_divergence), SolverWarning, stacklevel=3)
        return z, stats


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
        text += f"; fn returned NaN/Inf for {int(stats.nonfinite.sum())}"
    return text + ". The best iterate of each sample is returned; see the SolverStats."
