"""Model builders of the training tasks: stacks of ImpFlow or ResFlow blocks (paper settings by
default), as :class:`impflow.Flow` objects."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from impflow.flow import Flow
from impflow.nn import ActNorm, ImplicitBlock, LipschitzMLP, ResidualBlock, SequentialFlow

__all__ = ["MODEL_KINDS", "VectorFlowOptions", "block", "vector_flow"]

MODEL_KINDS = ("implicit", "residual")


def block(
    kind: str,
    dim: int,
    hidden: Sequence[int],
    *,
    activation: str,
    coeff: float,
    n_power_iterations: int,
    logdet="auto",
) -> nn.Module:
    """One ImpFlow block (``g_x``, ``g_z`` each a ``dim-hidden-dim`` LipschitzMLP) or one
    ResFlow block (one such ``g``)."""

    def mlp():
        return LipschitzMLP(
            [dim, *hidden, dim],
            activation=activation,
            coeff=coeff,
            n_power_iterations=n_power_iterations,
        )

    if kind == "implicit":
        return ImplicitBlock(mlp(), mlp(), logdet=logdet)
    if kind == "residual":
        return ResidualBlock(mlp(), logdet=logdet)
    raise ValueError(f"model must be one of {MODEL_KINDS}, got {kind!r}")


def vector_flow(
    kind: str,
    dim: int,
    n_blocks: int,
    hidden: Sequence[int],
    *,
    activation: str,
    coeff: float,
    n_power_iterations: int,
    actnorm: bool,
    logdet="auto",
) -> Flow:
    """``n_blocks`` blocks of ``kind`` on ``(B, dim)`` data (ActNorm before each block and at
    the end when ``actnorm``), with a standard normal base."""
    layers = []
    for _ in range(n_blocks):
        if actnorm:
            layers.append(ActNorm(dim))
        layers.append(
            block(
                kind,
                dim,
                hidden,
                activation=activation,
                coeff=coeff,
                n_power_iterations=n_power_iterations,
                logdet=logdet,
            )
        )
    if actnorm:
        layers.append(ActNorm(dim))
    return Flow(SequentialFlow(*layers), event_shape=(dim,))


class VectorFlowOptions:
    """What the vector tasks (toy, tabular) share: their model options as attributes
    (``model``, ``blocks``, ``hidden``, ``activation``, ``coeff``, ``n_power_iterations``,
    ``actnorm``), those options in the task's config, and the flow they build."""

    def model_config(self) -> dict:
        return {
            "model": self.model,
            "blocks": self.blocks,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "coeff": self.coeff,
            "n_power_iterations": self.n_power_iterations,
            "actnorm": self.actnorm,
        }

    def build_vector_flow(self, dim: int, logdet) -> Flow:
        return vector_flow(
            self.model,
            dim,
            self.blocks,
            self.hidden,
            activation=self.activation,
            coeff=self.coeff,
            n_power_iterations=self.n_power_iterations,
            actnorm=self.actnorm,
            logdet=logdet,
        )
