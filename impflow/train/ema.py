"""Exponential moving average of a model's weights, for evaluation (as in ResFlow and ImpFlow)."""

from __future__ import annotations

import copy
import numbers

import torch
from torch import nn

__all__ = ["EMA"]


def check_decay(decay, name: str = "decay") -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0 <= decay < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {decay!r}")
    return float(decay)


class EMA(nn.Module):
    """Keeps ``shadow = decay · shadow + (1 - decay) · weights`` for every floating parameter of
    ``model`` after each :meth:`update`; buffers (ActNorm statistics, power-iteration vectors)
    are copied as they are. ``shadow`` is a full copy of the model in eval mode, so it can be
    evaluated directly, and the EMA saves and loads with ``state_dict``.

    Args:
        model: the trained model (not modified).
        decay: in ``[0, 1)``; 0 makes the shadow a plain copy of the latest weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        self.decay = check_decay(decay)
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the shadow towards ``model``'s current weights (call after each step)."""
        for s, p in zip(self.shadow.parameters(), model.parameters()):
            if s.is_floating_point():
                s.lerp_(p.detach(), 1.0 - self.decay)
            else:
                s.copy_(p)
        for s, b in zip(self.shadow.buffers(), model.buffers()):
            s.copy_(b)

    def train(self, mode: bool = True):  # the shadow always evaluates
        super().train(mode)
        self.shadow.eval()
        return self
