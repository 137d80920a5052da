"""The logit preprocessing of image flows: data in ``[0, 1]`` to the real line.

References:
    | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
    | https://arxiv.org/abs/1605.08803

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from impflow.nn._flow_common import (
    check_finite,
    check_flow_input,
    check_flow_tensor,
    check_logdet_flag,
    per_sample,
)

__all__ = ["LogitTransform"]


class LogitTransform(nn.Module):
    r"""``y = logit(s)`` with ``s = α + (1 - 2α)·x``, elementwise, for ``x`` in ``[0, 1]``.

    Squeezing ``x`` into ``[α, 1 - α]`` first keeps ``y`` finite at the edges (RealNVP uses
    ``α = 0.05`` on CIFAR-10). Per element ``dy/dx = (1 - 2α) / (s (1 - s))``, so

    ``logdet = Σ [log(1 - 2α) - log s - log(1 - s)]`` over every non-batch dimension.

    ``inverse`` accepts any finite ``y``: ``x = (sigmoid(y) - α)/(1 - 2α)`` lies in the open
    interval ``(-α/(1-2α), (1-α)/(1-2α))``, slightly beyond ``[0, 1]`` for ``y`` beyond
    ``logit(α)`` or ``logit(1 - α)`` (clamp such samples for display). That interval is the
    layer's support, and ``forward`` accepts all of it, so a flow can score its own samples;
    outside it (``s`` not in ``(0, 1)``, e.g. pixels in ``[0, 255]``) ``forward`` raises.

    Args:
        alpha: ``α`` in ``[0, 0.5)``.

    Shapes:
        ``x``, ``y``: ``(B, ...)``, e.g. ``(B, d)`` or ``(B, C, H, W)``; ``logdet``: ``(B,)``.

    References:
        | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, alpha: float = 1e-6):
        super().__init__()
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, numbers.Real)
            or not math.isfinite(alpha)
            or not 0 <= alpha < 0.5
        ):
            raise ValueError(f"alpha must be a number in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def _support(self) -> str:
        a = self.alpha
        return f"({-a / (1 - 2 * a) + 0.0:.6g}, {(1 - a) / (1 - 2 * a):.6g})"  # + 0.0: no -0

    def _check_squeezed(self, x: Tensor, s: Tensor) -> None:
        # s = α + (1 - 2α) x in (0, 1), tested on s itself: an x at the support's rounded edge
        # would give y = ±inf.
        if not bool(((s > 0) & (s < 1)).all()):
            check_finite(x, "x", "LogitTransform.forward")  # NaN/Inf: say so rather
            lo, hi = float(x.min()), float(x.max())
            raise ValueError(
                f"LogitTransform.forward: x must lie in {self._support()}, the support of "
                f"LogitTransform(alpha={self.alpha}) (data in [0, 1], or the model's own "
                f"samples), got values in [{lo}, {hi}]"
            )

    def _logdet(self, y: Tensor) -> Tensor:
        # -log s - log(1 - s) = softplus(-y) + softplus(y) for s = sigmoid(y): finite even
        # where s rounds to 0 or 1.
        per_element = math.log1p(-2 * self.alpha) + F.softplus(-y) + F.softplus(y)
        return per_sample(per_element).sum(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, logdet)``."""
        check_flow_tensor(x, "x", "LogitTransform.forward")
        s = self.alpha + (1 - 2 * self.alpha) * x
        self._check_squeezed(x, s)  # also finds NaN and Inf
        y = torch.log(s) - torch.log1p(-s)
        return y, self._logdet(y)

    def inverse(self, y: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)`` with ``x = (sigmoid(y) - α)/(1 - 2α)``, ``logdet_inv = -logdet``;
        ``logdet=False``: ``(x, None)``."""
        check_logdet_flag(logdet, "LogitTransform.inverse")
        check_flow_input(y, "y", "LogitTransform.inverse")
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        return x, (-self._logdet(y) if logdet else None)
