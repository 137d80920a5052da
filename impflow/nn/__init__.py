"""Neural-network layers for implicit and residual flows: spectrally normalised layers,
1-Lipschitz activations and Lipschitz-constrained networks (DESIGN.md §1, §5)."""

from impflow.nn.activations import ELU, Identity, LipSwish, Sin, Softplus, Tanh, make_activation
from impflow.nn.lipschitz_convnet import LipschitzConvNet
from impflow.nn.lipschitz_mlp import LipschitzMLP
from impflow.nn.spectral import SpectralConv2d, SpectralLinear, update_lipschitz

__all__ = [
    "ELU",
    "Identity",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "Sin",
    "Softplus",
    "SpectralConv2d",
    "SpectralLinear",
    "Tanh",
    "make_activation",
    "update_lipschitz",
]
