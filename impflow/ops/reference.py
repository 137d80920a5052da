"""Pure-PyTorch references of the impflow ops: they define what each fused kernel computes.

They follow the original ImpFlow/DEQ code (einsums over the whole history per product) and
serve as the ground truth in tests and as the baseline in benchmarks.
"""

import torch

__all__ = [
    "broyden_step_reference",
    "broyden_matvec",
    "broyden_rmatvec",
    "mlp_vjp_series_reference",
]


def broyden_matvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``H x`` with ``H = -I + U^T V`` per sample; U, V: (B, k, d), x: (B, d)."""
    return -x + torch.einsum("bkd,bk->bd", U, torch.einsum("bkd,bd->bk", V, x))


def broyden_rmatvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``H^T x`` (the row vector ``x^T H``) with ``H = -I + U^T V``; shapes as in broyden_matvec."""
    return -x + torch.einsum("bkd,bk->bd", V, torch.einsum("bkd,bd->bk", U, x))


def broyden_step_reference(
    U: torch.Tensor,
    V: torch.Tensor,
    dz: torch.Tensor,
    dF: torch.Tensor,
    F: torch.Tensor,
    active: torch.Tensor,
    slot: int,
    n_valid: int,
) -> torch.Tensor:
    """One good-Broyden update of the inverse-Jacobian estimate, then the next step.

    The estimate of each sample is ``H = -I + sum_i u_i v_i^T`` over the slots ``i < n_valid``
    of the histories ``U`` and ``V`` (rows ``u_i = U[b, i]``, ``v_i = V[b, i]``).

    Args:
        U, V: (B, m, d) histories, updated in place at ``slot`` for active samples.
        dz: (B, d) last step ``z_new - z_old``.
        dF: (B, d) change of the residual ``F(z_new) - F(z_old)``.
        F: (B, d) residual at ``z_new``.
        active: (B,) bool; inactive samples are left untouched and get a zero step.
        slot: history slot to write (``n_valid`` while the ring fills, any once it is full).
        n_valid: number of valid slots before this update.

    Returns:
        (B, d) the step ``-H_new F`` (zero for inactive samples).

    An update whose denominator ``v_new . dF`` is zero, subnormal or not finite, or whose
    ``v_new . F`` is not finite, is dropped: the slot is written with zeros, as the original
    code zeroes NaNs.

    NaN and Inf, per active sample (IEEE arithmetic applied to the above; the fused kernels
    follow it, see csrc/include/impflow/broyden_math.h):

    * ``F`` not finite (a NaN or an Inf anywhere): the update is dropped and the whole step is
      NaN, since the zero pair's term ``0 * (0 . F)`` is NaN in every element. A residual
      that is not finite has no meaningful step, and none of its elements may look like one.
    * ``dz`` or ``dF`` not finite, or a history row read (``i < n_valid``) not finite: the
      update is dropped (its denominator or ``v_new . F`` is not finite), and the step comes
      from the other pairs: NaN or Inf only where a kept row makes it so (a NaN in ``u_i[k]``
      at element ``k``, in ``v_i`` everywhere).
    * The row being overwritten (``slot`` of a full history) enters ``v_new`` and ``u_new``
      but not the step.
    * Inactive samples keep their history and get a zero step whatever their values; slots
      from ``max(n_valid, slot + 1)`` on are never read.
    """
    old_U, old_V = U[:, :n_valid], V[:, :n_valid]
    v_new = broyden_rmatvec(old_U, old_V, dz)
    denom = (v_new * dF).sum(-1, keepdim=True)
    u_new = (dz - broyden_matvec(old_U, old_V, dF)) / denom
    tiny = torch.finfo(denom.dtype).tiny
    valid = (
        torch.isfinite(denom)
        & (denom.abs() > tiny)
        & torch.isfinite((v_new * F).sum(-1, keepdim=True))
    )
    keep = active[:, None]
    U[:, slot] = torch.where(keep, torch.where(valid, u_new, 0.0), U[:, slot])
    V[:, slot] = torch.where(keep, torch.where(valid, v_new, 0.0), V[:, slot])
    n_after = max(n_valid, slot + 1)
    step = -broyden_matvec(U[:, :n_after], V[:, :n_after], F)
    return torch.where(keep, step, 0.0)


