"""Checks of numeric settings shared by the training loop and the checkpoint checks: a bool is
not a number here, NaN and Inf are refused, and the message names the setting."""

from __future__ import annotations

import math
import numbers

__all__ = ["check_count", "check_number", "is_int", "is_number"]


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(value, name: str, *, low: float, low_allowed: bool, optional=False) -> None:
    """A finite number above ``low`` (or equal to it where allowed); None where optional."""
    if optional and value is None:
        return
    finite = is_number(value) and math.isfinite(value)  # first: no comparison of a str
    if not (finite and (value > low or (low_allowed and value == low))):
        bound = f"{'>=' if low_allowed else '>'} {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_count(value, name: str) -> None:
    if not (is_int(value) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
