"""Recognising weights that blew up: a NaN or Inf in them or in their gradients, or weights so
large that their squared norms overflow (spectral normalisation then overflows, and the blocks'
checks fail with misleading messages). The loop turns such failures into its documented stop."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from impflow.nn._flow_common import NonFiniteError

__all__ = ["blown_up", "model_failure"]


def blown_up(tensors: Mapping, what: str, *, overflow: bool = True) -> str | None:
    """Where weights have blown up: a NaN or Inf, or (``overflow``) a tensor whose squared norm
    overflows its dtype, so that the norms and power iterations of spectral normalisation
    overflow and the blocks' checks fail with misleading messages (not contractive)."""
    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            continue
        t = t.detach()
        if not bool(torch.isfinite(t).all()):
            return f"{what} {name} holds NaN or Inf"
        if overflow and float(t.double().square().sum()) > torch.finfo(t.dtype).max:
            kind = str(t.dtype).replace("torch.", "")
            return (
                f"{what} {name} has grown to {float(t.abs().max()):.3g}, so its squared norm "
                f"overflows {kind}"
            )
    return None


def model_failure(err: Exception, model: nn.Module, step: int, group) -> str | None:
    """What to report when training step ``step`` raised ``err``: its weights blew up (said
    first: it is the cause), or the model met NaN or Inf; None for any other error (it
    propagates as it is)."""
    rank = f" on rank {group.rank} of {group.world_size}" if group.distributed else ""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    blown = blown_up(model.state_dict(), "parameter") or blown_up(
        grads, "the gradient of", overflow=False
    )
    if blown is None:
        if isinstance(err, NonFiniteError) or "NaN or Inf" in str(err):
            return f"the model met NaN or Inf at step {step}{rank} ({err})"
        return None
    first_line = (str(err).strip().splitlines() or [""])[0]
    return (
        f"the weights blew up at step {step}{rank}: {blown}, and the step failed "
        f"({type(err).__name__}: {first_line})"
    )
