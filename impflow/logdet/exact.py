"""Exact log-determinants for small per-sample dimension: per-sample Jacobian + ``slogdet``
(closed form for ``d ≤ 2``), and the exact-trace truncated power series.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import torch
from torch import Tensor

from impflow.logdet._common import (
    check_input,
    check_nonneg_int,
    check_on_divergence,
    check_pos_int,
    module_needs_graph,
    per_sample_dim,
    report_divergence,
    resolve_create_graph,
)
from impflow.logdet.jacobian import get_jacobian

__all__ = [
    "batch_jacobian",
    "exact_logdet",
    "logdet_identity_plus",
    "power_series_logdet",
    "spectral_norm_bound",
    "value_and_jacobian",
]

DEFAULT_MAX_DIM = 64


def value_and_jacobian(
    g, x: Tensor, *, create_graph: bool | None = None, max_dim: int = DEFAULT_MAX_DIM
) -> tuple[Tensor, Tensor]:
    """``g(x)`` and the per-sample Jacobian ``J[b, i, j] = ∂g(x)_b,i / ∂x_b,j`` (flattened),
    from one evaluation of ``g``.

    ``g`` maps ``(B, ...)`` to the same shape and must treat samples independently (no batch
    statistics). The implementation is :func:`impflow.logdet.get_jacobian`'s: one forward-mode
    pass for a :class:`~impflow.nn.LipschitzMLP`, else one evaluation and ``d`` reverse-mode
    products (always so inside :func:`impflow.logdet.autograd_products`).

    Args:
        g: callable or ``nn.Module``.
        x: ``(B, ...)`` floating-point tensor.
        create_graph: keep the results differentiable (with respect to ``x`` and the
            parameters of ``g``); ``None``: whenever grad mode is on.
        max_dim: refuse a per-sample dimension ``d`` above this (``d²`` memory per sample).

    Returns:
        ``(gx, jac)``: ``g(x)`` of ``x``'s shape and the ``(B, d, d)`` Jacobian.
    """
    max_dim = check_pos_int(max_dim, "max_dim")
    check_input(x)
    if not callable(g):
        raise TypeError(f"g must be callable (e.g. an nn.Module), got {type(g).__name__}")
    d = per_sample_dim(x)
    if d > max_dim:
        raise ValueError(
            f"the per-sample Jacobian has {d}² entries per sample (per-sample dimension "
            f"{d} > max_dim={max_dim}); use roulette_logdet for large dimensions, or raise max_dim"
        )
    create_graph = resolve_create_graph(create_graph) and module_needs_graph(g, x)
    jacobian_fn = get_jacobian(g)
    gx, jac = jacobian_fn(g, x, create_graph=create_graph)
    # A registered implementation is the user's code: a wrong shape would give a silently
    # wrong log-det (a (B, 2, 2) Jacobian for d = 3 gave zeros).
    expected = (x.shape[0], d, d)
    if not (isinstance(jac, Tensor) and jac.shape == expected):
        got = tuple(jac.shape) if isinstance(jac, Tensor) else type(jac).__name__
        name = getattr(jacobian_fn, "__qualname__", repr(jacobian_fn))
        raise ValueError(
            f"the Jacobian implementation {name} for {type(g).__name__} returned {got}, "
            f"expected shape {expected} (per-sample dimension {d})"
        )
    return gx, jac


def batch_jacobian(
    g, x: Tensor, *, create_graph: bool | None = None, max_dim: int = DEFAULT_MAX_DIM
) -> Tensor:
    """Per-sample Jacobian of ``g`` at ``x``, flattened: ``J[b, i, j] = ∂g(x)_b,i / ∂x_b,j``
    (the second result of :func:`value_and_jacobian`, whose arguments it takes).

    Returns:
        ``(B, d, d)`` tensor.
    """
    return value_and_jacobian(g, x, create_graph=create_graph, max_dim=max_dim)[1]


def logdet_identity_plus(jac: Tensor) -> tuple[Tensor, Tensor]:
    """``log|det(I + J)|`` per sample and whether ``det(I + J) > 0``, differentiable.

    Closed form for ``d ≤ 2`` (``det(I + J) = 1 + tr J + det J``, through ``log1p``), else
    ``torch.linalg.slogdet``.

    Args:
        jac: ``(B, d, d)``.

    Returns:
        ``(logdet, positive)``: ``(B,)`` values (meaningless where ``positive`` is false) and a
        ``(B,)`` bool mask, false where the determinant is ``≤ 0`` or not finite.
    """
    d = jac.shape[-1]
    if d > 2:
        eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
        sign, logdet = torch.linalg.slogdet(eye + jac)
        return logdet, sign > 0
    if d == 1:
        det_minus_one = jac[:, 0, 0]
    else:
        a, b, c, e = jac[:, 0, 0], jac[:, 0, 1], jac[:, 1, 0], jac[:, 1, 1]
        det_minus_one = a + e + (a * e - b * c)
    positive = det_minus_one.detach() > -1
    return torch.log1p(det_minus_one), positive


@torch.no_grad()
def spectral_norm_bound(jac: Tensor) -> Tensor:
    """Per sample, an upper bound of ``‖J‖₂`` that equals ``‖J‖₂`` wherever ``‖J‖₂ ≥ 1``: so the
    bound is ``< 1`` exactly when ``‖J‖₂ < 1``, without an SVD per sample.

    ``d ≤ 2``: ``‖J‖₂`` in closed form (for ``[[a, b], [c, e]]``:
    ``(hypot(a + e, c - b) + hypot(a - e, b + c)) / 2``). Larger ``d``: the Frobenius norm, and
    ``torch.linalg.matrix_norm(·, 2)`` only for the samples whose Frobenius norm is ``≥ 1``.

    Args:
        jac: ``(B, d, d)`` (detached here).

    Returns:
        ``(B,)`` tensor (not finite where ``jac`` is not).
    """
    jac = jac.detach()
    d = jac.shape[-1]
    if d == 1:
        return jac[:, 0, 0].abs()
    if d == 2:
        a, b, c, e = jac[:, 0, 0], jac[:, 0, 1], jac[:, 1, 0], jac[:, 1, 1]
        return 0.5 * (torch.hypot(a + e, c - b) + torch.hypot(a - e, b + c))
    bound = torch.linalg.matrix_norm(jac)
    exact = ~(bound < 1) & torch.isfinite(bound)
    if bool(exact.any()):
        bound[exact] = torch.linalg.matrix_norm(jac[exact], 2)
    return bound


def exact_logdet(
    g, x: Tensor, *, create_graph: bool | None = None, max_dim: int = DEFAULT_MAX_DIM
) -> Tensor:
    """``log det(I + J_g(x))`` per sample, from the per-sample Jacobian
    (:func:`batch_jacobian`: forward mode for a ``LipschitzMLP``) and
    :func:`logdet_identity_plus` (closed form for ``d ≤ 2``, else ``torch.linalg.slogdet``).

    Differentiable (through ``create_graph``) with respect to ``x`` and the parameters of
    ``g``, so it can be trained on directly.

    Args:
        g: callable or ``nn.Module`` mapping ``(B, ...)`` to the same shape, samples independent.
        x: ``(B, ...)`` floating-point tensor.
        create_graph: see :func:`value_and_jacobian`.
        max_dim: largest per-sample dimension accepted (default 64); larger raises ``ValueError``.

    Returns:
        ``(B,)`` tensor.

    Raises:
        ValueError: ``g(x)`` has another shape than ``x``; per-sample dimension above ``max_dim``;
            ``det(I + J) ≤ 0`` for some sample (``g`` is then certainly not contractive and the
            log-determinant of the block is not ``log det(I + J)``).
    """
    jac = batch_jacobian(g, x, create_graph=create_graph, max_dim=max_dim)
    logdet, positive = logdet_identity_plus(jac)
    bad = ~positive
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"det(I + J_g) ≤ 0 for {int(bad.sum())} sample(s) (first: {idx}): g is not "
            f"contractive there, so log det(I + J_g) is undefined"
        )
    return logdet


def power_series_logdet(
    g,
    x: Tensor,
    n_terms: int,
    *,
    create_graph: bool | None = None,
    max_dim: int = DEFAULT_MAX_DIM,
    on_divergence: str = "raise",
) -> Tensor:
    r"""Truncated series :math:`\sum_{k=1}^{n} (-1)^{k+1} \operatorname{tr}(J^k) / k` with exact
    traces (explicit per-sample Jacobian powers; for tests and small dimensions).

    Args:
        g, x, create_graph, max_dim: as in :func:`exact_logdet`.
        n_terms: number of terms ``n ≥ 0`` (``0`` gives zeros).
        on_divergence: ``"raise"`` (:class:`SeriesDivergenceError`) or ``"warn"`` when some
            sample's Jacobian has spectral radius ``≥ 1`` (the series then diverges, or
            converges too slowly to mean anything) or a term is not finite.

    Returns:
        ``(B,)`` tensor.
    """
    n_terms = check_nonneg_int(n_terms, "n_terms")
    on_divergence = check_on_divergence(on_divergence)
    jac = batch_jacobian(g, x, create_graph=create_graph, max_dim=max_dim)
    with torch.no_grad():
        rho = torch.linalg.eigvals(jac.detach()).abs().amax(dim=-1)
    if not torch.isfinite(rho).all() or (rho >= 1).any():
        report_divergence(
            f"power series of log det(I + J_g) diverges: spectral radius of J_g is "
            f"{float(rho.max()):.4g} ≥ 1 for {int((~(rho < 1)).sum())} sample(s)",
            on_divergence,
        )
    total = torch.zeros(jac.shape[0], dtype=jac.dtype, device=jac.device)
    power = jac
    for k in range(1, n_terms + 1):
        if k > 1:
            power = power @ jac
        total = total + ((-1) ** (k + 1) / k) * power.diagonal(dim1=-2, dim2=-1).sum(-1)
    return total
