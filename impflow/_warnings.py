"""Warnings attributed to the user's line, not to impflow's or torch's internals.

A fixed ``stacklevel`` breaks as soon as a decorator (``@torch.no_grad()``), ``nn.Module``'s
call machinery or autograd sits between the user and the code that warns: every solver warning
used to point at ``torch/utils/_contextlib.py``. Python's ``warnings`` also shows a warning once
per location, so a location inside torch would hide the warnings of every other call site.
"""

import sys
import warnings

# Frames of these packages' modules are skipped when looking for the line to blame.
_INTERNAL_PACKAGES = ("impflow", "torch")


def _is_internal(frame) -> bool:
    module = frame.f_globals.get("__name__") or ""
    return module.split(".", 1)[0] in _INTERNAL_PACKAGES


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function blame the
    first frame outside impflow and torch; 2 (the direct caller) when there is none, e.g. in
    a backward pass on an autograd worker thread."""
    frame = sys._getframe(1)  # the function that will call warnings.warn: level 1
    level = 1
    while frame is not None and _is_internal(frame):
        frame = frame.f_back
        level += 1
    return level if frame is not None else 2


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the user's code."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
