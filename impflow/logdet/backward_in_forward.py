r"""Backward-in-forward for the Neumann-series log-det gradient, correct for any loss.

The Neumann gradient of the estimate ``ℓ_b`` of sample ``b`` is the gradient of the surrogate
``s_b = w_bᵀ J_b v_b`` (``v_b`` the probe, ``w_b`` the no-graph Neumann vector). Backward-in-
forward takes it during the forward pass and frees the graph of ``g`` at once, instead of
keeping it until the backward pass. The backward pass then needs, for a loss ``L`` with
per-sample weights ``c_b = ∂L/∂ℓ_b`` (known only then):

- with respect to ``x``: ``c_b ∂s_b/∂x_b``, exact for any ``c`` since ``s_b`` depends on
  ``x_b`` alone: the per-sample gradient is stored;
- with respect to a parameter ``θ``: ``Σ_b c_b ∂s_b/∂θ``. The stored batch sum
  ``Σ_b ∂s_b/∂θ`` gives it only when all ``c_b`` are equal (a sum or mean of the log-dets,
  within rounding). Otherwise (``Σ_b c_b ℓ_b`` with unequal ``c``, ``ℓ²``, ...) the backward
  re-evaluates ``g(x)`` and differentiates the weighted surrogate ``Σ_b c_b w_bᵀ J_b v_b``:
  one product with graph, like checkpointing, from the stored probes, Neumann vectors,
  buffers and random state of the forward, so the same function and the same draw.

ResFlow scales the stored parameter gradient by the first sample's ``c_0`` (DESIGN.md §7),
which is wrong as soon as the ``c_b`` differ.

Gradients reach ``x`` and the parameters through ordinary autograd (they are inputs of the
``autograd.Function``): ``.grad``, hooks, data-parallel reducers and ``torch.autograd.grad``
see them once, in the backward pass. Inside the estimator derivatives are taken on detached
aliases, so no user hook fires during the forward. Double backward is refused.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from impflow.logdet._module_state import (
    StateSnapshot,
    foreign_leaves,
    parameter_aliases,
)

# Upstream weights that differ by at most this many units of rounding (relative to the largest)
# count as equal: the stored batch-sum gradient is then exact to rounding.
_UNIFORM_ULPS = 8.0


def neumann_surrogate(
    g,
    vjp_powers,
    x_in: Tensor,
    gx: Tensor,
    pairs: Sequence[tuple[Tensor, Tensor]],
    weights: Tensor | None = None,
) -> Tensor:
    """``Σ_b c_b mean_probes(w_bᵀ J_b v_b)`` (``c = 1`` without ``weights``): a scalar whose
    gradient is the weighted Neumann gradient; one product with graph per probe.

    Args:
        g, vjp_powers: the network and its product implementation (``products.py``).
        x_in, gx: leaf input and ``g(x_in)`` evaluated with graph.
        pairs: ``(v, w)`` per probe, each shaped as ``x_in``, without graph.
        weights: ``(B,)`` per-sample weights ``c``, or ``None``.
    """
    total = None
    for v, w in pairs:
        if weights is not None:
            w = w * weights.reshape((-1,) + (1,) * (w.dim() - 1))
        (jw,) = vjp_powers(g, x_in, gx, w, 1, create_graph=True)
        term = (jw * v).sum()
        total = term if total is None else total + term
    return total / len(pairs)


class _Saved:
    """What the backward pass needs; kept on ``ctx`` (not ``save_for_backward``), since none of
    it is an input or output whose in-place modification autograd should detect."""

    def __init__(self, g, vjp_powers, value, pairs, snapshot, grad_x, grad_params):
        self.g = g
        self.vjp_powers = vjp_powers
        self.value = value
        self.pairs = pairs
        self.snapshot = snapshot
        self.grad_x = grad_x
        self.grad_params = grad_params


def _uniform_weight(c: Tensor) -> Tensor | None:
    """The common value of ``c`` as a 0-dim tensor, or ``None`` when the entries differ."""
    first = c[0]
    if c.numel() == 1:
        return first
    eps = torch.finfo(c.dtype).eps
    spread = (c - first).abs().max()
    if bool(spread <= _UNIFORM_ULPS * eps * c.abs().max()):  # False for NaN: recompute
        return c.mean()
    return None


class _BackwardInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, saved: _Saved, x: Tensor, *params: Tensor) -> Tensor:
        ctx.saved = saved
        # Saved so that autograd refuses a backward after an in-place change of x or θ.
        ctx.save_for_backward(x, *params)
        value, saved.value = saved.value, None
        return value

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "roulette_logdet(backward_in_forward=True) does not support double backward "
                "(create_graph=True): its gradient is the Neumann-series estimate computed in "
                "the forward pass, which is not itself differentiable; use backward_in_forward="
                "False for higher-order gradients"
            )
        x, *params = ctx.saved_tensors
        saved = ctx.saved
        need_x = ctx.needs_input_grad[1]
        need_params = ctx.needs_input_grad[2:]
        c = grad_out.detach()
        scale = _uniform_weight(c) if any(need_params) else None
        if scale is None and any(need_params):
            return (None, *_recompute(saved, x, params, c, need_x, need_params))
        grad_x = None
        if need_x and saved.grad_x is not None:
            grad_x = saved.grad_x * c.reshape((-1,) + (1,) * (x.dim() - 1))
        grads = [
            gp * scale if need and gp is not None else None
            for gp, need in zip(saved.grad_params, need_params)
        ]
        return (None, grad_x, *grads)


def _recompute(saved: _Saved, x, params, c, need_x, need_params) -> list:
    """Gradients of ``Σ_b c_b s_b`` from a re-evaluation of ``g`` as it was in the forward."""
    g = saved.g
    with torch.enable_grad(), saved.snapshot.restored(), parameter_aliases(g, params) as aliases:
        x_leaf = x.detach().requires_grad_(True)
        gx = g(x_leaf)
        surrogate = neumann_surrogate(g, saved.vjp_powers, x_leaf, gx, saved.pairs, c)
        wanted = [x_leaf] + [a for a, need in zip(aliases, need_params) if need]
        grads = _grad_or_none(surrogate, wanted)
    grad_x = grads[0] if need_x else None
    rest = iter(grads[1:])
    return [grad_x] + [next(rest) if need else None for need in need_params]


def _grad_or_none(output: Tensor, inputs: list[Tensor]) -> list[Tensor | None]:
    if not output.requires_grad:  # g depends neither on x nor on a parameter
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, allow_unused=True))


def attach(
    g,
    vjp_powers,
    x: Tensor,
    x_in: Tensor,
    gx: Tensor,
    params: Sequence[Tensor],
    aliases: Sequence[Tensor],
    value: Tensor,
    pairs: Sequence[tuple[Tensor, Tensor]],
    snapshot: StateSnapshot,
) -> Tensor:
    """Takes the Neumann gradient now and returns ``value`` wired to ``x`` and ``params``.

    Call inside ``parameter_aliases(g, params)`` with ``x_in`` a detached leaf of ``x`` and
    ``gx = g(x_in)`` evaluated there; ``snapshot`` taken before that evaluation.

    Raises:
        ValueError: the graph of ``g`` reaches a trainable tensor that is neither ``x`` nor a
            parameter of ``g`` (its gradient would be lost).
    """
    surrogate = neumann_surrogate(g, vjp_powers, x_in, gx, pairs)
    foreign = foreign_leaves(surrogate, [x_in, *aliases])
    if foreign:
        shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:4])
        raise ValueError(
            f"backward_in_forward=True: g depends on {len(foreign)} tensor(s) that require "
            f"grad but are not parameters of g (shapes {shapes}), e.g. tensors captured by a "
            "closure; their gradients would be lost. Make them parameters of an nn.Module g, "
            "or use backward_in_forward=False"
        )
    wanted = ([x_in] if x.requires_grad else []) + list(aliases)
    grads = _grad_or_none(surrogate, wanted)
    grad_x = grads.pop(0) if x.requires_grad else None
    saved = _Saved(g, vjp_powers, value.detach(), list(pairs), snapshot, grad_x, grads)
    return _BackwardInForward.apply(saved, x, *params)
