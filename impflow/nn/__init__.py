"""Neural-network layers for implicit and residual flows: spectrally normalised layers,
1-Lipschitz activations, Lipschitz-constrained networks, and flow layers (ActNorm, Squeeze,
LogitTransform, SequentialFlow, MultiScale) and the residual and implicit blocks (DESIGN.md §1,
§5)."""

from impflow.nn._block_settings import BlockStats, ImplicitSolveError, NonContractiveWarning
from impflow.nn.actnorm import ActNorm
from impflow.nn.activations import ELU, Identity, LipSwish, Sin, Softplus, Tanh, make_activation
from impflow.nn.implicit_block import ImplicitBlock
from impflow.nn.lipschitz_convnet import LipschitzConvNet
from impflow.nn.lipschitz_mlp import LipschitzMLP
from impflow.nn.logit import LogitTransform
from impflow.nn.multiscale import MultiScale
from impflow.nn.residual_block import ResidualBlock
from impflow.nn.sequential import SequentialFlow
from impflow.nn.spectral import SpectralConv2d, SpectralLinear, update_lipschitz
from impflow.nn.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "BlockStats",
    "ELU",
    "Identity",
    "ImplicitBlock",
    "ImplicitSolveError",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "LogitTransform",
    "MultiScale",
    "NonContractiveWarning",
    "ResidualBlock",
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
