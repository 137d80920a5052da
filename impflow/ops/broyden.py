"""Python entry point of the fused Broyden op (torch.ops.impflow.broyden_step)."""

import torch

from impflow._extension import check_device, check_same_device

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
    :func:`impflow.ops.reference.broyden_step_reference` (NaN and Inf included).

    Reads each history twice, writes one slot, and skips inactive samples.
    U and V must be contiguous (they are updated in place); the vectors may have any strides.
    Supported dtypes: float32 and float64. All tensors must be on one device.
    """
    check_device(U, "ops.broyden_step")
    try:
        return torch.ops.impflow.broyden_step(U, V, dz, dF, F, active, slot, n_valid)
    except NotImplementedError:
        # No kernel for the device the dispatcher chose: say which argument is elsewhere.
        check_same_device("broyden_step", _named(U, V, dz, dF, F, active))
        raise


def _named(U, V, dz, dF, F, active):
    return list(zip(("U", "V", "dz", "dF", "F", "active"), (U, V, dz, dF, F, active)))


@torch.library.register_fake("impflow::broyden_step")
def _broyden_step_fake(U, V, dz, dF, F, active, slot, n_valid):
    # Also reached by one meta tensor among real ones, where it must not pass for a step.
    check_same_device("broyden_step", _named(U, V, dz, dF, F, active))
    torch._check(U.dim() == 3 and V.shape == U.shape, lambda: "U, V must be (B, m, d)")
    torch._check(F.dim() == 2, lambda: "F must be (B, d)")
    return F.new_empty(F.shape)
