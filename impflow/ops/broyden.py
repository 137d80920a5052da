"""Python entry point of the fused Broyden op (torch.ops.impflow.broyden_step)."""

import torch

from impflow._extension import check_device

__all__ = ["broyden_step"]


def broyden_step(
    U: torch.Tensor,
    V: torch.Tensor,
    dz: torch.Tensor,
    dF: torch.Tensor,
    F: torch.Tensor,
    active: torch.Tensor,
    slot: int,
    n_valid: int,
) -> torch.Tensor:
    """Fused good-Broyden update and next step; same contract as
    :func:`impflow.ops.reference.broyden_step_reference`.

    Reads each history twice, writes one slot, and skips inactive samples.
    U and V must be contiguous (they are updated in place); the vectors may have any strides.
    Supported dtypes: float32 and float64.
    """
    check_device(U, "ops.broyden_step")
    return torch.ops.impflow.broyden_step(U, V, dz, dF, F, active, slot, n_valid)


@torch.library.register_fake("impflow::broyden_step")
def _broyden_step_fake(U, V, dz, dF, F, active, slot, n_valid):
    torch._check(U.dim() == 3 and V.shape == U.shape, lambda: "U, V must be (B, m, d)")
    torch._check(F.dim() == 2, lambda: "F must be (B, d)")
    return F.new_empty(F.shape)
