"""Solver statistics of a model's blocks, summarised for logs and progress bars."""

from __future__ import annotations

from torch import nn

__all__ = ["mean_forward_iterations"]


def mean_forward_iterations(model: nn.Module) -> dict:
    """``{"solver_iters": m}``: the mean over the blocks that solved a forward root of their
    mean per-sample step count; empty when none did (a ResFlow's forward is explicit)."""
    means = []
    for layer in model.modules():
        stats = getattr(layer, "last_stats", None)
        forward = getattr(stats, "forward", None)
        if forward is not None:
            means.append(float(forward.nstep.float().mean()))
    return {"solver_iters": sum(means) / len(means)} if means else {}
