"""How the fast paths of :class:`impflow.nn.LipschitzMLP` read the network: its layers, and the
closed-form derivative ``act'(z)`` of each activation.

Shared by the fused Hutchinson series (:mod:`impflow.logdet.fused_mlp`) and the forward-mode
Jacobian (:mod:`impflow.logdet.mlp_jacobian`). The derivatives are plain differentiable torch
expressions: gradients flow through them to ``z`` and to LipSwish's ``β``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from impflow.nn.activations import ELU, Identity, LipSwish, Sin, Softplus, Tanh
from impflow.nn.lipschitz_mlp import LipschitzMLP
from impflow.nn.spectral import SpectralLinear

__all__ = ["DERIVATIVES", "activation_derivative", "mlp_layers"]

_TWO_PI = 2.0 * math.pi


def _lipswish_derivative(act: LipSwish, z: Tensor) -> Tensor:
    beta = act.beta.to(z.dtype)
    u = beta * z
    s = torch.sigmoid(u)
    return (s + u * s * (1 - s)) / 1.1


# act'(z) for each supported activation type (exact types: a subclass may change forward).
DERIVATIVES = {
    Sin: lambda act, z: torch.cos(_TWO_PI * z),
    LipSwish: _lipswish_derivative,
    # exp of the clamped input: no inf in the unused branch (whose gradient would be NaN).
    ELU: lambda act, z: torch.where(z > 0, torch.ones_like(z), torch.exp(z.clamp(max=0))),
    # torch's softplus is the identity above 20 (derivative 1), as here.
    Softplus: lambda act, z: torch.where(z > 20, torch.ones_like(z), torch.sigmoid(z)),
    Tanh: lambda act, z: 1 - torch.tanh(z) ** 2,
    Identity: lambda act, z: torch.ones_like(z),
}


def activation_derivative(act: nn.Module, z: Tensor) -> Tensor:
    """``act'(z)`` elementwise, differentiable; ``act`` must be of a type in :data:`DERIVATIVES`."""
    return DERIVATIVES[type(act)](act, z)


def mlp_layers(g) -> tuple[list, list] | None:
    """``(linears, activations)`` of a standard ``LipschitzMLP`` (alternating
    ``SpectralLinear`` and activations of the types in :data:`DERIVATIVES`), else ``None``."""
    if not isinstance(g, LipschitzMLP):
        return None
    modules = list(g)
    linears, activations = modules[0::2], modules[1::2]
    if len(modules) % 2 == 0 or not all(type(m) is SpectralLinear for m in linears):
        return None
    if not all(type(a) in DERIVATIVES for a in activations):
        return None
    return linears, activations
