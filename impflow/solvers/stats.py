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
        residual: ``||fn(z)||_2`` at the returned iterate (the lowest-residual one).
        rel_residual: ``residual / (||z||_2 + 1e-12)``.
        converged: the stopping measure reached ``max(tol, tol_floor)``.
        diverged: the accelerated method blew up (non-finite or exploding residual) and
            the sample fell back to fixed-point iteration from its best iterate.
        nonfinite: ``fn`` returned NaN/Inf for the sample at some point (the returned
            iterate is still the best finite one).
        tol_floor: the smallest value of the stopping measure the dtype can resolve for the
            sample; a ``tol`` below it is replaced by it (float32 cannot reach 1e-10).
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

    def summary(self) -> str:
        """One line: convergence count, steps and residuals."""
        n = self.converged.numel()
        return (
            f"{self.method}: {int(self.converged.sum())}/{n} converged "
            f"(tol={self.tol:g}, {self.stop_mode}), steps mean {self.nstep.float().mean():.1f} "
            f"max {int(self.nstep.max())}, residual max {float(self.residual.max()):.2e}, "
            f"diverged {int(self.diverged.sum())}, non-finite {int(self.nonfinite.sum())}, "
            f"fn calls {self.n_fn_evals}"
        )