def solver_track_reference(
    z, F, best_z, best_F, best, status, nstep, tol, floor_scale, divergence_ratio, relative
):
    """Bookkeeping of one solver iteration for the samples whose status has the ACTIVE bit.

    Args:
        z, F: (B, n) the new iterate and its residual ``fn(z)``.
        best_z, best_F: (B, n) lowest-measure iterate and its residual, updated in place.
        best: (5, B) float64 rows: best measure, its residual, first residual, ``||z||`` at
            the best iterate (updated in place), and the reach (read only).
        status: (B,) uint8 bits (``impflow.ops.track``), updated in place: BLOWUP is cleared
            and set anew, NONFINITE added, CONVERGED set and ACTIVE cleared at convergence.
        nstep: (B,) int64 iteration counts, incremented for the active samples.
        tol, floor_scale, divergence_ratio: floats; relative: bool (stop mode "rel").

    For an active sample with ``r = ||F||_2`` and ``s = ||z||_2`` (in float64, without
    overflow or underflow of the squares; see :func:`robust_norms`): the iterate counts as
    finite when ``r`` and ``s`` are; its measure, floor and stop are :func:`track_limits`'s;
    a finite sample converges when its measure is at most the stop; it blows up when not
    finite or when ``r`` exceeds ``divergence_ratio * max(first residual, tol)``; a finite
    measure below the best one, or a convergence, copies ``z``, ``F`` into the best iterate.

    Returns:
        ``(counts, mask)``: int64 ``[active, blown up]`` after the update, and bool (B,)
        ``active and not FALLBACK``.
    """
    from impflow.ops.track import ACTIVE, BLOWUP, CONVERGED, FALLBACK, NONFINITE

    n = z.shape[1]
    status &= ~BLOWUP & 0xFF
    active = (status & ACTIVE) != 0
    res = robust_norms(F)
    z_norm = robust_norms(z)
    finite = torch.isfinite(res) & torch.isfinite(z_norm)
    measure, _, stop = track_limits(res, z_norm, best[4], n, tol, floor_scale, relative)
    done = active & finite & (measure <= stop)
    better = (active & finite & (measure < best[0])) | done
    best_z.copy_(torch.where(better[:, None], z, best_z))
    best_F.copy_(torch.where(better[:, None], F, best_F))
    best[0] = torch.where(better, measure, best[0])
    best[1] = torch.where(better, res, best[1])
    best[3] = torch.where(better, z_norm, best[3])
    blowup = active & (~finite | (res > divergence_ratio * best[2].clamp(min=tol)))
    new = status | torch.where(active & ~finite, NONFINITE, 0).to(status.dtype)
    new = new | torch.where(blowup, BLOWUP, 0).to(status.dtype)
    new = torch.where(done, (new | CONVERGED) & ~ACTIVE & 0xFF, new).to(status.dtype)
    status.copy_(new)
    nstep += active
    still = (status & ACTIVE) != 0
    counts = torch.stack([still.sum(), blowup.sum()]).to(torch.long)
    return counts, still & ((status & FALLBACK) == 0)


def track_limits(res, z_norm, reach, n, tol, floor_scale, relative):
    """``(measure, floor, stop)`` per sample, (B,) float64 each, from the norms ``res`` of
    ``F`` and ``z_norm`` of ``z`` (n elements per sample) and the reach: where a root can lie,
    ``||z0|| + 1000 ||F(z0)||`` (``impflow.solvers._common``).

    - Within the reach (``||z|| <= reach``): measure ``res`` (abs) or ``res / (||z|| + 1e-12)``
      (rel); floor ``floor_scale * (||z|| + sqrt(n))`` (abs) or ``floor_scale`` (rel), the
      smallest measure the dtype resolves there; it replaces a smaller tol:
      ``stop = max(tol, floor)``.
    - Beyond it the iterate runs away from any root a contraction started at ``z0`` can have,
      and a floor growing with it would call a residual of any size converged. The relative
      measure's denominator stops at the reach; the floor is the resolution there,
      ``floor_scale * (||z|| + sqrt(n)) / denominator`` (denominator 1 in abs mode); tol must
      be met and resolved: ``stop = tol`` where ``floor <= tol``, else -1 (no convergence).
    """
    beyond = z_norm > reach
    if relative:
        denominator = torch.where(beyond, reach, z_norm) + 1e-12
    else:
        denominator = torch.ones_like(z_norm)
    measure = res / denominator
    resolution = floor_scale * (z_norm + n**0.5) / denominator
    floor = torch.where(beyond, resolution, floor_scale) if relative else resolution
    resolved = torch.where(floor <= tol, torch.full_like(floor, tol), torch.full_like(floor, -1.0))
    stop = torch.where(beyond, resolved, floor.clamp(min=tol))
    return measure, floor, stop


# sqrt of the smallest normal and of the largest float64: a norm outside [_NORM_LOW, _NORM_HIGH]
# came from a sum of squares that underflowed or overflowed.
_NORM_LOW, _NORM_HIGH = 1.4916681462400413e-154, 1.3407807929942596e154


