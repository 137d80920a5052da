"""What a resumed run checks in a checkpoint before using it: every field it needs, of the
right type and range (a hand-edited ``step=-5`` or a foreign file is refused with the field
named, instead of a traceback or a resumed run at step -5), and an optimizer state that fits."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from impflow.train.checkpoint import CheckpointError
from impflow.train.settings_checks import is_int, is_number

__all__ = ["check_resumable", "load_optimizer_state"]


def _is_mapping(value) -> bool:
    return isinstance(value, Mapping)


def _is_list_of_mappings(value) -> bool:
    return isinstance(value, list) and all(map(_is_mapping, value))


# (field, check, what it must be, required): a hand-edited or foreign checkpoint is refused
# with the field named, instead of a TypeError or KeyError traceback, or a resumed step -5.
_RESUME_FIELDS = (
    ("model", _is_mapping, "a mapping of tensors", True),
    ("optimizer", _is_mapping, "an optimizer state (a mapping)", True),
    ("rng", _is_mapping, "a random state (a mapping)", True),
    ("step", lambda v: is_int(v) and v >= 0, "an integer >= 0", True),
    ("seconds", lambda v: is_number(v) and math.isfinite(v) and v >= 0, "a number >= 0", True),
    ("ema", lambda v: v is None or _is_mapping(v), "None or a mapping of tensors", False),
    ("history", _is_list_of_mappings, "a list of rows (mappings)", False),
    ("world_size", lambda v: is_int(v) and v >= 1, "an integer >= 1", False),
    ("rng_per_rank", _is_list_of_mappings, "a list of random states", False),
    ("schedule", lambda v: v is None or _is_mapping(v), "None or a mapping", False),
)


def check_resumable(ckpt: dict, path: Path) -> None:
    """Raises CheckpointError naming the first field a resumed run cannot use."""
    for name, valid, what, required in _RESUME_FIELDS:
        if name not in ckpt:
            if required:
                raise CheckpointError(f"checkpoint {path} has no {name!r} entry")
            continue
        if not valid(ckpt[name]):
            shown = repr(ckpt[name])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise CheckpointError(
                f"checkpoint {path}: {name!r} must be {what}, got {type(ckpt[name]).__name__} "
                f"{shown}"
            )


def load_optimizer_state(optimizer, saved: Mapping, path: Path) -> None:
    """``optimizer.load_state_dict`` with its errors, and state tensors shaped unlike their
    parameters (which would fail only at the first step), as CheckpointError."""
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {path}: its 'optimizer' state does not fit this run's optimizer "
            f"({type(err).__name__}: {err})"
        ) from err
    for group in optimizer.param_groups:
        for key, value in group.items():
            if key != "params" and is_number(value) and not math.isfinite(value):
                raise CheckpointError(f"checkpoint {path}: optimizer setting {key!r} is {value}")
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise CheckpointError(
                    f"checkpoint {path}: optimizer state {key!r} has shape {tuple(value.shape)} "
                    f"for a parameter of shape {tuple(param.shape)}"
                )
