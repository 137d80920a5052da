"""Per-sample statistics returned by every solver (DESIGN.md §2, API)."""

from dataclasses import dataclass

import torch

__all__ = ["SolverStats", "SolverWarning"]


class SolverWarning(UserWarning):
    """Some samples did not converge, diverged, or met a non-finite residual."""


@dataclass
class SolverStats:
    """What one solve did, sample by sample (all tensors have shape (B,)).

    Attributes:
        method: solver name ("broyden", "anderson", "fixed_point").
        nstep: iterations spent on each sample (evaluations of ``fn`` after the first).
        residual: ``||fn(z)||_2`` at the returned iterate: the one that converged, else the
            finite one of lowest measure.
        rel_residual: ``residual / (||z||_2 + 1e-12)``.
        converged: the returned iterate is finite and its stopping measure (``residual``, or
            in "rel" mode ``residual / (min(||z||, reach) + 1e-12)``, at least
            ``rel_residual``) is at most ``max(tol, tol_floor)``. Nothing else is converged.
        diverged: the accelerated method blew up (non-finite or exploding residual) and
            the sample fell back to fixed-point iteration from its best iterate.
        nonfinite: an iterate or ``fn``'s value at it was NaN/Inf for the sample at some
            point (the returned iterate is still the best finite one).
        tol_floor: the smallest stopping measure the dtype resolves at the returned iterate:
            ``eps * (||z|| + sqrt(n))`` ("abs") or ``eps`` ("rel"). Within the sample's reach,
            ``||z0|| + 1000 ||fn(z0)||`` (where the root of a contraction with Lipschitz
            constant up to 0.999 started at ``z0`` lies), a ``tol`` below it is replaced by it
            (float32 cannot reach 1e-10). Beyond the reach the iterate is running away, and
            a sample converges only where ``tol`` itself is met and resolved
            (``tol_floor <= tol``; in "rel" mode the floor is then ``eps * (||z|| +
            sqrt(n)) / reach``): a floor growing with a runaway iterate would call any
            residual converged.
        n_fn_evals: calls of ``fn`` on the whole batch, the first included.
        tol, stop_mode, max_iter: the settings of the solve.
    """

    method: str
    nstep: torch.Tensor
    residual: torch.Tensor
    rel_residual: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    nonfinite: torch.Tensor
    tol_floor: torch.Tensor
    n_fn_evals: int
    tol: float
    stop_mode: str
    max_iter: int

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def runaway(self) -> torch.Tensor:
        """(B,) bool: unconverged samples whose residual is under their ``tol_floor``. That
        happens only beyond the reach: the iterate ran too far for a root, to where the
        dtype cannot resolve ``tol`` (an evaluated residual there, even 0, proves nothing)."""
        measure = self.residual if self.stop_mode == "abs" else self.rel_residual
        return ~self.converged & (measure <= self.tol_floor)

    def summary(self) -> str:
        """One line: convergence count, steps and residuals."""
        n = self.converged.numel()
        return (
            f"{self.method}: {int(self.converged.sum())}/{n} converged "
            f"(tol={self.tol:g}, {self.stop_mode}), steps mean {self.nstep.float().mean():.1f} "
            f"max {int(self.nstep.max())}, residual max {float(self.residual.max()):.2e}, "
            f"diverged {int(self.diverged.sum())}, non-finite {int(self.nonfinite.sum())}, "
            f"fn calls {self.n_fn_evals}"
        ) + (f", ran away {int(self.runaway.sum())}" if bool(self.runaway.any()) else "")
