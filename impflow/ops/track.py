"""Python entry point of the fused solver bookkeeping op (torch.ops.impflow.solver_track)."""

import torch

from impflow._extension import check_device, check_same_device

__all__ = ["solver_track", "ACTIVE", "CONVERGED", "NONFINITE", "DIVERGED", "FALLBACK", "BLOWUP"]

# Bits of the per-sample status byte; csrc/include/impflow/track_math.h holds the same values.
ACTIVE, CONVERGED, NONFINITE, DIVERGED, FALLBACK, BLOWUP = 1, 2, 4, 8, 16, 32


def solver_track(
    z, F, best_z, best_F, best, status, nstep, tol, floor_scale, divergence_ratio, relative
):
    """Fused bookkeeping of one solver iteration; same contract as
    :func:`impflow.ops.reference.solver_track_reference`. Reads z and F once per active sample."""
    check_device(z, "ops.solver_track")
    try:
        return torch.ops.impflow.solver_track(
            z, F, best_z, best_F, best, status, nstep, tol, floor_scale, divergence_ratio, relative
        )
    except NotImplementedError:
        # No kernel for the device the dispatcher chose: say which argument is elsewhere.
        check_same_device("solver_track", _named(z, F, best_z, best_F, best, status, nstep))
        raise


def _named(*tensors):
    names = ("z", "F", "best_z", "best_F", "best", "status", "nstep")
    return list(zip(names, tensors))


@torch.library.register_fake("impflow::solver_track")
def _solver_track_fake(
    z, F, best_z, best_F, best, status, nstep, tol, floor_scale, divergence_ratio, relative
):
    # Also reached by one meta tensor among real ones, where it must not pass for an update.
    check_same_device("solver_track", _named(z, F, best_z, best_F, best, status, nstep))
    torch._check(z.dim() == 2, lambda: "z must be (B, n)")
    counts = z.new_empty((2,), dtype=torch.long)
    mask = z.new_empty((z.shape[0],), dtype=torch.bool)
    return counts, mask
