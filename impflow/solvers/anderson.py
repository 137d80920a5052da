"""Batched Anderson acceleration (type II, with mixing) of ``z <- z + fn(z)``."""

import math
import numbers

import torch

from impflow._autocast import without_autocast
from impflow.ops.track import ACTIVE, FALLBACK
from impflow.solvers._common import (
    FlatFunction,
    Tracker,
    check_common_args,
    check_history,
    check_impl,
    flat_start,
)

__all__ = ["anderson"]


@without_autocast("z0")
@torch.no_grad()
def anderson(
    fn,
    z0,
    *,
    max_iter=50,
    tol=1e-6,
    stop_mode="abs",
    history=5,
    mixing=1.0,
    regularization=1e-8,
    divergence_ratio=1e3,
    impl="fused",
    warn=True,
):
    """Finds ``z`` with ``fn(z) = 0`` by Anderson acceleration of ``z <- z + fn(z)``.

    Each step combines the last ``history`` iterates with weights ``alpha`` (summing to 1)
    that minimise ``||sum_k alpha_k fn(z_k)||``, solved per sample as a small bordered
    least-squares system regularised by ``regularization`` times its scale.

    Args:
        fn, z0, max_iter, tol, stop_mode, divergence_ratio, impl, warn: as in :func:`broyden`.
        history: number of past iterates combined (>= 1; 1 is fixed-point iteration).
        mixing: weight ``beta`` in (0, 1] of the mapped iterates ``z_k + fn(z_k)``.
        regularization: relative Tikhonov term of the least-squares system (>= 0).

    Returns:
        ``(z, stats)`` as in :func:`broyden`; a sample whose residual explodes falls back
        to fixed-point iteration from its best iterate and is marked ``diverged``.

    References:
        Anderson. Iterative procedures for nonlinear integral equations. 1965.
        Walker, Ni. Anderson acceleration for fixed-point iterations. 2011.
    """
    check_common_args(z0, max_iter, tol, stop_mode, divergence_ratio)
    check_history(history)
    check_impl(impl)
    if not _is_number(mixing) or not 0 < mixing <= 1:
        raise ValueError(f"mixing must be a number in (0, 1], got {mixing!r}")
    if not _is_number(regularization) or not 0 <= regularization < math.inf:
        raise ValueError(f"regularization must be a finite number >= 0, got {regularization!r}")
    f = FlatFunction(fn, z0)
    z = flat_start(z0)
    F = f(z)
    track = Tracker(
        z, F, tol=tol, stop_mode=stop_mode, divergence_ratio=divergence_ratio, impl=impl
    )
    B, n = z.shape
    Z = torch.zeros(B, history, n, dtype=z.dtype, device=z.device)  # iterates z_k
    R = torch.zeros_like(Z)  # their residuals fn(z_k)
    active = track.first_mask
    for k in range(max_iter):
        if not track.n_active:
            break
        slot, count = k % history, min(k + 1, history)
        if 2 * track.n_active > B:
            Z[:, slot], R[:, slot] = z, F
            z_next = _anderson_combination(Z[:, :count], R[:, :count], slot, mixing, regularization)
        else:
            # Done samples stop costing work: the histories and the least-squares combination
            # of the active ones only (a sample that is done never becomes active again).
            # Gathering them costs about one pass over their histories, so below half the batch.
            rows = active.nonzero().squeeze(1)
            Z[rows, slot], R[rows, slot] = z[rows], F[rows]
            z_next = z.clone()
            z_next[rows] = _anderson_combination(
                Z[rows, :count], R[rows, :count], slot, mixing, regularization
            )
        if track.any_fallback:  # fixed-point steps where Anderson gave up on a sample
            z_next = torch.where(track.flagged(FALLBACK)[:, None], z + F, z_next)
        z_next = torch.where(active[:, None], z_next, z)  # no move where it is done
        F_next = f(z_next)
        n_blowup, _ = track.update(z_next, F_next)
        if n_blowup:
            z_next, F_next = track.restart_blown_up(z_next, F_next)
        active = track.flagged(ACTIVE)
        z, F = z_next, F_next
    return track.finish(
        "anderson",
        f.calls,
        max_iter,
        z0.shape,
        warn,
        on_divergence="restarted from the best iterate by fixed-point iteration",
    )


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _anderson_combination(Z, R, newest, mixing, regularization):
    """``sum_k alpha_k (z_k + beta r_k)`` with ``alpha = argmin ||sum alpha_k r_k||``,
    ``sum alpha_k = 1``; Z, R: (B, k, n); ``newest``: index of the latest iterate."""
    B, count, _ = R.shape
    if count == 1:
        return Z[:, newest] + mixing * R[:, newest]
    gram = torch.bmm(R, R.transpose(1, 2))  # (B, k, k)
    scale = gram.diagonal(dim1=1, dim2=2).mean(1).clamp(min=torch.finfo(R.dtype).tiny)
    eye = torch.eye(count, dtype=R.dtype, device=R.device)
    gram = gram + (regularization * scale)[:, None, None] * eye
    # Bordered system [[0, 1^T], [1, G]] [mu; alpha] = [1; 0].
    system = torch.zeros(B, count + 1, count + 1, dtype=R.dtype, device=R.device)
    system[:, 0, 1:] = 1
    system[:, 1:, 0] = 1
    system[:, 1:, 1:] = gram / scale[:, None, None]
    rhs = torch.zeros(B, count + 1, 1, dtype=R.dtype, device=R.device)
    rhs[:, 0] = 1
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:, 1:, 0]
    # A singular system (repeated iterates) falls back to the newest iterate alone.
    ok = (info == 0) & torch.isfinite(alpha).all(1)
    fallback = torch.zeros_like(alpha)
    fallback[:, newest] = 1
    alpha = torch.where(ok[:, None], alpha, fallback)
    return torch.einsum("bk,bkn->bn", alpha, Z + mixing * R)