def robust_norms(x):
    """(B,) float64 ``||x_b||_2`` of a (B, n) tensor; for float64 ``x`` the samples whose plain
    norm left ``[1.5e-154, 1.3e154]`` (where the squares overflow or underflow) are computed
    again, scaled by their largest magnitude. NaN if a value is NaN, Inf if one is infinite."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    if x.dtype != torch.float64:
        return norms  # float32 squares cannot leave the float64 range
    odd = ~((norms >= _NORM_LOW) & (norms <= _NORM_HIGH))
    if bool(odd.any()):
        rows = x[odd]
        big = rows.abs().amax(1)
        has_nan = rows.isnan().any(1)
        ok = torch.isfinite(big) & (big > 0)
        scaled = big * torch.linalg.vector_norm(rows / torch.where(ok, big, 1.0)[:, None], dim=1)
        fixed = torch.where(ok, scaled, big)
        norms[odd] = torch.where(has_nan, torch.nan, fixed)
    return norms


def power_iteration_reference(weights, us, vs, n_iterations):
    """Power iteration for the largest singular value of each matrix of a list.

    Args:
        weights: matrices ``W_l`` of shapes (out_l, in_l), one dtype and device.
        us: vectors (out_l,), updated in place.
        vs: vectors (in_l,), updated in place.
        n_iterations: steps ``v <- normalize(W^T u)``, ``u <- normalize(W v)`` (>= 0), with
            ``normalize(x) = x / max(||x||, 1e-12)``.

    Returns:
        (L,) ``sigma_l = u_l^T W_l v_l`` after the steps.

    The lists must have one length, also when empty. No vector may share memory with another
    vector or with a weight: the fused op runs the layers at once and refuses such input;
    this reference, one layer after the other, does not look.
    """
    check_power_iteration_lists(weights, us, vs, n_iterations)
    sigmas = []
    for W, u, v in zip(weights, us, vs):
        for _ in range(n_iterations):
            v.copy_(_normalize(torch.mv(W.t(), u)))
            u.copy_(_normalize(torch.mv(W, v)))
        sigmas.append(torch.dot(u, torch.mv(W, v)))
    if not sigmas:
        return torch.empty(0)
    return torch.stack(sigmas)


def check_power_iteration_lists(weights, us, vs, n_iterations):
    """The checks of csrc/include/impflow/power_checks.h that empty lists need too (no kernel
    is reached without a tensor), with the same messages."""
    if not len(us) == len(weights) == len(vs):
        raise RuntimeError(
            "power_iteration: weights, us and vs must have the same length, got "
            f"{len(weights)}, {len(us)} and {len(vs)}"
        )
    if n_iterations < 0:
        raise RuntimeError(f"power_iteration: n_iterations must be >= 0, got {n_iterations}")


def _normalize(x):
    return x / x.norm().clamp_min(1e-12)


def mlp_vjp_series_reference(weights, act_derivs, v, coeffs, n_terms):
    """Vector-Jacobian products of an MLP, their trace terms and a weighted series of them.

    For ``g(x) = W_L s(… s(W_1 x + b_1) …) + b_L`` the per-sample Jacobian is
    ``J = W_L D_{L-1} W_{L-1} … D_1 W_1`` with ``D_i = diag(s'(z_i))`` at the pre-activations
    ``z_i``. One step takes the row vector ``u`` to
    ``uJ = ((u W_L) ⊙ d_{L-1}) W_{L-1} … ⊙ d_1) W_1``.
    Differentiable by autograd with respect to every tensor input.

    Args:
        weights: ``L ≥ 1`` matrices, ``weights[i]`` of shape ``(h_{i+1}, h_i)``, ``h_0 = h_L = d``.
        act_derivs: ``L - 1`` tensors ``(B, h_{i+1})``, the rows ``d_{i+1}`` of the ``D``'s.
        v: ``(B, d)`` probes.
        coeffs: ``(n_terms,)`` series coefficients.
        n_terms: number of products ``n ≥ 1``.

    Returns:
        ``(products, traces, series)``: ``(n, B, d)`` with ``products[k-1] = vᵀJᵏ``; ``(n, B)``
        with ``traces[k-1] = vᵀJᵏv``; ``(B,)`` ``Σ_k coeffs[k-1] traces[k-1]``.
    """
    products = []
    u = v
    for _ in range(n_terms):
        for i in range(len(weights) - 1, -1, -1):
            u = u @ weights[i]
            if i > 0:
                u = u * act_derivs[i - 1]
        products.append(u)
    products = torch.stack(products)
    traces = (products * v).sum(-1)
    series = (coeffs[:, None] * traces).sum(0)
    return products, traces, series
