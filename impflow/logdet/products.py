"""Vector-Jacobian products ``vᵀJ^k``: the one place where the series estimators touch ``g``.

Every estimator in :mod:`impflow.logdet` obtains its products through :func:`get_vjp_powers`,
which returns :func:`autograd_vjp_powers` unless a faster implementation was registered for
the type of ``g`` with :func:`register_vjp_powers` (the fused C++/CUDA Hutchinson op for
``LipschitzMLP`` plugs in here).

An implementation is called as ``fn(g, x, gx, v, n_terms, *, create_graph)`` where ``gx = g(x)``
was evaluated with autograd on (``x`` requires grad), ``v`` has the shape of ``x``, and it returns
the list ``[vᵀJ, vᵀJ², …, vᵀJⁿ]`` (each with the shape of ``x``), ``J = ∂g(x)/∂x`` per sample.
With ``create_graph=True`` the products must be differentiable with respect to ``x``, ``v`` and
the parameters of ``g``; with ``False`` they need not be (and should not hold a graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["autograd_vjp_powers", "get_vjp_powers", "register_vjp_powers"]

VJPPowers = Callable[..., "list[Tensor]"]

_REGISTRY: list[tuple[type, VJPPowers]] = []


def autograd_vjp_powers(
    g, x: Tensor, gx: Tensor, v: Tensor, n_terms: int, *, create_graph: bool
) -> list[Tensor]:
    """``[vᵀJ, …, vᵀJⁿ]`` by ``n_terms`` reverse-mode products through the graph of ``gx``.

    ``g`` is unused (the graph of ``gx`` is enough); it is part of the signature for
    implementations that evaluate ``g`` themselves.
    """
    out = []
    w = v
    for _ in range(n_terms):
        (w,) = torch.autograd.grad(
            gx, x, w, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        if w is None:  # g does not depend on x: J = 0
            w = torch.zeros_like(x)
        out.append(w)
    return out


def register_vjp_powers(module_type: type, fn: VJPPowers) -> Callable[[], None]:
    """Uses ``fn`` for every ``g`` that is an instance of ``module_type`` (latest registration
    wins). Returns a function that removes the registration."""
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


def get_vjp_powers(g) -> VJPPowers:
    """The product implementation used for ``g``: a registered one, else autograd."""
    for module_type, fn in reversed(_REGISTRY):
        if isinstance(g, module_type):
            return fn
    return autograd_vjp_powers
