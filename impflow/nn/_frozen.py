"""One power-iteration update per block call: the networks of an implicit or residual block are
evaluated many times per call (every solver iteration, the re-attached evaluation, the log-det
estimator), and a spectral layer in training mode would run its power iteration, and change its
weights, at each of them. Inside a block call they run once, before the first evaluation, and
are paused for the rest, so that every evaluation sees the same function (the root the solver
found is the root of the function that is differentiated), the result does not depend on how
many iterations a solve took (``DistributedDataParallel`` replicas agree with one process), and
the solves do not pay for power iteration at every step. For the same reason the evaluations
without a graph (the solver's) share each spectral layer's normalised weight ``W / max(1, σ / c)``
instead of computing it at every call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from impflow.logdet.jacobian import get_jacobian, register_jacobian
from impflow.logdet.products import get_vjp_powers, register_vjp_powers
from impflow.nn.spectral._mixin import _SpectralNormMixin

__all__ = ["PausedPowerIteration", "power_iteration_paused"]


def _spectral_layers(nets) -> list[nn.Module]:
    layers, seen = [], set()
    for net in nets:
        if not isinstance(net, nn.Module):
            continue
        for m in net.modules():
            if isinstance(m, _SpectralNormMixin) and id(m) not in seen:
                seen.add(id(m))
                layers.append(m)
    return layers


@contextlib.contextmanager
def power_iteration_paused(*nets, refresh: bool = False) -> Iterator[None]:
    """Inside, the spectral layers of ``nets`` that are in training mode run no power
    iteration (they use their stored ``u``, ``v``, with the gradient through ``σ`` as always),
    and every spectral layer computes its normalised weight once for all evaluations without
    a graph: the weights and vectors must not be changed inside.

    Args:
        *nets: modules (``None`` and non-modules are skipped).
        refresh: first run, once, the steps a training-mode forward would run
            (``n_power_iterations``, with the layer's own ``atol``/``rtol``). A convolution that
            has not seen an input yet is skipped: its first forward sets it up.
    """
    layers = _spectral_layers(nets)
    training = [m for m in layers if m.training]
    if refresh:
        for m in training:
            if m._ready():
                m.power_iteration(m.n_power_iterations, m.atol, m.rtol)
    for m in training:
        m.training = False
        m._training_paused = True  # not an eval-mode layer: no refresh of stale vectors
    # A nested call (an estimator's wrapper inside a block call) keeps the outer cache.
    cached = [m for m in layers if getattr(m, "_weight_cache", None) is None]
    for m in cached:
        m._weight_cache = {}
    try:
        yield
    finally:
        for m in training:
            m.training = True
            m._training_paused = False
        for m in cached:
            m._weight_cache = None


class PausedPowerIteration(nn.Module):
    """``net`` evaluated with its power iteration paused (see :func:`power_iteration_paused`).

    Handed to the log-det estimators instead of ``net``, so that an evaluation they repeat in
    the backward pass (backward-in-forward recomputation) sees the same weights as the forward.
    Built per call and never registered as a submodule (its parameters are ``net``'s).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        with power_iteration_paused(self.net):
            return self.net(x)


def _paused_vjp_powers(g: PausedPowerIteration, x, gx, v, n_terms, *, create_graph):
    # Whatever product implementation serves the wrapped network (a fused one, say) serves the
    # wrapper too.
    with power_iteration_paused(g.net):
        return get_vjp_powers(g.net)(g.net, x, gx, v, n_terms, create_graph=create_graph)


register_vjp_powers(PausedPowerIteration, _paused_vjp_powers)


def _paused_jacobian(g: PausedPowerIteration, x, *, create_graph):
    # Likewise for the Jacobian (the forward-mode one of a LipschitzMLP, say).
    with power_iteration_paused(g.net):
        return get_jacobian(g.net)(g.net, x, create_graph=create_graph)


register_jacobian(PausedPowerIteration, _paused_jacobian)
