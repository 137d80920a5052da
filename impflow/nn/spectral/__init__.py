"""Spectrally normalised linear and convolutional layers (DESIGN.md §1).

Each layer uses its weight as ``W / max(1, σ(W) / c)``, where ``σ(W)`` is the largest singular
value of the layer's linear map, estimated by power iteration with the vectors ``u`` and ``v``
kept as buffers, and ``c`` (``coeff``) is the target Lipschitz constant. A weight whose norm is
already below ``c`` is left unchanged (soft normalisation, as in ResFlow).

For a convolution, ``σ`` is the operator norm of the convolution at the layer's input size
(power iteration with ``conv2d`` / ``conv_transpose2d``), not the norm of the reshaped kernel,
so that the bound ``Lip ≤ c`` holds for the map the layer actually computes.

Files: ``power.py`` (the power-iteration steps), ``linear.py``, ``conv.py`` (the layers),
``update.py`` (:func:`update_lipschitz`), ``_mixin.py`` (what the layers share).

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Spectral Normalization for Generative Adversarial Networks (Miyato et al., 2018)
    | https://arxiv.org/abs/1802.05957

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from impflow.nn.spectral._mixin import INIT_POWER_ITERATIONS
from impflow.nn.spectral.conv import SpectralConv2d
from impflow.nn.spectral.linear import SpectralLinear
from impflow.nn.spectral.power import power_iteration_conv2d, power_iteration_dense
from impflow.nn.spectral.update import update_lipschitz

__all__ = [
    "INIT_POWER_ITERATIONS",
    "SpectralConv2d",
    "SpectralLinear",
    "power_iteration_conv2d",
    "power_iteration_dense",
    "update_lipschitz",
]
