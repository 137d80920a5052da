"""Batched good-Broyden root finding with a fused update op (DESIGN.md §2–§3)."""

import contextlib

import torch

from impflow._autocast import without_autocast
from impflow.ops.broyden import broyden_step
from impflow.ops.reference import broyden_step_reference
from impflow.ops.track import ACTIVE, FALLBACK
from impflow.solvers._common import (
    FlatFunction,
    Tracker,
    check_common_args,
    check_history,
    flat_start,
)
from impflow.solvers._workspace import reused

__all__ = ["broyden", "broyden_history"]

_STEPS = {"fused": broyden_step, "reference": broyden_step_reference}


def broyden_history(B, n, m, dtype, device, impl="fused"):
    """Empty histories ``U, V`` of shape (B, m, n) in the layout the step prefers.

    The fused CPU kernel is fastest with the batch as the fastest dimension when samples are
    tiny (n <= 4: a (B, m, n) view of an (m, n, B) tensor), and with contiguous samples
    otherwise. The fused op reads only the slots it has written, so no zero fill is needed;
    the reference path starts from zeros, as the original code.
    """
    if impl == "reference":
        U = torch.zeros(B, m, n, dtype=dtype, device=device)
        return U, torch.zeros_like(U)
    if torch.device(device).type == "cpu" and n <= 4:
        return tuple(
            torch.empty(m, n, B, dtype=dtype, device=device).permute(2, 0, 1) for _ in "UV"
        )
    return tuple(torch.empty(B, m, n, dtype=dtype, device=device) for _ in "UV")


def _solve_histories(B, n, m, dtype, device, impl):
    """The histories of one solve: on the CPU, the fused path's are reused across solves
    (see impflow/solvers/_workspace.py); the reference allocates zeros, as the original code."""
    if impl == "fused" and device.type == "cpu":
        key = ("broyden", B, n, m, dtype)
        return reused(key, lambda: broyden_history(B, n, m, dtype, device, impl))
    return contextlib.nullcontext(broyden_history(B, n, m, dtype, device, impl))


@without_autocast("z0")
@torch.no_grad()
def broyden(
    fn,
    z0,
    *,
    max_iter=50,
    tol=1e-6,
    stop_mode="abs",
    history=30,
    divergence_ratio=1e3,
    impl="fused",
    warn=True,
):
    """Finds ``z`` with ``fn(z) = 0`` for every sample of a batch by Broyden's method.

    The inverse Jacobian of ``fn`` is estimated per sample as ``H = -I + sum_i u_i v_i^T``
    over the last ``history`` updates (a ring buffer: memory does not grow with
    ``max_iter``). Starting from ``H = -I``, the first step is ``z + fn(z)``: fixed-point
    iteration, which converges on its own for the contractions of ImpFlow.

    Args:
        fn: maps (B, ...) to (B, ...) of the same shape, dtype and device; sample ``b`` of
            the output depends on sample ``b`` of the input only.
        z0: (B, ...) starting point, float32 or float64, finite.
        max_iter: iterations at most (each one call of ``fn``).
        tol: stop a sample once its measure is ``<= tol`` (or the dtype's floor, see
            :class:`SolverStats`).
        stop_mode: ``"abs"``: ``||fn(z)||_2``; ``"rel"``: ``||fn(z)||_2 / ||z||_2``.
        history: rank ``m`` of the inverse-Jacobian estimate (>= 1; the fused CUDA step
            holds at most 255 in float64 and 511 in float32, and says so at the first step).
        divergence_ratio: a residual above this multiple of the first one, or a non-finite
            one, sends the sample back to its best iterate and on by fixed-point iteration.
        impl: ``"fused"`` (the C++/CUDA ops) or ``"reference"`` (the same algorithm in plain
            PyTorch: einsums over the history, as the original ImpFlow code).
        warn: emit a :class:`SolverWarning` when some samples did not converge.

    Returns:
        ``(z, stats)``: the lowest-residual iterate of each sample, shape of ``z0``, and a
        :class:`SolverStats`. Converged samples stop changing and drop out of the update.
        ``z`` has no graph (the solve runs under ``no_grad`` and with autocast off); the
        blocks of :mod:`impflow.nn` differentiate through their roots by the adjoint method.

    References:
        Broyden. A class of methods for solving nonlinear simultaneous equations. 1965.
        Bai, Kolter, Koltun. Deep Equilibrium Models. NeurIPS 2019.
    """
    check_common_args(z0, max_iter, tol, stop_mode, divergence_ratio)
    check_history(history)
    if impl not in _STEPS:
        raise ValueError(f"impl must be one of {sorted(_STEPS)}, got {impl!r}")
    update = _STEPS[impl]
    f = FlatFunction(fn, z0)
    z = flat_start(z0)
    F = f(z)
    track = Tracker(
        z, F, tol=tol, stop_mode=stop_mode, divergence_ratio=divergence_ratio, impl=impl
    )
    with _solve_histories(*z.shape, history, z.dtype, z.device, impl) as (U, V):
        # H = -I: the first step is a fixed-point step, for the samples that are not done yet.
        step = F if track.n_active == z.shape[0] else torch.where(track.first_mask[:, None], F, 0.0)
        n_updates = 0
        while track.n_active and n_updates < max_iter:
            z_new = z + step
            F_new = f(z_new)
            n_blowup, use = track.update(z_new, F_new)
            if n_blowup:
                z_new, F_new = track.restart_blown_up(z_new, F_new)
                use = track.accelerated_mask()
            if not track.n_active or n_updates + 1 == max_iter:
                n_updates += 1
                break  # no step will be taken: skip the update
            slot = n_updates % history
            n_valid = min(n_updates, history)
            step = update(U, V, step, F_new - F, F_new, use, slot, n_valid)
            n_updates += 1
            if track.any_fallback:
                fixed = track.flagged(ACTIVE) & track.flagged(FALLBACK)
                step = torch.where(fixed[:, None], F_new, step)
            z, F = z_new, F_new
    return track.finish(
        "broyden",
        f.calls,
        max_iter,
        z0.shape,
        warn,
        on_divergence="restarted from the best iterate by fixed-point iteration",
    )
