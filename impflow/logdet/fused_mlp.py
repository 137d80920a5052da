"""Fused Hutchinson-series products for :class:`impflow.nn.LipschitzMLP`.

For ``g = [SpectralLinear, act, …, SpectralLinear]`` the per-sample Jacobian is
``J = Ŵ_L D_{L-1} … D_1 Ŵ_1`` with the normalised weights ``Ŵ_i`` (as used by the forward) and
``D_i = diag(act'(z_i))`` at the forward's pre-activations ``z_i``. All products ``vᵀJ^k``,
their trace terms and the weighted series then come from one call of the fused op
:func:`impflow.ops.mlp_vjp_series` instead of ``n`` reverse-mode passes through the graph of
``g``: no graph is built and no activation is re-evaluated per product.

- The pre-activations are those of the forward that produced ``gx`` when it ran inside
  :func:`record_forward` (the estimators do this through
  :func:`impflow.logdet.products.forward_recording`); otherwise they are recomputed once.
- ``Ŵ_i`` is :meth:`SpectralLinear.normalized_weight`: ``σ`` from the stored power-iteration
  vectors, exactly what the forward used (a training-mode forward stores the vectors it used;
  no further iteration runs here).
- ``create_graph=True``: the weights and derivatives are computed with graph (so gradients
  reach ``x``, the weights, the biases and LipSwish's ``β`` through ordinary autograd) and the
  op's own backward differentiates the products (it is differentiable once).
- Any other structure (an unknown activation type, a modified layer list, a dtype other than
  float32/float64, a device without kernels) falls back to autograd products.

This module registers itself for ``LipschitzMLP`` on import (``import impflow`` does it);
:func:`impflow.logdet.autograd_products` turns it off for a block of code.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    | splines (Hutchinson, 1990)
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from impflow._extension import has_cuda_kernels
from impflow.logdet._mlp_layers import activation_derivative, mlp_layers
from impflow.logdet.products import (
    VJPSeries,
    autograd_vjp_series,
    register_vjp_powers,
)
from impflow.nn.lipschitz_mlp import LipschitzMLP
from impflow.ops.mlp_vjp_series import mlp_vjp_series

__all__ = ["fused_vjp_powers", "fused_vjp_series", "record_forward", "supports_fused"]


def supports_fused(g, x: Tensor) -> bool:
    """Whether :func:`fused_vjp_series` uses the fused op for ``g`` at ``x`` (else autograd)."""
    layers = mlp_layers(g)
    if layers is None or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.device.type == "cuda":
        if not has_cuda_kernels():
            return False
    elif x.device.type != "cpu":
        return False
    weight = layers[0][0].weight
    return weight.dtype == x.dtype and weight.device == x.device and x.shape[-1] == g.dims[0]


class _Tape:
    """Pre-activations (inputs of the activations, in order) and output of the last forward."""

    def __init__(self):
        self.pre: list[Tensor] = []
        self.output: Tensor | None = None
        self.inside = False  # in a forward of g (an activation called on its own is not kept)


_TAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def record_forward(g):
    """Keeps the pre-activations of each forward of ``g`` inside the block (forward hooks),
    for :func:`fused_vjp_series` to reuse; nothing is kept after the block."""
    layers = mlp_layers(g)
    if layers is None:
        yield
        return
    tape = _Tape()

    def start(module, args):
        tape.pre, tape.output, tape.inside = [], None, True

    def keep_input(module, args):
        if tape.inside:
            tape.pre.append(args[0])

    def finish(module, args, output):
        tape.output, tape.inside = output, False

    handles = [g.register_forward_pre_hook(start), g.register_forward_hook(finish)]
    handles += [act.register_forward_pre_hook(keep_input) for act in layers[1]]
    previous = _TAPES.get(g)
    _TAPES[g] = tape
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if previous is None:
            _TAPES.pop(g, None)
        else:
            _TAPES[g] = previous


def _preactivations(g, linears, activations, weights, x: Tensor, gx: Tensor) -> list[Tensor]:
    tape = _TAPES.get(g)
    if tape is not None and tape.output is gx and len(tape.pre) == len(activations):
        return tape.pre
    # gx came from a forward we did not see: recompute the hidden layers once.
    pre, h = [], x
    for linear, weight, act in zip(linears[:-1], weights[:-1], activations):
        z = F.linear(h, weight, linear.bias)
        pre.append(z)
        h = act(z)
    return pre


def fused_vjp_series(
    g, x: Tensor, gx: Tensor, v: Tensor, n_terms: int, coeffs: Tensor, *, create_graph: bool
) -> VJPSeries:
    """The series implementation registered for ``LipschitzMLP`` (see the module docstring and
    :mod:`impflow.logdet.products` for the contract)."""
    if n_terms < 1 or not supports_fused(g, x):
        return autograd_vjp_series(g, x, gx, v, n_terms, coeffs, create_graph=create_graph)
    linears, activations = mlp_layers(g)
    d = x.shape[-1]
    with torch.set_grad_enabled(create_graph):
        weights = [linear.normalized_weight() for linear in linears]
        pre = _preactivations(g, linears, activations, weights, x, gx)
        derivs = [activation_derivative(a, z) for a, z in zip(activations, pre)]
        products, traces, series = mlp_vjp_series(
            weights,
            [t.reshape(-1, t.shape[-1]) for t in derivs],
            v.reshape(-1, d),
            coeffs.to(x.dtype),
            n_terms,
            check_finite=False,  # the estimators report non-finite products themselves
        )
    b = x.shape[0]
    products = products.reshape(n_terms, *x.shape)
    if x.dim() > 2:  # several rows per sample: J is block diagonal, the traces add up
        traces = traces.reshape(n_terms, b, -1).sum(-1)
        series = series.reshape(b, -1).sum(-1)
    return VJPSeries(products, traces, series)


def fused_vjp_powers(
    g, x: Tensor, gx: Tensor, v: Tensor, n_terms: int, *, create_graph: bool
) -> list[Tensor]:
    """``[vᵀJ, …, vᵀJⁿ]`` from :func:`fused_vjp_series` (the powers implementation
    registered for ``LipschitzMLP``)."""
    if n_terms < 1:
        return []
    coeffs = x.new_zeros((n_terms,))
    return list(fused_vjp_series(g, x, gx, v, n_terms, coeffs, create_graph=create_graph).products)


register_vjp_powers(LipschitzMLP, fused_vjp_powers, series=fused_vjp_series, record=record_forward)
