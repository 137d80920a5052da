"""Training: checkpoints now; the training loop and the ``python -m impflow.train`` entry point
build on them (DESIGN.md §4)."""

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
