"""Full precision where precision decides the result, under ``torch.autocast`` too.

A root found in bfloat16 or float16 cannot meet a float32 tolerance (their epsilons are 8e-3
and 1e-3), a spectral norm estimated in them can come out below the true one (so
``Lip(g) ≥ 1``), and the solvers check that ``fn`` keeps ``z0``'s dtype. So the solvers, the
flow blocks and the spectral layers' power iteration turn autocast off for their own work, as
autocast does for its float32 operations; a network called by them can turn it on again
inside itself (and cast its output back).
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` for a type it does not know)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except RuntimeError:  # a device type autocast does not know, e.g. "meta"
        return False


def autocast_off(device_type: str):
    """A context with autocast off for ``device_type``; a no-op when it was off already."""
    if not autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def without_autocast(tensor_arg: str, *, upcast: bool = False):
    """Decorates a function so that it runs with autocast off on the device of its argument
    ``tensor_arg``.

    ``upcast``: when autocast was on, a float16 or bfloat16 ``tensor_arg`` is cast to float32
    first (autocast's rule for its float32 operations), so a flow layer placed after
    autocast-ed layers takes their output.
    """

    def decorate(func):
        position = list(inspect.signature(func).parameters).index(tensor_arg)

        @functools.wraps(func)
        def run(*args, **kwargs):
            t = args[position] if len(args) > position else kwargs.get(tensor_arg)
            if not isinstance(t, torch.Tensor) or not autocast_enabled(t.device.type):
                return func(*args, **kwargs)
            if upcast and t.dtype in _LOW_PRECISION:
                if len(args) > position:
                    args = (*args[:position], t.float(), *args[position + 1 :])
                else:
                    kwargs[tensor_arg] = t.float()
            with torch.autocast(t.device.type, enabled=False):
                return func(*args, **kwargs)

        return run

    return decorate
