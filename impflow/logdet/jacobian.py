"""Per-sample Jacobians ``J = ∂g(x)/∂x``: the one place where the exact estimators get them.

:func:`impflow.logdet.batch_jacobian`, :func:`impflow.logdet.exact_logdet` and the blocks' exact
log-determinant obtain ``(g(x), J)`` through :func:`get_jacobian`, which uses ``d`` reverse-mode
autograd products (:func:`autograd_jacobian`) unless a faster implementation was registered for
the type of ``g`` with :func:`register_jacobian`. The forward-mode Jacobian of
:class:`impflow.nn.LipschitzMLP` is registered this way (:mod:`impflow.logdet.mlp_jacobian`);
inside :func:`impflow.logdet.autograd_products` every ``g`` uses autograd.

An implementation is called as ``fn(g, x, *, create_graph)`` with ``x`` a finite ``(B, ...)``
floating-point tensor (checked by the caller) and returns ``(gx, jac)``: ``gx = g(x)`` of
``x``'s shape and ``jac`` of shape ``(B, d, d)``, ``jac[b, i, j] = ∂g(x)_{b,i} / ∂x_{b,j}`` over
the flattened per-sample dimensions (``d = x[0].numel()``). With ``create_graph=True`` both are
differentiable (once is enough) with respect to ``x`` and the parameters of ``g``, and the
network is evaluated as its own forward would be (a training-mode spectral layer runs its power
iteration once, as in one forward); with ``False`` neither holds a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from impflow.logdet._common import per_sample_dim, prepare
from impflow.logdet.products import autograd_forced

__all__ = ["autograd_jacobian", "get_jacobian", "register_jacobian"]

JacobianFn = Callable[..., "tuple[Tensor, Tensor]"]

_REGISTRY: list[tuple[type, JacobianFn]] = []


def autograd_jacobian(g, x: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """``(g(x), J)`` by one evaluation of ``g`` and ``d`` reverse-mode products (row ``i`` of
    every sample's Jacobian at once: samples are independent, so the gradient of
    ``Σ_b g_i(x_b)`` with respect to ``x_b`` is ``∂g_i(x_b)/∂x_b``)."""
    with torch.enable_grad():
        x_in, gx = prepare(g, x, check_x=False)
        b, d = x.shape[0], per_sample_dim(x)
        gflat = gx.reshape(b, d)
        ones = torch.ones(b, dtype=gx.dtype, device=gx.device)
        rows = []
        for i in range(d):
            (r,) = torch.autograd.grad(
                gflat[:, i],
                x_in,
                ones,
                create_graph=create_graph,
                retain_graph=True,
                allow_unused=True,
            )
            rows.append(
                torch.zeros(b, d, dtype=x.dtype, device=x.device) if r is None else r.reshape(b, d)
            )
        jac = torch.stack(rows, dim=1)
    if not create_graph:
        return gx.detach(), jac.detach()
    return gx, jac


def register_jacobian(module_type: type, fn: JacobianFn) -> Callable[[], None]:
    """Uses ``fn`` for the Jacobian of every ``g`` that is an instance of ``module_type``
    (latest registration wins).

    Args:
        module_type: a class.
        fn: the implementation (see the module docstring for its contract).

    Returns:
        A function that removes the registration.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"module_type must be a class, got {module_type!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    entry = (module_type, fn)
    _REGISTRY.append(entry)

    def remove() -> None:
        if entry in _REGISTRY:
            _REGISTRY.remove(entry)

    return remove


def get_jacobian(g) -> JacobianFn:
    """The Jacobian implementation used for ``g``: a registered one, else
    :func:`autograd_jacobian` (always inside :func:`impflow.logdet.autograd_products`)."""
    if not autograd_forced():
        for module_type, fn in reversed(_REGISTRY):
            if isinstance(g, module_type):
                return fn
    return autograd_jacobian
