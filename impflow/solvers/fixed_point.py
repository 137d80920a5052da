"""Batched (damped) fixed-point iteration ``z <- z + damping * fn(z)``."""

import torch

from impflow._autocast import without_autocast
from impflow.ops.track import ACTIVE, BLOWUP, DIVERGED
from impflow.solvers._common import FlatFunction, Tracker, check_common_args, check_impl, flat_start

__all__ = ["fixed_point"]


@without_autocast("z0")
@torch.no_grad()
def fixed_point(
    fn,
    z0,
    *,
    max_iter=50,
    tol=1e-6,
    stop_mode="abs",
    damping=1.0,
    divergence_ratio=1e3,
    impl="fused",
    warn=True,
):
    """Finds ``z`` with ``fn(z) = 0`` by iterating ``z <- z + damping * fn(z)``.

    Converges when ``z -> z + damping * fn(z)`` is a contraction, as for ImpFlow's equations
    (``fn(z) = g_x(x) + x - g_z(z) - z`` with ``Lip(g_z) < 1``); linearly, at the rate of
    the contraction, so slowly near Lipschitz 1 (use :func:`broyden` there).

    Args:
        fn, z0, max_iter, tol, stop_mode, divergence_ratio, impl, warn: as in :func:`broyden`
            (a sample whose residual explodes or turns non-finite is stopped and reported).
        damping: step size in (0, 1].

    Returns:
        ``(z, stats)`` as in :func:`broyden`.
    """
    check_common_args(z0, max_iter, tol, stop_mode, divergence_ratio)
    check_impl(impl)
    if not isinstance(damping, (int, float)) or not 0 < damping <= 1:
        raise ValueError(f"damping must be a number in (0, 1], got {damping!r}")
    f = FlatFunction(fn, z0)
    z = flat_start(z0)
    F = f(z)
    track = Tracker(
        z, F, tol=tol, stop_mode=stop_mode, divergence_ratio=divergence_ratio, impl=impl
    )
    active = track.first_mask
    for _ in range(max_iter):
        if not track.n_active:
            break
        z = torch.where(active[:, None], z + damping * F, z)
        F = f(z)
        n_blowup, active = track.update(z, F)
        if n_blowup:  # no method left to fall back on: stop those samples
            blowup = track.flagged(BLOWUP)
            track.status |= torch.where(blowup, DIVERGED, 0).to(torch.uint8)
            track.give_up(blowup)
            active = track.flagged(ACTIVE)
    return track.finish(
        "fixed_point",
        f.calls,
        max_iter,
        z0.shape,
        warn,
        on_divergence="stopped at the best iterate",
    )
