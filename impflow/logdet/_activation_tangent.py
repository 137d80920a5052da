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
    x = _TWO_PI * h  # the product Sin's forward takes the sine of: the same bits
    s = torch.sin(x)
    d2 = s * -_TWO_PI
    return s.div_(_TWO_PI), torch.cos(x), d2  # in place: nothing saved s for backward


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
        graph = torch.is_grad_enabled()
        if graph:  # double backward: derivatives with a graph to h, no in-place updates
            _, d1, d2 = ctx.derivatives(h)
        grad_h, grad_t = None, None
        if grad_tangent is not None:
            # Fresh tensors updated in place and no (d, B, width) temporary for the curvature
            # term: 3x faster than plain out-of-place ops at B = 5000, width 128, d = 2, where
            # every megabyte of temporaries also costs page faults.
            curvature = _slab_dot(grad_tangent, tangent)
            grad_h = curvature * d2 if graph else curvature.mul_(d2)
            if grad_a is not None:
                grad_h = torch.addcmul(grad_h, grad_a, d1) if graph else grad_h.addcmul_(grad_a, d1)
            if ctx.needs_input_grad[1]:
                grad_t = (grad_tangent * d1).sum_to_size(tangent.shape)
        elif grad_a is not None:
            grad_h = grad_a * d1
        return grad_h, grad_t, None


# Up to this many tangent slabs the curvature sum runs as one multiply-add per slab; more
# slabs take one product and a reduction.
_SLAB_LOOP_MAX = 8


def _slab_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_j a_j ⊙ b_j`` over the leading (slab) dimension: ``(d, B, w)`` and ``(d, B | 1, w)``
    to a new ``(B, w)`` tensor (differentiable: the in-place sums keep what autograd saved)."""
    if a.shape[0] > _SLAB_LOOP_MAX:
        return (a * b).sum(0)
    out = a[0] * b[0]
    for j in range(1, a.shape[0]):
        out.addcmul_(a[j], b[j])
    return out


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
