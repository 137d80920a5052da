"""Space-to-depth ("squeeze") for image flows: a permutation of the entries, log-det 0.

References:
    | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
    | https://arxiv.org/abs/1605.08803
"""

from __future__ import annotations

import numbers

import torch.nn.functional as F
from torch import Tensor, nn

from impflow.nn._flow_common import check_flow_input, check_logdet_flag

__all__ = ["Squeeze"]


class Squeeze(nn.Module):
    r"""``(B, C, H, W) -> (B, C·f², H/f, W/f)``: each ``f×f`` patch of each channel becomes
    ``f²`` channels.

    The layout is that of ``torch.nn.functional.pixel_unshuffle``: output channel
    ``c·f² + i·f + j`` at ``(h, w)`` holds input channel ``c`` at ``(h·f + i, w·f + j)``, so the
    first ``C·f²/2`` output channels come from the first half of the input channels (for even
    ``C``). ``inverse`` is ``pixel_shuffle``. Both return ``logdet = 0``
    (``inverse(z, logdet=False)``: ``None``).

    Args:
        factor: the patch size ``f``, a positive int (1 is the identity).

    Shapes:
        ``x``: ``(B, C, H, W)`` with ``H`` and ``W`` divisible by ``f``;
        ``z``: ``(B, C·f², H/f, W/f)``; ``logdet``: ``(B,)`` zeros.

    References:
        | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
        | https://arxiv.org/abs/1605.08803
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        self.factor = int(factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample shape ``(C·f², H/f, W/f)`` of the output for an input ``(C, H, W)``."""
        self._check_spatial(shape, "input shape", "Squeeze.output_shape")
        c, h, w = shape
        f = self.factor
        return (c * f * f, h // f, w // f)

    def input_shape_for(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample input shape ``(C, H, W)`` whose output is ``shape``."""
        self._check_channels(shape, "output shape", "Squeeze.input_shape_for")
        c, h, w = shape
        f = self.factor
        return (c // (f * f), h * f, w * f)

    def _check_spatial(self, shape, name: str, where: str) -> None:
        f = self.factor
        if len(shape) != 3 or shape[1] % f or shape[2] % f:
            raise ValueError(
                f"{where}: {name} must be (C, H, W) with H and W divisible by factor={f}, got "
                f"{tuple(shape)}"
            )

    def _check_channels(self, shape, name: str, where: str) -> None:
        f2 = self.factor**2
        if len(shape) != 3 or shape[0] % f2:
            raise ValueError(
                f"{where}: {name} must be (C, H, W) with C divisible by factor²={f2}, got "
                f"{tuple(shape)}"
            )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` with ``z = pixel_unshuffle(x, f)`` and ``logdet = 0``."""
        check_flow_input(x, "x", "Squeeze.forward", exact_dim=4)
        self._check_spatial(x.shape[1:], "x's per-sample shape", "Squeeze.forward")
        return F.pixel_unshuffle(x, self.factor), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)`` with ``x = pixel_shuffle(z, f)`` and ``logdet_inv = 0``;
        ``logdet=False``: ``(x, None)``."""
        check_logdet_flag(logdet, "Squeeze.inverse")
        check_flow_input(z, "z", "Squeeze.inverse", exact_dim=4)
        self._check_channels(z.shape[1:], "z's per-sample shape", "Squeeze.inverse")
        return F.pixel_shuffle(z, self.factor), (z.new_zeros(z.shape[0]) if logdet else None)
