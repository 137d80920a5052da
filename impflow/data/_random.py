"""Where the data generators draw their random numbers from."""

from __future__ import annotations

import numbers

import torch

__all__ = ["as_generator"]


def as_generator(generator, name: str = "generator") -> torch.Generator | None:
    """A ``torch.Generator`` from ``generator``: a generator (used as is), an int seed (a new
    CPU generator seeded with it), or None (None: the caller draws from torch's default CPU
    generator, the one ``torch.manual_seed`` seeds)."""
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU torch.Generator, got one on {generator.device}")
        return generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise TypeError(
        f"{name} must be None, an int seed or a torch.Generator, got {type(generator).__name__}"
    )
