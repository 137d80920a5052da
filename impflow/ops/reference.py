"""Pure-PyTorch references of the impflow ops: they define what each fused kernel computes.

They follow the original ImpFlow/DEQ code (einsums over the whole history per product) and
serve as the ground truth in tests and as the baseline in benchmarks.
"""

import torch

__all__ = ["broyden_step_reference", "broyden_matvec", "broyden_rmatvec"]


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

    An update whose denominator ``v_new . dF`` is zero, subnormal or not finite is dropped:
    the slot is written with zeros, as the original code zeroes NaNs.
    """
    old_U, old_V = U[:, :n_valid], V[:, :n_valid]
    v_new = broyden_rmatvec(old_U, old_V, dz)
    denom = (v_new * dF).sum(-1, keepdim=True)
    u_new = (dz - broyden_matvec(old_U, old_V, dF)) / denom
    tiny = torch.finfo(denom.dtype).tiny
    valid = torch.isfinite(denom) & (denom.abs() > tiny) & torch.isfinite((v_new * F).sum(-1, keepdim=True))
    keep = active[:, None]
    U[:, slot] = torch.where(keep, torch.where(valid, u_new, 0.0), U[:, slot])
    V[:, slot] = torch.where(keep, torch.where(valid, v_new, 0.0), V[:, slot])
    n_after = max(n_valid, slot + 1)
    step = -broyden_matvec(U[:, :n_after], V[:, :n_after], F)
    return torch.where(keep, step, 0.0)
