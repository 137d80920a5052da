"""Neural-network layers for implicit and residual flows: spectrally normalised layers,
1-Lipschitz activations, Lipschitz-constrained networks, and flow layers (ActNorm, Squeeze,
LogitTransform, SequentialFlow, MultiScale) (DESIGN.md §1, §5)."""

from impflow.nn.actnorm import ActNorm
from impflow.nn.activations import ELU, Identity, LipSwish, Sin, Softplus, Tanh, make_activation
from impflow.nn.lipschitz_convnet import LipschitzConvNet
from impflow.nn.lipschitz_mlp import LipschitzMLP
from impflow.nn.logit import LogitTransform
from impflow.nn.multiscale import MultiScale
from impflow.nn.sequential import SequentialFlow
from impflow.nn.spectral import SpectralConv2d, SpectralLinear, update_lipschitz
from impflow.nn.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "ELU",
    "Identity",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "LogitTransform",
    "MultiScale",
    "SequentialFlow",
    "Sin",
    "Softplus",
    "SpectralConv2d",
    "SpectralLinear",
    "Squeeze",
    "Tanh",
    "make_activation",
    "update_lipschitz",
]
