"""Vector-Jacobian products ``vᵀJ^k``: the one place where the series estimators touch ``g``.

Every estimator in :mod:`impflow.logdet` obtains its products through :func:`get_vjp_powers`
(the products alone) or :func:`get_vjp_series` (the products with their trace terms and a
weighted sum of those), which use autograd unless a faster implementation was registered for
the type of ``g`` with :func:`register_vjp_powers`. The fused C++/CUDA Hutchinson op is
registered this way for :class:`impflow.nn.LipschitzMLP` (:mod:`impflow.logdet.fused_mlp`);
inside :func:`autograd_products` every ``g`` uses autograd.

A powers implementation is called as ``fn(g, x, gx, v, n_terms, *, create_graph)`` where
``gx = g(x)`` was evaluated with autograd on (``x`` requires grad), ``v`` has the shape of ``x``,
and it returns the list ``[vᵀJ, vᵀJ², …, vᵀJⁿ]`` (each with the shape of ``x``),
``J = ∂g(x)/∂x`` per sample. With ``create_graph=True`` the products must be differentiable
with respect to ``x``, ``v`` and the parameters of ``g``; with ``False`` they need not be (and
should not hold a graph).

A series implementation is called as ``fn(g, x, gx, v, n_terms, coeffs, *, create_graph)``
with ``coeffs`` a ``(n_terms,)`` tensor and returns a :class:`VJPSeries`.

An implementation may also register ``record(g)``: a context manager inside which the
forward of ``g`` is observed (for instance to keep its pre-activations); the estimators
evaluate ``gx = g(x)`` and take their products inside :func:`forward_recording`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "VJPSeries",
    "autograd_forced",
    "autograd_products",
    "autograd_vjp_powers",
    "autograd_vjp_series",
    "forward_recording",
    "get_vjp_powers",
    "get_vjp_series",
    "register_vjp_powers",
    "series_from_powers",
]

VJPPowers = Callable[..., "list[Tensor]"]


@dataclass(frozen=True)
class VJPSeries:
    """Products of one probe and what the series estimators need from them.

    Attributes:
        products: ``(n, *x.shape)``, ``products[k-1] = vᵀJ^k``.
        traces: ``(n, B)``, ``traces[k-1] = vᵀJ^k v`` per sample.
        series: ``(B,)``, ``Σ_k coeffs[k-1] · traces[k-1]``.
    """

    products: Tensor
    traces: Tensor
    series: Tensor


@dataclass(frozen=True)
class _Implementation:
    powers: VJPPowers
    series: Callable[..., VJPSeries] | None
    record: Callable | None


_REGISTRY: list[tuple[type, _Implementation]] = []
_FORCE_AUTOGRAD = contextvars.ContextVar("impflow_force_autograd_products", default=False)


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


def series_from_powers(
    powers: VJPPowers,
    g,
    x: Tensor,
    gx: Tensor,
    v: Tensor,
    n_terms: int,
    coeffs: Tensor,
    *,
    create_graph: bool,
) -> VJPSeries:
    """A :class:`VJPSeries` from any powers implementation: its products, then the dots."""
    products = powers(g, x, gx, v, n_terms, create_graph=create_graph)
    products = torch.stack(products) if products else x.new_zeros((0, *x.shape))
    traces = (products * v).flatten(2).sum(2)
    series = (coeffs.to(traces.dtype)[:, None] * traces).sum(0)
    return VJPSeries(products, traces, series)


def autograd_vjp_series(
    g, x: Tensor, gx: Tensor, v: Tensor, n_terms: int, coeffs: Tensor, *, create_graph: bool
) -> VJPSeries:
    """:func:`series_from_powers` with :func:`autograd_vjp_powers`."""
    return series_from_powers(
        autograd_vjp_powers, g, x, gx, v, n_terms, coeffs, create_graph=create_graph
    )


def register_vjp_powers(
    module_type: type,
    fn: VJPPowers,
    *,
    series: Callable[..., VJPSeries] | None = None,
    record: Callable | None = None,
) -> Callable[[], None]:
    """Uses ``fn`` for every ``g`` that is an instance of ``module_type`` (latest registration
    wins).

    Args:
        module_type: a class.
        fn: the powers implementation.
        series: optional series implementation (default: :func:`series_from_powers` of ``fn``).
        record: optional ``record(g)`` returning a context manager (see the module docstring).

    Returns:
        A function that removes the registration.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"module_type must be a class, got {module_type!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    for name, value in (("series", series), ("record", record)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {value!r}")
    entry = (module_type, _Implementation(fn, series, record))
    _REGISTRY.append(entry)

    def remove() -> None:
        if entry in _REGISTRY:
            _REGISTRY.remove(entry)

    return remove


def autograd_forced() -> bool:
    """Whether the caller is inside :func:`autograd_products` (registered fast paths, for
    products and for Jacobians alike, are then bypassed)."""
    return _FORCE_AUTOGRAD.get()


def _implementation(g) -> _Implementation | None:
    if autograd_forced():
        return None
    for module_type, impl in reversed(_REGISTRY):
        if isinstance(g, module_type):
            return impl
    return None


def get_vjp_powers(g) -> VJPPowers:
    """The product implementation used for ``g``: a registered one, else autograd."""
    impl = _implementation(g)
    return autograd_vjp_powers if impl is None else impl.powers


def get_vjp_series(g) -> Callable[..., VJPSeries]:
    """The series implementation used for ``g``: a registered one, else the dots of the
    products of :func:`get_vjp_powers`."""
    impl = _implementation(g)
    if impl is None:
        return autograd_vjp_series
    if impl.series is not None:
        return impl.series
    return lambda *args, **kwargs: series_from_powers(impl.powers, *args, **kwargs)


def forward_recording(g):
    """The context in which estimators evaluate ``g`` and take its products: the registered
    implementation's ``record(g)``, or a context that does nothing."""
    impl = _implementation(g)
    if impl is None or impl.record is None:
        return contextlib.nullcontext()
    return impl.record(g)


@contextlib.contextmanager
def autograd_products():
    """Inside this context every ``g`` gets autograd products and autograd Jacobians
    (registered implementations, such as the fused op and the forward-mode Jacobian for
    ``LipschitzMLP``, are bypassed): for comparisons and benchmarks.

    Example:
        >>> with impflow.logdet.autograd_products():
        ...     logdet = impflow.logdet.roulette_logdet(g, x)
    """
    token = _FORCE_AUTOGRAD.set(True)
    try:
        yield
    finally:
        _FORCE_AUTOGRAD.reset(token)
