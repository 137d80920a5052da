r"""The 1-D function-fitting example of the ImpFlow paper: a target that a ResFlow of few blocks
cannot represent and a single ImpFlow block can.

A ResFlow block ``x + g(x)`` with ``Lip(g) ≤ c < 1`` has slope in ``[1 - c, 1 + c]``, so ``L``
blocks reach slopes of at most ``(1 + c)^L < 2^L``: a slope of 10 needs at least
``log₂ 10 ≈ 3.3``, i.e. 4 blocks. One ImpFlow block ``(Id + g_z)⁻¹ ∘ (Id + g_x)`` has
slope ``(1 + g_x'(x)) / (1 + g_z'(z))``, anywhere in ``[(1 - c)/(1 + c), (1 + c)/(1 - c)]``
(``[0.005, 199]`` at ``c = 0.99``); in 1-D, single ImpFlow blocks (any ``c < 1``) represent
every ``C¹`` function whose slope is bounded and bounded away from 0 (the paper's ``I = F₂``).

The slides specify the example only by these properties (a strictly increasing function whose
slope ranges over ``[0.1, 10]``); they do not give its formula. The target here is one such
function, smooth and in closed form:

``f(x) = 0.1·x + (9.9/k)·softplus(k·x)``, ``f'(x) = 0.1 + 9.9·sigmoid(k·x)``, ``k = 5``,

on ``x ∈ [-2, 2]``: the slope rises from ``0.1`` on the left (``f'(-2) ≈ 0.1004``) to ``10`` on
the right (``f'(2) ≈ 9.9996``), crossing 1 near ``x = -0.46``. ``f`` maps ``[-2, 2]`` onto
about ``[-0.20, 20.0]``.

References:
    | Implicit Normalizing Flows (Lu et al., 2021), §4 and Fig. 1
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from impflow.data._random import as_generator

__all__ = ["FIT1D_DOMAIN", "FIT1D_SLOPE_RANGE", "fit1d_dataset", "fit1d_derivative", "fit1d_target"]

FIT1D_DOMAIN = (-2.0, 2.0)
"""The interval the example is fitted on."""

FIT1D_SLOPE_RANGE = (0.1, 10.0)
"""Bounds of ``f'`` over the real line (approached at ``-∞`` and ``+∞``)."""

_LOW, _HIGH = FIT1D_SLOPE_RANGE
_SHARPNESS = 5.0


def _check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        what = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {what}")
    return x


def fit1d_target(x: Tensor) -> Tensor:
    """The target ``f(x) = 0.1·x + (9.9/k)·softplus(k·x)``, ``k = 5``, elementwise (any shape).

    Strictly increasing with ``0.1 < f'(x) < 10``; ``f(0) = 9.9·ln 2 / 5 ≈ 1.372``."""
    x = _check_tensor(x, "x")
    return _LOW * x + (_HIGH - _LOW) / _SHARPNESS * F.softplus(_SHARPNESS * x)


def fit1d_derivative(x: Tensor) -> Tensor:
    """``f'(x) = 0.1 + 9.9·sigmoid(k·x)``, elementwise (any shape)."""
    x = _check_tensor(x, "x")
    return _LOW + (_HIGH - _LOW) * torch.sigmoid(_SHARPNESS * x)


def fit1d_dataset(
    n: int,
    *,
    grid: bool = True,
    generator=None,
    domain: tuple[float, float] = FIT1D_DOMAIN,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``n`` pairs ``(x, f(x))`` on ``domain`` for fitting a 1-D flow ``x ↦ f(x)``.

    Args:
        n: number of points, ``>= 1`` (``>= 2`` for a grid).
        grid: evenly spaced ``x`` including both ends (True), or i.i.d. uniform on the
            domain (False).
        generator: for ``grid=False``: a CPU ``torch.Generator``, an int seed, or None
            (torch's default generator).
        domain: ``(low, high)`` with ``low < high``.
        dtype: floating dtype of the result (computed in float64).

    Returns:
        ``(x, y)``, each of shape ``(n, 1)`` (a batch of 1-D points, as flow layers take them).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < (2 if grid else 1):
        raise ValueError(f"n must be an int >= {2 if grid else 1}, got {n!r}")
    try:
        low, high = (float(v) for v in domain)
    except (TypeError, ValueError):
        low = high = None
    if low is None or not low < high:
        raise ValueError(f"domain must be (low, high) with low < high, got {domain!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if grid and generator is not None:
        raise ValueError("generator is used only with grid=False (a grid is not random)")
    if grid:
        x = torch.linspace(low, high, int(n), dtype=torch.float64)
    else:
        gen = as_generator(generator)
        x = low + (high - low) * torch.rand(int(n), generator=gen, dtype=torch.float64)
    x = x[:, None]
    return x.to(dtype), fit1d_target(x).to(dtype)
