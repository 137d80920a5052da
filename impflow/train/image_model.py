"""The multi-scale image flow of ResFlow and ImpFlow: a logit transform, then levels of
ActNorm and residual or implicit blocks whose networks are "3-1-3" Lipschitz convnets, with a
squeeze and a factor-out of half the channels after every level but the last.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021), §5.3 https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

from collections.abc import Sequence

from impflow.flow import Flow
from impflow.nn import (
    ActNorm,
    ImplicitBlock,
    LipschitzConvNet,
    LogitTransform,
    MultiScale,
    ResidualBlock,
    SequentialFlow,
    Squeeze,
)

__all__ = ["check_levels", "image_flow"]


def image_flow(
    kind: str,
    input_shape: Sequence[int],
    blocks_per_level: Sequence[int],
    hidden_channels: int,
    *,
    kernel_sizes: Sequence[int] = (3, 1, 3),
    activation: str = "lipswish",
    coeff: float = 0.9,
    n_power_iterations: int = 5,
    alpha: float = 0.05,
    logdet="series",
) -> Flow:
    """The paper's image flow on ``(C, H, W)`` data in ``[0, 1]`` (dequantised pixels).

    ``LogitTransform(alpha)``, then one level per entry of ``blocks_per_level``: ``n`` times
    ``[ActNorm, block]`` and a closing ActNorm, then (except after the last level) a 2×2
    squeeze; :class:`~impflow.nn.MultiScale` factors out the second half of the channels after
    each level but the last (ResFlow's layout: the first level works at full resolution).
    A ResFlow block has one network ``g``, an ImpFlow block two (``g_x``, ``g_z``), each a
    :class:`~impflow.nn.LipschitzConvNet` ``C → hidden → … → C`` at its level's size; every
    network but the first block's has a pre-activation (ResFlow's ``preact``).

    Args:
        kind: ``"implicit"`` or ``"residual"``.
        input_shape: ``(C, H, W)``; ``H`` and ``W`` must halve ``len(blocks_per_level) - 1``
            times.
        blocks_per_level: blocks in each level, e.g. ``(2, 2, 2)``.
        hidden_channels: channels inside the networks.
        kernel_sizes, activation, coeff, n_power_iterations: of every network.
        alpha: the logit transform's ``α``.
        logdet: the blocks' log-det setting (``"series"``: the paper's estimator).

    Returns:
        an :class:`impflow.Flow` with a standard normal base over ``C·H·W`` latents.
    """
    if kind not in ("implicit", "residual"):
        raise ValueError(f"model must be 'implicit' or 'residual', got {kind!r}")
    if not blocks_per_level or min(blocks_per_level) < 1:
        raise ValueError(f"blocks_per_level must hold positive ints, got {blocks_per_level!r}")
    check_levels(input_shape, len(blocks_per_level))
    c, h, w = (int(n) for n in input_shape)
    n_levels = len(blocks_per_level)
    first = True
    levels = []
    for i, n_blocks in enumerate(blocks_per_level):
        layers = []
        for _ in range(n_blocks):

            def net():
                return LipschitzConvNet(
                    c,
                    hidden_channels,
                    kernel_sizes,
                    activation=activation,
                    coeff=coeff,
                    n_power_iterations=n_power_iterations,
                    preactivation=not first,
                    input_size=(h, w),
                )

            layers.append(ActNorm(c))
            if kind == "implicit":
                layers.append(ImplicitBlock(net(), net(), logdet=logdet))
            else:
                layers.append(ResidualBlock(net(), logdet=logdet))
            first = False
        layers.append(ActNorm(c))
        if i < n_levels - 1:
            layers.append(Squeeze(2))
            c, h, w = 4 * c, h // 2, w // 2
            c -= c // 2  # what MultiScale keeps; the rest is factored out
        levels.append(SequentialFlow(*layers))
    multiscale = MultiScale(levels, input_shape=tuple(input_shape), squeeze_factor=None)
    return Flow(SequentialFlow(LogitTransform(alpha), multiscale), event_shape=tuple(input_shape))


def check_levels(input_shape: Sequence[int], n_levels: int) -> None:
    """Raises ValueError unless ``(C, H, W)`` images fit ``n_levels`` levels (``H`` and ``W``
    halve ``n_levels - 1`` times)."""
    _, h, w = input_shape
    if n_levels < 1 or h % 2 ** (n_levels - 1) or w % 2 ** (n_levels - 1):
        raise ValueError(
            f"images of shape {tuple(input_shape)} do not fit {n_levels} levels: each level but "
            f"the last halves H and W, so both must be divisible by 2^{max(n_levels - 1, 0)}"
        )
