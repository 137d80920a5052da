"""Exact log-determinants for small per-sample dimension: brute-force Jacobian + ``slogdet``,
and the exact-trace truncated power series.

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
    check_nonneg_int,
    check_on_divergence,
    check_pos_int,
    module_needs_graph,
    per_sample_dim,
    prepare,
    report_divergence,
    resolve_create_graph,
)

__all__ = ["batch_jacobian", "exact_logdet", "power_series_logdet"]

DEFAULT_MAX_DIM = 64


def _jacobian(g, x: Tensor, create_graph: bool, max_dim: int) -> Tensor:
    max_dim = check_pos_int(max_dim, "max_dim")
    x_in, gx = prepare(g, x)
    d = per_sample_dim(x)
    if d > max_dim:
        raise ValueError(
            f"the brute-force Jacobian needs {d} products per sample (per-sample dimension "
            f"{d} > max_dim={max_dim}); use roulette_logdet for large dimensions, or raise max_dim"
        )
    b = x.shape[0]
    gflat = gx.reshape(b, d)
    ones = torch.ones(b, dtype=gx.dtype, device=gx.device)
    rows = []
    for j in range(d):
        # Row j of every sample's Jacobian at once: samples are independent, so the gradient
        # of sum_b g_j(x_b) with respect to x_b is ∂g_j(x_b)/∂x_b.
        (r,) = torch.autograd.grad(
            gflat[:, j],
            x_in,
            ones,
            create_graph=create_graph,
            retain_graph=True,
            allow_unused=True,
        )
        rows.append(
            torch.zeros(b, d, dtype=x.dtype, device=x.device) if r is None else r.reshape(b, d)
        )
    return torch.stack(rows, dim=1)


def batch_jacobian(
    g, x: Tensor, *, create_graph: bool | None = None, max_dim: int = DEFAULT_MAX_DIM
) -> Tensor:
    """Per-sample Jacobian of ``g`` at ``x``, flattened: ``J[b, i, j] = ∂g(x)_b,i / ∂x_b,j``.

    ``g`` maps ``(B, ...)`` to the same shape and must treat samples independently (no batch
    statistics); it is evaluated once, then ``d`` reverse-mode products give the rows.

    Args:
        g: callable or ``nn.Module``.
        x: ``(B, ...)`` floating-point tensor.
        create_graph: keep the result differentiable (with respect to ``x`` and the
            parameters of ``g``); ``None``: whenever grad mode is on.
        max_dim: refuse a per-sample dimension ``d`` above this (``d`` products, ``d²`` memory).

    Returns:
        ``(B, d, d)`` tensor.
    """
    create_graph = resolve_create_graph(create_graph) and module_needs_graph(g, x)
    with torch.enable_grad():
        jac = _jacobian(g, x, create_graph, max_dim)
    return jac if create_graph else jac.detach()


def exact_logdet(
    g, x: Tensor, *, create_graph: bool | None = None, max_dim: int = DEFAULT_MAX_DIM
) -> Tensor:
    """``log det(I + J_g(x))`` per sample, by brute-force Jacobian and ``torch.linalg.slogdet``.

    Differentiable (twice, through ``create_graph``) with respect to ``x`` and the parameters
    of ``g``, so it can be trained on directly.

    Args:
        g: callable or ``nn.Module`` mapping ``(B, ...)`` to the same shape, samples independent.
        x: ``(B, ...)`` floating-point tensor.
        create_graph: see :func:`batch_jacobian`.
        max_dim: largest per-sample dimension accepted (default 64); larger raises ``ValueError``.

    Returns:
        ``(B,)`` tensor.

    Raises:
        ValueError: ``g(x)`` has another shape than ``x``; per-sample dimension above ``max_dim``;
            ``det(I + J) ≤ 0`` for some sample (``g`` is then certainly not contractive and the
            log-determinant of the block is not ``log det(I + J)``).
    """
    jac = batch_jacobian(g, x, create_graph=create_graph, max_dim=max_dim)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    sign, logabsdet = torch.linalg.slogdet(eye + jac)
    bad = sign <= 0
    if bad.any():
        idx = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"det(I + J_g) ≤ 0 for {int(bad.sum())} sample(s) (first: {idx}): g is not "
            f"contractive there, so log det(I + J_g) is undefined"
        )
    return logabsdet


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
