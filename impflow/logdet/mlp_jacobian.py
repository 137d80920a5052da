"""The per-sample Jacobian of a :class:`impflow.nn.LipschitzMLP` in one forward-mode pass.

For ``g = L_n ∘ act ∘ … ∘ act ∘ L_1`` with ``L_i(h) = Ŵ_i h + b_i`` the Jacobian is
``J = Ŵ_n D_{n-1} Ŵ_{n-1} … D_1 Ŵ_1`` with ``D_i = diag(act'(h_i))`` at the pre-activations
``h_i``. It is propagated with the values: ``J_1 = Ŵ_1``, then ``J ← Ŵ_{i+1} (act'(h_i) ⊙ J)``
next to ``h_{i+1} = Ŵ_{i+1} act(h_i) + b_{i+1}``. The tangents are kept as ``d`` slabs
``(d, B, width)``, so that every layer maps them as it maps ``d·B`` extra rows (one matrix
product, no bias). One pass gives ``g(x)`` and ``J``; with graph, one ordinary backward
differentiates both (through ``act'(h)``, in closed form, to ``x``, the weights, the biases and
LipSwish's ``β``), where ``d`` reverse-mode products would need a double backward. Each hidden
layer's ``act(h)`` and ``act'(h) ⊙ J`` are one autograd node whose backward reuses ``act'`` and
``act''`` from the forward (:mod:`impflow.logdet._activation_tangent`).

- ``Ŵ_i`` is computed once per layer as the layer's own forward computes it
  (``SpectralLinear._weight_for_forward``): in training mode one power iteration per layer, as
  one forward of ``g``; inside a block call, where power iteration is paused
  (:mod:`impflow.nn._frozen`), the stored vectors, as every other evaluation in that call.
- Anything else (another structure or activation type, per-sample shapes other than
  ``(B, d)``, forward hooks on ``g`` or its layers, a dtype or device the weights do not have)
  falls back to :func:`impflow.logdet.autograd_jacobian`.

This module registers itself for ``LipschitzMLP`` on import (``import impflow`` does it);
:func:`impflow.logdet.autograd_products` turns it off for a block of code.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from impflow.logdet._activation_tangent import activation_and_tangent
from impflow.logdet._mlp_layers import mlp_layers
from impflow.logdet.jacobian import autograd_jacobian, register_jacobian
from impflow.nn.lipschitz_mlp import LipschitzMLP

__all__ = ["mlp_value_and_jacobian", "supports_forward_jacobian"]


def _has_forward_hooks(g) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in g.modules())


def supports_forward_jacobian(g, x: Tensor) -> bool:
    """Whether :func:`mlp_value_and_jacobian` takes the forward-mode path for ``g`` at ``x``."""
    layers = mlp_layers(g)
    if layers is None or x.dim() != 2 or not x.dtype.is_floating_point:
        return False
    weight = layers[0][0].weight
    if weight.dtype != x.dtype or weight.device != x.device:
        return False
    return x.shape[1] == g.dims[0] == g.dims[-1] and not _has_forward_hooks(g)


def mlp_value_and_jacobian(g, x: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """``(g(x), J)`` for a ``LipschitzMLP`` by forward-mode propagation: the Jacobian
    implementation registered for ``LipschitzMLP`` (see :mod:`impflow.logdet.jacobian` for the
    contract).

    Args:
        g: the network.
        x: ``(B, d)``, finite.
        create_graph: return both results differentiable (else no graph is built).

    Returns:
        ``gx`` ``(B, d)`` and ``jac`` ``(B, d, d)``, ``jac[b, i, j] = ∂g(x)_{b,i} / ∂x_{b,j}``.
    """
    if not supports_forward_jacobian(g, x):
        return autograd_jacobian(g, x, create_graph=create_graph)
    linears, activations = mlp_layers(g)
    with torch.set_grad_enabled(create_graph):
        # One normalised weight per layer, exactly as one forward of g computes it.
        weights = [linear._weight_for_forward() for linear in linears]
        h = F.linear(x, weights[0], linears[0].bias)
        # Tangents: tangent[j, b] = ∂h_b / ∂x_b,j, shape (d, B, width) ((d, 1, width) until the
        # first activation): each direction is a contiguous (B, width) slab, so act'(h) scales
        # all of them by one broadcast and each layer maps them as d·B extra rows.
        # (contiguous: the products below then keep the (d, B, width) layout that folds into one
        # matrix product, rather than inherit the strides of the transposed weight).
        tangent = weights[0].t().contiguous().unsqueeze(1)
        for act, linear, weight in zip(activations, linears[1:], weights[1:]):
            a, tangent = activation_and_tangent(act, h, tangent)
            h = F.linear(a, weight, linear.bias)
            tangent = F.linear(tangent, weight)
        jac = tangent.permute(1, 2, 0).expand(x.shape[0], -1, -1).contiguous()
    return h, jac


register_jacobian(LipschitzMLP, mlp_value_and_jacobian)
