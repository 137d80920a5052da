r"""The 1-D function-fitting example of the ImpFlow paper: a target that a ResFlow block cannot
represent and a single ImpFlow block can.

A ResFlow block ``x + g(x)`` with ``Lip(g) ≤ c < 1`` has slope in ``[1 - c, 1 + c] ⊂ (0, 2)``.
One ImpFlow block ``(Id + g_z)⁻¹ ∘ (Id + g_x)`` has slope ``(1 + g_x'(x)) / (1 + g_z'(z))``
anywhere in ``[(1 - c)/(1 + c), (1 + c)/(1 - c)]``: the forward residual map handles the slopes
below 1 and the inverse one the slopes above 1 (the paper's slides).

The slides specify the example only by its properties (a strictly increasing function whose
slope ranges over ``[0.1, 10]``), not by a formula. The target here is built the way an
ImpFlow block represents such a function, ``f = r₂⁻¹ ∘ r₁`` with two smooth ramps

``r₁(x) = 0.1·x + 0.9·softplus(x)`` (slope ``0.1 → 1``),
``r₂(z) = z - 0.9·softplus(z - 3)`` (slope ``1 → 0.1``),

so ``f'(x) = r₁'(x) / r₂'(f(x))`` rises from about ``0.1`` to about ``10`` over
``x ∈ [-6, 6]`` (``f`` spans about 34 there). The ramps change over a few units on purpose: a
spectrally normalised network's derivative cannot change faster than its weights allow, so a
kink would be out of reach of both blocks and would only measure that.

References:
    | Implicit Normalizing Flows (Lu et al., 2021), §4 and Fig. 1
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from impflow.data._random import as_generator

__all__ = ["FIT1D_DOMAIN", "FIT1D_SLOPE_RANGE", "fit1d_dataset", "fit1d_derivative", "fit1d_target"]

FIT1D_DOMAIN = (-6.0, 6.0)
"""The interval the example is fitted on."""

FIT1D_SLOPE_RANGE = (0.1, 10.0)
"""Bounds of ``f'`` over the real line (approached at ``-∞`` and ``+∞``)."""

_KINK_Z = 3.0
_BISECTION_STEPS = 100


def _check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got {type(x).__name__}"
            + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else "")
        )
    return x


def _r1(x: Tensor) -> Tensor:
    return 0.1 * x + 0.9 * F.softplus(x)


def _r2(z: Tensor) -> Tensor:
    return z - 0.9 * F.softplus(z - _KINK_Z)


def _r2_slope(z: Tensor) -> Tensor:
    return 1.0 - 0.9 * torch.sigmoid(z - _KINK_Z)


@torch.no_grad()
def _r2_inverse(w: Tensor) -> Tensor:
    """``z`` with ``r₂(z) = w`` by bisection in float64 (``r₂`` is increasing; its bounds
    ``z - 0.9·ln 2 ≤ r₂(z) ≤ z`` for ``z ≤ 3`` and ``r₂(z) ≥ 0.1·z + 2.7 - 0.9·ln 2`` bracket
    the root)."""
    w = w.double()
    lo = w.clone()
    hi = torch.maximum(w + 0.9 * math.log(2), (w - 2.7 + 0.9 * math.log(2)) / 0.1) + 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = _r2(mid) < w
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def fit1d_target(x: Tensor) -> Tensor:
    """The target ``f = r₂⁻¹ ∘ r₁`` elementwise (any shape; computed in float64, returned in
    ``x``'s dtype). Differentiable: the root is re-attached by one Newton step, whose derivative
    is exactly ``f'(x)``."""
    x = _check_tensor(x, "x")
    w = _r1(x.double())
    z0 = _r2_inverse(w.detach())
    z = z0 + (w - _r2(z0)) / _r2_slope(z0)  # value z0 (to rounding), derivative r1'/r2'(z)
    return z.to(x.dtype)


def fit1d_derivative(x: Tensor) -> Tensor:
    """``f'(x) = r₁'(x) / r₂'(f(x))`` elementwise (any shape)."""
    x = _check_tensor(x, "x")
    xd = x.detach().double()
    slope = (0.1 + 0.9 * torch.sigmoid(xd)) / _r2_slope(_r2_inverse(_r1(xd)))
    return slope.to(x.dtype)


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
