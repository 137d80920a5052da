"""Helpers the tabular and image tasks share: equal-size ImpFlow/ResFlow depths, parameter
counts and chunked evaluation means."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["count_parameters", "equal_size_blocks", "mean_over_chunks"]


def equal_size_blocks(implicit_blocks, model: str):
    """The depth of ``model`` with as many networks as ``implicit_blocks`` ImpFlow blocks: an
    ImpFlow block has two networks (``g_x``, ``g_z``), a ResFlow block one, so a ResFlow gets
    twice the blocks (the paper's comparisons: ResFlow L = 10 vs ImpFlow L = 5 on tabular data,
    L = 12 vs 6 on CIFAR-10). An int or a per-level sequence of ints."""
    factor = 2 if model == "residual" else 1
    if isinstance(implicit_blocks, Sequence):
        return tuple(factor * int(n) for n in implicit_blocks)
    return factor * int(implicit_blocks)


def mean_over_chunks(fn: Callable, x: torch.Tensor, chunk_size: int) -> float:
    """The mean over all rows of ``x`` of ``fn(chunk)`` (one value per row), computed chunk by
    chunk in float64 (so that large splits do not lose digits)."""
    if len(x) == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    total = 0.0
    for chunk in x.split(chunk_size):
        total += float(fn(chunk).double().sum())
    return total / len(x)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values of ``model`` (frozen ones too: the EMA copy's count the same
    as the trained model's)."""
    return sum(p.numel() for p in model.parameters())
