"""A multi-scale image flow: levels of flow layers, with half the channels factored out as
latent after every level but the last.

References:
    | Density estimation using Real NVP (Dinh, Sohl-Dickstein & Bengio, 2017)
    | https://arxiv.org/abs/1605.08803

    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from impflow.nn._flow_common import (
    call_inverse,
    check_flow_input,
    check_flow_layer,
    check_layer_output,
    check_logdet_flag,
    check_shape,
    output_shape_of,
    per_sample,
)
from impflow.nn.squeeze import Squeeze

__all__ = ["MultiScale"]


class MultiScale(nn.Module):
    r"""Levels of flow layers with factor-out (Glow's layout, with ResFlow's flat latent).

    For each level ``i`` in order: squeeze the current tensor (space-to-depth by
    ``squeeze_factor``; skipped when it is None), apply ``levels[i]``, and, except after the last
    level, split the channels: the first ``C - C // 2`` continue to the next level, the last
    ``C // 2`` are factored out as latent. ``forward`` returns the factored-out parts and the
    last level's output flattened per sample and concatenated in that order,
    ``z = [z_0, z_1, …, z_last]``, shape ``(B, C·H·W)``, with the sum of the levels' log-dets
    (squeezing and splitting are permutations: log-det 0). ``inverse`` takes such a ``z`` back;
    ``inverse(z, logdet=False)`` returns ``(x, None)`` and inverts the levels without their
    log-dets (as :class:`SequentialFlow` does).
    :meth:`split_latent` and :meth:`join_latent` convert between ``z`` and the per-level parts,
    whose shapes are in :attr:`latent_shapes`.

    A level is any flow layer (``forward(x) -> (z, logdet)``, ``inverse``), e.g. a
    :class:`SequentialFlow` of ActNorm and residual or implicit blocks. Levels keep the shape
    of their input, unless they define ``output_shape(shape)`` (as :class:`Squeeze` and
    :class:`SequentialFlow` do): with ``squeeze_factor=None`` the squeezes can sit inside the
    levels instead, as in RealNVP and ResFlow (``[blocks, Squeeze(), blocks]`` per level). The
    shapes are planned at construction from ``input_shape``, so a level that does not fit is
    reported there, and one that changes the shape unannounced is reported at run time.

    Args:
        levels: a non-empty sequence of flow layers (``nn.Module`` with ``inverse``).
        input_shape: the per-sample input shape ``(C, H, W)``.
        squeeze_factor: squeeze before each level by this factor (Glow), or None.

    Attributes:
        levels: the levels, an ``nn.ModuleList``.
        input_shape: ``(C, H, W)``.
        level_shapes: per level, its ``(input shape, output shape)``.
        latent_shapes: per-sample shapes of the parts of ``z``, in order.

    Shapes:
        ``x``: ``(B, C, H, W)``; ``z``: ``(B, C·H·W)``; ``logdet``: ``(B,)``.

    Example:
        >>> ms = MultiScale([ActNorm(12), ActNorm(24), ActNorm(48)], input_shape=(3, 32, 32))
        >>> ms.latent_shapes
        [(6, 16, 16), (12, 8, 8), (48, 4, 4)]

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039

        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735
    """

    def __init__(
        self,
        levels: Sequence[nn.Module],
        input_shape: Sequence[int],
        squeeze_factor: int | None = 2,
    ):
        super().__init__()
        if isinstance(levels, nn.Module) or not isinstance(levels, (Sequence, nn.ModuleList)):
            raise TypeError(
                "levels must be a sequence of flow layers (e.g. a list), got "
                f"{type(levels).__name__}"
            )
        if len(levels) == 0:
            raise ValueError("levels must hold at least one flow layer")
        for i, level in enumerate(levels):
            check_flow_layer(level, f"levels[{i}]")
        self.levels = nn.ModuleList(levels)
        self.input_shape = check_shape(input_shape, "input_shape")
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
        if squeeze_factor is None:
            self.squeeze = None
        elif (
            isinstance(squeeze_factor, bool)
            or not isinstance(squeeze_factor, numbers.Integral)
            or squeeze_factor < 1
        ):
            raise ValueError(
                f"squeeze_factor must be None or a positive int, got {squeeze_factor!r}"
            )
        else:
            self.squeeze = Squeeze(int(squeeze_factor))
        self._plan()

    def _plan(self) -> None:
        """Fills level_shapes, latent_shapes and the channel split of each level."""
        self.level_shapes, self.latent_shapes, self._keep = [], [], []
        shape = self.input_shape
        for i, level in enumerate(self.levels):
            if self.squeeze is not None:
                f = self.squeeze.factor
                if shape[1] % f or shape[2] % f:
                    raise ValueError(
                        f"MultiScale: input_shape={self.input_shape} does not fit "
                        f"{len(self.levels)} levels with squeeze_factor={f}: level {i}'s input "
                        f"{shape} has H or W not divisible by {f}"
                    )
                shape = self.squeeze.output_shape(shape)
            try:
                out = output_shape_of(level, shape)
            except ValueError as err:
                raise ValueError(f"MultiScale: levels[{i}] does not take shape {shape}: {err}")
            if len(out) != 3 or math.prod(out) != math.prod(shape):
                raise ValueError(
                    f"MultiScale: levels[{i}] maps shape {shape} to {out}; a level must output "
                    "(C, H, W) with as many entries as it takes"
                )
            self.level_shapes.append((shape, out))
            if i == len(self.levels) - 1:
                self.latent_shapes.append(out)
                break
            c, h, w = out
            if c < 2:
                raise ValueError(
                    f"MultiScale: levels[{i}] outputs {out}, a single channel: nothing to "
                    "factor out (use fewer levels or squeeze first)"
                )
            self._keep.append(c - c // 2)
            self.latent_shapes.append((c // 2, h, w))
            shape = (c - c // 2, h, w)

    def extra_repr(self) -> str:
        factor = None if self.squeeze is None else self.squeeze.factor
        return f"input_shape={self.input_shape}, squeeze_factor={factor}"

    @property
    def latent_size(self) -> int:
        """``C·H·W``, the per-sample size of ``z``."""
        return math.prod(self.input_shape)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(C·H·W,)`` for the input shape ``(C, H, W)`` (the only one accepted)."""
        if tuple(shape) != self.input_shape:
            raise ValueError(
                f"MultiScale.output_shape: built for input shape {self.input_shape}, got {shape}"
            )
        return (self.latent_size,)

    def split_latent(self, z: Tensor) -> list[Tensor]:
        """``z`` ``(B, C·H·W)`` as its parts ``(B, *latent_shapes[i])`` (views)."""
        self._check_latent(z, "MultiScale.split_latent")
        sizes = [math.prod(s) for s in self.latent_shapes]
        return [
            part.reshape(z.shape[0], *shape)
            for part, shape in zip(torch.split(z, sizes, dim=1), self.latent_shapes)
        ]

    def join_latent(self, parts: Sequence[Tensor]) -> Tensor:
        """The inverse of :meth:`split_latent`: ``(B, C·H·W)``."""
        if len(parts) != len(self.latent_shapes):
            raise ValueError(
                f"MultiScale.join_latent: expected {len(self.latent_shapes)} parts, got "
                f"{len(parts)}"
            )
        batch = parts[0].shape[0]
        for i, (part, shape) in enumerate(zip(parts, self.latent_shapes)):
            if tuple(part.shape) != (batch, *shape):
                raise ValueError(
                    f"MultiScale.join_latent: parts[{i}] must have shape {(batch, *shape)}, got "
                    f"{tuple(part.shape)}"
                )
        return torch.cat([per_sample(p) for p in parts], dim=1)

    def _check_latent(self, z, where: str) -> None:
        check_flow_input(z, "z", where, exact_dim=2)
        if z.shape[1] != self.latent_size:
            raise ValueError(
                f"{where}: z must have shape (B, {self.latent_size}) (C·H·W for input shape "
                f"{self.input_shape}), got {tuple(z.shape)}"
            )

    def _level(
        self, i: int, h: Tensor, method: str, expected, logdet: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        level = self.levels[i]
        where = f"MultiScale levels[{i}] ({type(level).__name__}).{method}"
        if method == "forward":
            h, logdet = check_layer_output(level(h), h.shape[0], where)
        else:
            h, logdet = call_inverse(level, h, logdet, where)
        if tuple(h.shape[1:]) != tuple(expected):
            raise ValueError(
                f"{where} returned per-sample shape {tuple(h.shape[1:])}, expected {expected} "
                "(levels keep the shape unless they define output_shape)"
            )
        return h, logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` with ``z`` of shape ``(B, C·H·W)``, laid out as described above."""
        check_flow_input(x, "x", "MultiScale.forward", exact_dim=4)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"MultiScale.forward: x must have shape (B, *input_shape) with "
                f"input_shape={self.input_shape}, got {tuple(x.shape)}"
            )
        h, total, parts = x, x.new_zeros(x.shape[0]), []
        for i in range(len(self.levels)):
            if self.squeeze is not None:
                h = self.squeeze(h)[0]
            h, logdet = self._level(i, h, "forward", self.level_shapes[i][1])
            total = total + logdet
            if i < len(self._keep):
                parts.append(per_sample(h[:, self._keep[i] :]))
                h = h[:, : self._keep[i]]
        parts.append(per_sample(h))
        return torch.cat(parts, dim=1), total

    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)`` for ``z`` of shape ``(B, C·H·W)``; ``logdet=False``:
        ``(x, None)``."""
        check_logdet_flag(logdet, "MultiScale.inverse")
        parts = self.split_latent(z)
        h, total = parts[-1], (z.new_zeros(z.shape[0]) if logdet else None)
        for i in reversed(range(len(self.levels))):
            if i < len(self._keep):
                h = torch.cat([h, parts[i]], dim=1)
            h, logdet_inv = self._level(i, h, "inverse", self.level_shapes[i][0], logdet)
            if logdet:
                total = total + logdet_inv
            if self.squeeze is not None:
                h = self.squeeze.inverse(h, logdet=False)[0]
        return h, total
