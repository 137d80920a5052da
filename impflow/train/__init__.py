"""Training: the ``python -m impflow.train <task>`` entry point (:mod:`impflow.train.cli`), the
shared loop (:mod:`impflow.train.loop`), tasks (``toy``, ``fit1d``), EMA weights, figures, and
atomic checkpoints with exact resume (:mod:`impflow.train.checkpoint`) (DESIGN.md §4)."""

from impflow.train.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_checkpoint,
)

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "capture_rng_state",
    "load_checkpoint",
    "load_module_state",
    "restore_rng_state",
    "save_checkpoint",
]
