"""Power iteration for the largest singular value of a matrix or of a convolution at a fixed
input size: the steps behind every spectral layer (dense ones use the fused op
``impflow.ops.power_iteration`` when no tolerance is asked for).

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Spectral Normalization for Generative Adversarial Networks (Miyato et al., 2018)
    | https://arxiv.org/abs/1802.05957
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from impflow._autocast import without_autocast
from impflow.ops.power import power_iteration

__all__ = ["power_iteration_conv2d", "power_iteration_dense"]


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """``t / ||t||`` over all elements (a zero tensor stays zero)."""
    return t / t.norm().clamp_min(1e-12)


def _small_change(new: torch.Tensor, old: torch.Tensor, atol: float, rtol: float) -> bool:
    # ResFlow's test: root-mean-square change below atol + rtol * (largest element).
    err = (new - old).norm() / math.sqrt(new.numel())
    return bool(err < atol + rtol * new.abs().max())


@without_autocast("weight")
def power_iteration_dense(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_iterations: int,
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Power iteration for the largest singular value of a matrix.

    Each step is ``v ← normalize(Wᵀu)``, then ``u ← normalize(Wv)``. Call it under
    ``torch.no_grad()``; the inputs are not modified.

    Args:
        weight: (out, in) matrix ``W``.
        u: (out,) left vector.
        v: (in,) right vector.
        n_iterations: number of steps (the most, when a tolerance is given).
        atol, rtol: when either is given (the other counts as 0), stop after the first step in
            which the root-mean-square change of both ``u`` and ``v`` is below
            ``atol + rtol * max|·|`` of the new vector (ResFlow's test).

    Returns:
        ``(u, v, n_used)``: the new unit vectors (new tensors) and the number of steps run.
    """
    check = atol is not None or rtol is not None
    if not check:  # a fixed number of steps: one fused call (impflow.ops.power_iteration)
        u, v = u.detach().clone(), v.detach().clone()
        power_iteration([weight.detach()], [u], [v], n_iterations)
        return u, v, n_iterations
    atol, rtol = atol or 0.0, rtol or 0.0
    steps = 0
    for steps in range(1, n_iterations + 1):
        u_old, v_old = u, v
        v = _normalize(torch.mv(weight.t(), u))
        u = _normalize(torch.mv(weight, v))
        if check and _small_change(u, u_old, atol, rtol) and _small_change(v, v_old, atol, rtol):
            break
    return u, v, steps


@without_autocast("weight")
def power_iteration_conv2d(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_iterations: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_padding: tuple[int, int],
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Power iteration for the operator norm of a 2-D convolution (no bias) at a fixed size.

    Each step is ``v ← normalize(Aᵀu)`` with ``Aᵀ = conv_transpose2d``, then
    ``u ← normalize(Av)`` with ``A = conv2d``. Call it under ``torch.no_grad()``.

    Args:
        weight: (C_out, C_in, kH, kW) kernel.
        u: (1, C_out, H_out, W_out) left vector (unit norm over all elements).
        v: (1, C_in, H, W) right vector.
        n_iterations: number of steps (the most, when a tolerance is given).
        stride, padding: those of the convolution.
        output_padding: makes ``conv_transpose2d`` return ``v``'s shape (for strides > 1).
        atol, rtol: as in :func:`power_iteration_dense`.

    Returns:
        ``(u, v, n_used)`` as in :func:`power_iteration_dense`.
    """
    check = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    steps = 0
    for steps in range(1, n_iterations + 1):
        u_old, v_old = u, v
        v = _normalize(
            F.conv_transpose2d(
                u, weight, stride=stride, padding=padding, output_padding=output_padding
            )
        )
        u = _normalize(F.conv2d(v, weight, stride=stride, padding=padding))
        if check and _small_change(u, u_old, atol, rtol) and _small_change(v, v_old, atol, rtol):
            break
    return u, v, steps
