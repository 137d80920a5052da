"""One hidden layer of the forward-mode Jacobian pass (:mod:`impflow.logdet.mlp_jacobian`) as one
autograd node: ``a = act(h)`` and ``t' = act'(h) ⊙ t`` for the ``d`` tangent slabs ``t``.

Built from plain ops, the backward of this pair re-derives ``act'`` and ``act''`` from ``h``
(for ``Sin``: two more sines or cosines over ``(B, width)``, and half a dozen elementwise
passes); the exact log-det spends most of its time there. Here the forward computes ``act(h)``,
``act'(h)`` and ``act''(h)`` once, sharing the transcendental calls, and the backward is

    ∂L/∂h = ∂L/∂a ⊙ act'(h) + act''(h) ⊙ Σ_j ∂L/∂t'_j ⊙ t_j,     ∂L/∂t = ∂L/∂t' ⊙ act'(h).

With ``create_graph`` (a double backward) the backward recomputes ``act'`` and ``act''`` from
``h`` with a graph, so higher derivatives stay exact. Activations with parameters (LipSwish's
``β``) keep the plain path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from impflow.logdet._mlp_layers import activation_derivative
from impflow.nn.activations import ELU, Sin, Softplus, Tanh

__all__ = ["activation_and_tangent"]

_TWO_PI = 2.0 * math.pi
_SOFTPLUS_THRESHOLD = 20.0  # torch's softplus is the identity above it


def _sin(h):
    s = torch.sin(_TWO_PI * h)
    return s / _TWO_PI, torch.cos(_TWO_PI * h), s * -_TWO_PI


def _tanh(h):
    a = torch.tanh(h)
    d1 = 1 - a * a
    return a, d1, -2 * a * d1


def _softplus(h):
    s = torch.sigmoid(h)
    linear = h > _SOFTPLUS_THRESHOLD
    return F.softplus(h), torch.where(linear, 1.0, s), torch.where(linear, 0.0, s * (1 - s))


def _elu(h):
    e = torch.exp(h.clamp(max=0))  # exp of the clamped input: no inf in the unused branch
    positive = h > 0
    return F.elu(h, alpha=1.0), torch.where(positive, 1.0, e), torch.where(positive, 0.0, e)


# act(h), act'(h), act''(h) for each parameter-free activation type (exact types; act(h) is
# computed by the same ops as the module's forward, so the values agree bit for bit).
SECOND_ORDER = {Sin: _sin, Tanh: _tanh, Softplus: _softplus, ELU: _elu}


class _ActivationTangent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, tangent, derivatives):
        a, d1, d2 = derivatives(h)
        ctx.derivatives = derivatives
        ctx.save_for_backward(h, tangent, d1, d2)
        return a, d1 * tangent

    @staticmethod
    def backward(ctx, grad_a, grad_tangent):
        h, tangent, d1, d2 = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: derivatives with a graph to h
            _, d1, d2 = ctx.derivatives(h)
        grad_h = None if grad_a is None else grad_a * d1
        grad_t = None
        if grad_tangent is not None:
            curvature = (grad_tangent * tangent).sum(0) * d2
            grad_h = curvature if grad_h is None else grad_h + curvature
            if ctx.needs_input_grad[1]:
                grad_t = (grad_tangent * d1).sum_to_size(tangent.shape)
        return grad_h, grad_t, None


def activation_and_tangent(act, h: Tensor, tangent: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(h), act'(h) ⊙ tangent)``.

    Args:
        act: an activation module of :mod:`impflow.nn.activations`.
        h: pre-activations ``(B, width)``.
        tangent: ``(d, B, width)`` or ``(d, 1, width)`` (broadcast over the batch).

    Returns:
        ``(B, width)`` and ``(d, B, width)``, differentiable (one node with a closed-form
        backward for the types of :data:`SECOND_ORDER`; plain ops otherwise).
    """
    derivatives = SECOND_ORDER.get(type(act))
    if derivatives is None:
        return act(h), activation_derivative(act, h) * tangent
    if torch.is_grad_enabled() and (h.requires_grad or tangent.requires_grad):
        return _ActivationTangent.apply(h, tangent, derivatives)
    a, d1, _ = derivatives(h)
    return a, d1 * tangent
