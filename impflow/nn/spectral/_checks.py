"""Argument checks shared by the spectral layers and their helpers."""

import math
import numbers

from torch.nn.modules.utils import _pair


def _check_coeff(coeff):
    if (
        isinstance(coeff, bool)
        or not isinstance(coeff, numbers.Real)
        or not math.isfinite(coeff)
        or not 0 < coeff <= 1
    ):
        raise ValueError(f"coeff must be a number in (0, 1], got {coeff!r}")
    return float(coeff)


def _check_n_iterations(n, name="n_power_iterations"):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _check_tol(tol, name):
    if tol is None:
        return None
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not math.isfinite(tol)
        or tol < 0
    ):
        raise ValueError(f"{name} must be None or a finite number >= 0, got {tol!r}")
    return float(tol)


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_pair(value, name, minimum):
    pair = _pair(value)
    if len(pair) != 2 or any(
        isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < minimum for p in pair
    ):
        raise ValueError(f"{name} must be an integer >= {minimum} or a pair of them, got {value!r}")
    return tuple(int(p) for p in pair)
