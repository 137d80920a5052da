r"""The machinery of implicit layers: a root solved without graph, re-attached to autograd by one
differentiable evaluation, with the implicit gradient from an adjoint solve (DESIGN.md §1).

For networks ``g_in``, ``g_out`` (``g_in`` may be absent: the identity part only) the layer maps
``u`` to the root ``y`` of

.. math::  F(y, u) = g_{in}(u) + u - g_{out}(y) - y = 0 .

ImplicitBlock's forward is ``(g_in, g_out) = (g_x, g_z)`` and its inverse ``(g_z, g_x)``;
ResidualBlock's inverse is ``(None, g)``. With ``G(y) = g_out(y) + y``, the gradient of a loss
``L`` is ``∂L/∂(·) = aᵀ ∂F/∂(·)`` where ``aᵀ J_G(y) = ∂L/∂y``.

How the gradient reaches everything through ordinary autograd:

1. ``y*`` is solved under ``no_grad``.
2. One evaluation ``F = c - g_out(y_leaf) - y*`` with ``c = g_in(u) + u`` built with graph
   (``y_leaf``: a detached leaf holding ``y*``), so ``F`` depends on ``u`` and on every parameter.
3. ``y = _ImplicitAdjoint.apply(F, y*)`` returns ``y*``'s value; its backward receives ``∂L/∂y``,
   solves the adjoint system with vector-Jacobian products on the graph of ``g_out(y_leaf)``
   (taken with respect to ``y_leaf`` only: no parameter gradient accumulates, no hook fires) and
   returns ``a`` as the gradient of ``F``; autograd carries it on to ``u`` and to the
   parameters, where ``DistributedDataParallel``, clipping, hooks and optimisers see it.

No network is copied. Quantities differentiated with respect to ``y`` (the log-det term
``log det(I + J_{g_out}(y))``) take their derivatives on private nodes of ``y`` (the estimators'
``prepare``) or none at all (the forward-mode Jacobian), so the adjoint runs once, on the sum of
every gradient that reaches ``y``.

With the exact log-det, the blocks reuse what its one evaluation of a network gives: ``g_in(u)``
(with graph) serves as the re-attached ``c``, and ``J_{g_out}(y*)`` (detached) is handed to the
exact adjoint solve, which then takes no vector-Jacobian products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from impflow.logdet import value_and_jacobian
from impflow.logdet.exact import logdet_identity_plus, spectral_norm_bound
from impflow.nn._block_settings import (
    AUTO_EXACT_MAX_DIM,
    BlockStats,
    NonContractiveWarning,
    SolverConfig,
    report_failure,
)
from impflow.nn._flow_common import NonFiniteError, per_sample
from impflow.nn._frozen import PausedPowerIteration
from impflow.solvers import SolverStats

__all__ = [
    "AdjointState",
    "LogdetTerm",
    "call_net",
    "check_result",
    "logdet_term",
    "needs_graph",
    "solve_implicit",
]


def call_net(g: nn.Module, t: Tensor, name: str, arg: str, where: str) -> Tensor:
    """``g(t)``, with a clear error when ``g`` fails on ``t`` or does not keep its shape/dtype."""
    try:
        out = g(t)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{where}: {name} failed on {arg} of shape {tuple(t.shape)} and dtype {t.dtype} "
            f"({type(err).__name__}: {err})"
        ) from err
    if not isinstance(out, Tensor):
        raise TypeError(f"{where}: {name} must return a tensor, got {type(out).__name__}")
    if out.shape != t.shape:
        raise ValueError(
            f"{where}: {name} must map {arg} to a tensor of the same shape (its Jacobian must be "
            f"square): {arg} has shape {tuple(t.shape)}, {name}({arg}) has {tuple(out.shape)}"
        )
    if out.dtype != t.dtype:
        raise ValueError(f"{where}: {name}({arg}) has dtype {out.dtype}, {arg} has {t.dtype}")
    return out


def needs_graph(t: Tensor, *nets) -> bool:
    """Whether a differentiable result is asked for: grad mode is on and ``t`` or a parameter
    of ``nets`` requires grad."""
    if not torch.is_grad_enabled():
        return False
    if t.requires_grad:
        return True
    return any(p.requires_grad for g in nets if isinstance(g, nn.Module) for p in g.parameters())


# --------------------------------------------------------------------------------------------
# The adjoint


class AdjointState:
    """What the backward pass needs: the graph of ``g_out(y_leaf)`` and where to record.

    ``jacobian``: ``J_{g_out}(y*)`` ``(B, d, d)``, detached, when the caller already computed it
    (the exact log-det term at the root, :meth:`use_jacobian`); the exact adjoint then takes
    no products.
    """

    def __init__(self, gy, y_leaf, config, record, field, where, on_failure):
        self.gy = gy
        self.y_leaf = y_leaf
        self.config = config
        self.record = record
        self.field = field
        self.where = where
        self.on_failure = on_failure
        self.jacobian: Tensor | None = None

    def use_jacobian(self, jac: Tensor | None) -> None:
        """Hands over ``J_{g_out}(y*)`` (from the same weights as ``gy``), or nothing."""
        if jac is not None:
            self.jacobian = jac.detach()

    def vjp(self, a: Tensor) -> Tensor:
        """``aᵀ J_{g_out}(y*)`` per sample."""
        (r,) = torch.autograd.grad(self.gy, self.y_leaf, a, retain_graph=True, allow_unused=True)
        return torch.zeros_like(a) if r is None else r


def _exact_adjoint(state: AdjointState, grad: Tensor, tol: float):
    """``a`` from ``(I + J)ᵀ a = ∂L/∂y`` with the per-sample Jacobian (handed over, else built
    by ``d`` products) solved in float64; statistics in the form of a solver's (``nstep`` 0)."""
    b, d = grad.shape[0], grad[0].numel()
    jac, n_products = state.jacobian, 0
    if jac is None or jac.shape != (b, d, d):
        eye = torch.eye(d, dtype=grad.dtype, device=grad.device)
        rows = [per_sample(state.vjp(eye[i].expand(b, d).reshape(grad.shape))) for i in range(d)]
        jac, n_products = torch.stack(rows, 1), d
    m = torch.eye(d, dtype=torch.float64, device=grad.device) + jac.double()
    rhs = per_sample(grad).double()
    a, info = torch.linalg.solve_ex(m.transpose(1, 2), rhs.unsqueeze(-1))
    if bool((info != 0).any()):
        raise ValueError(
            f"{state.where}: the adjoint system is singular (det(I + J) = 0) for "
            f"{int((info != 0).sum())} sample(s): the network is not contractive at the root"
        )
    a = a.squeeze(-1).to(grad.dtype)
    residual = (rhs - (m.transpose(1, 2) @ a.double().unsqueeze(-1)).squeeze(-1)).norm(dim=1)
    a_norm = a.double().norm(dim=1)
    rel = residual / (a_norm + 1e-12)
    eps = torch.finfo(grad.dtype).eps
    floor = torch.full_like(rel, 4 * eps * math.sqrt(d))
    finite = torch.isfinite(rel)
    stats = SolverStats(
        method="exact",
        nstep=torch.zeros(b, dtype=torch.long, device=grad.device),
        residual=residual.to(grad.dtype),
        rel_residual=rel.to(grad.dtype),
        converged=finite & (rel <= torch.clamp(floor, min=tol)),
        diverged=torch.zeros(b, dtype=torch.bool, device=grad.device),
        nonfinite=~finite,
        tol_floor=floor.to(grad.dtype),
        n_fn_evals=n_products,
        tol=tol,
        stop_mode="rel",
        max_iter=1,
    )
    return a.reshape(grad.shape), stats


def _solve_adjoint(state: AdjointState, grad: Tensor) -> Tensor:
    config = state.config
    if config.use_exact(grad[0].numel()):
        a, stats = _exact_adjoint(state, grad, config.tol_for(grad.dtype))
    else:
        # Root form: fn(a) = ∂L/∂y - a - aᵀJ; a contraction's fixed-point map, started at the
        # first Neumann term.
        a, stats = config.run(lambda a: grad - a - state.vjp(a), grad)
    state.record(state.field, stats)
    if not stats.all_converged:
        report_failure(
            f"{state.where}: the adjoint solve (implicit gradient) did not converge for "
            f"{int((~stats.converged).sum())} of {grad.shape[0]} samples: {stats.summary()}; "
            f"the gradient is approximate (see .last_stats.{state.field})",
            state.on_failure,
            stats,
        )
    return a


class _ImplicitAdjoint(torch.autograd.Function):
    """Value: the root ``y*``. Gradient: ``∂L/∂F = a`` with ``aᵀ J_G(y*) = ∂L/∂y``."""

    @staticmethod
    def forward(ctx, F: Tensor, root: Tensor, state: AdjointState) -> Tensor:
        ctx.state = state
        return root.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{ctx.state.where}: double backward through an implicit solve is not "
                "supported (the adjoint solve is not differentiable); do not use "
                "create_graph=True through this layer"
            )
        if not bool(torch.isfinite(grad).all()):
            raise NonFiniteError(
                f"{ctx.state.where}: the gradient reaching the solve's output contains NaN or "
                "Inf; the adjoint system cannot be solved for it"
            )
        with torch.no_grad():
            return _solve_adjoint(ctx.state, grad), None, None


# --------------------------------------------------------------------------------------------
# The solve


def solve_implicit(
    g_in,
    g_out,
    u: Tensor,
    *,
    names: tuple[str, str, str, str],
    solver: SolverConfig,
    adjoint: SolverConfig,
    stats: BlockStats,
    fields: tuple[str, str],
    where: str,
    on_failure: str,
    g_in_value: Tensor | None = None,
) -> tuple[Tensor, AdjointState | None]:
    """The root ``y`` of ``g_in(u) + u - g_out(y) - y = 0`` (``g_in=None``: ``u - g_out(y) - y``),
    differentiable with respect to ``u`` and the parameters by the adjoint method.

    Args:
        g_in, g_out: the networks (``g_in`` may be ``None``).
        u: ``(B, ...)`` input, checked by the caller.
        names: names of ``g_in``, ``g_out``, ``u`` and ``y`` for messages.
        solver, adjoint: settings of the root solve and of the adjoint solve.
        stats: where the statistics go; ``fields``: the attribute for the root solve and the
            one for its adjoint solve.
        where, on_failure: for messages, and whether a failed solve raises or warns.
        g_in_value: ``g_in(u)`` when the caller already evaluated it (the exact log-det term
            does), with graph wherever one is needed; ``None``: evaluated here.

    Returns:
        ``(y, state)``: ``y`` of ``u``'s shape, the lowest-residual iterate of each sample,
        attached to the graph when one is needed; ``state``: its :class:`AdjointState` (to
        hand over ``J_{g_out}(y)`` with :meth:`AdjointState.use_jacobian`), ``None`` without
        graph.
    """
    name_in, name_out, arg_in, arg_out = names
    graph = needs_graph(u, g_in, g_out)
    with torch.set_grad_enabled(graph):
        if g_in is None:
            c = u
        elif g_in_value is not None:
            c = u + g_in_value
        else:
            c = u + call_net(g_in, u, name_in, arg_in, where)
    c_const = c.detach()

    def residual(y):
        return c_const - call_net(g_out, y, name_out, arg_out, where) - y

    root, solve_stats = solver.run(residual, c_const)
    setattr(stats, fields[0], solve_stats)
    if not solve_stats.all_converged:
        report_failure(
            f"{where}: the solve for {arg_out} did not converge for "
            f"{int((~solve_stats.converged).sum())} of {u.shape[0]} samples: "
            f"{solve_stats.summary()}; the best iterate is returned (see "
            f".last_stats.{fields[0]})",
            on_failure,
            solve_stats,
        )
    if not graph:
        return root, None
    with torch.enable_grad():
        y_leaf = root.detach().requires_grad_(True)
        gy = call_net(g_out, y_leaf, name_out, arg_out, where)
        F = c - gy - root
    state = AdjointState(
        gy, y_leaf, adjoint, lambda f, s: setattr(stats, f, s), fields[1], where, on_failure
    )
    return _ImplicitAdjoint.apply(F, root, state), state


# --------------------------------------------------------------------------------------------
# Log-determinant terms


@dataclass(frozen=True)
class LogdetTerm:
    """One term ``log det(I + J_g(t))`` of a block's log-determinant.

    Attributes:
        value: ``(B,)``, differentiable when a graph is needed.
        stats: a :class:`~impflow.logdet.LogdetStats` for a series estimate, else ``None``.
        net_value: ``g(t)`` from the same evaluation (exact log-det), with graph when
            ``value`` has one; ``None`` for a series estimate.
        jacobian: ``J_g(t)`` ``(B, d, d)``, detached (exact log-det), else ``None``.
    """

    value: Tensor
    stats: object = None
    net_value: Tensor | None = None
    jacobian: Tensor | None = None


def _exact_term(g, t: Tensor, name: str, arg: str, where: str, on_failure: str) -> LogdetTerm:
    """``log det(I + J_g(t))`` from ``g(t)`` and the per-sample Jacobian in one evaluation
    (forward mode for a ``LipschitzMLP``, :mod:`impflow.logdet.jacobian`), and a check that
    ``‖J_g(t)‖₂ < 1`` (a necessary condition for ``Lip(g) < 1``; closed form for ``d ≤ 2``, an
    SVD only for the samples whose Frobenius norm is ``≥ 1`` otherwise)."""
    try:
        gt, jac = value_and_jacobian(g, t)
    except (RuntimeError, TypeError, ValueError):
        # Where g itself fails on t (or changes its shape or dtype), the block's own message.
        call_net(g, t, name, arg, where)
        raise
    logabsdet, positive = logdet_identity_plus(jac)
    norm = spectral_norm_bound(jac)  # = ‖J‖₂ wherever that is ≥ 1, so the max is exact then
    nonfinite = ~torch.isfinite(jac.reshape(jac.shape[0], -1)).all(1)
    bad_sign = ~positive
    bad_norm = ~(norm < 1)
    if bool((bad_sign | nonfinite).any()):  # one check (a device sync) for both
        if bool(nonfinite.any()):  # blown-up weights: not a question of contractivity
            raise NonFiniteError(
                f"{where}: the Jacobian of {name} at {arg} contains NaN or Inf (samples "
                f"{nonfinite.nonzero().flatten()[:8].tolist()})"
            )
        raise ValueError(
            f"{where}: det(I + J) <= 0 for {name} at {int(bad_sign.sum())} sample(s) of {arg} "
            f"(largest Jacobian norm {float(norm.max()):.4g}): {name} is not contractive, so "
            f"the block is not invertible there and its log-determinant is undefined"
        )
    if bool(bad_norm.any()):
        report_failure(
            f"{where}: {name} has Jacobian spectral norm >= 1 at {int(bad_norm.sum())} of "
            f"{t.shape[0]} sample(s) of {arg} (largest {float(norm.max()):.4g}): Lip({name}) < 1 "
            f"does not hold, so the block may not be invertible; run more power iterations "
            f"(impflow.nn.update_lipschitz) or lower the spectral-norm coefficient",
            on_failure,
            category=NonContractiveWarning,
        )
    return LogdetTerm(logabsdet, net_value=gt, jacobian=jac.detach())


def logdet_term(block, g, t: Tensor, name: str, arg: str, where: str) -> LogdetTerm:
    """``log det(I + J_g(t))`` per sample with the block's estimator (``t`` may be the
    re-attached root: estimators differentiate on private nodes of it, or, in forward mode,
    not at all)."""
    if g is None:
        return LogdetTerm(t.new_zeros(t.shape[0]))
    # A wrapper keeps power iteration paused in any evaluation the estimator repeats later.
    net = PausedPowerIteration(g)
    mode, estimator = block.logdet_mode, block.logdet_estimator
    if mode == "exact" or (mode == "auto" and t[0].numel() <= AUTO_EXACT_MAX_DIM):
        return _exact_term(net, t, name, arg, where, block.on_failure)
    value = estimator(net, t)
    if not isinstance(value, Tensor) or value.shape != (t.shape[0],):
        raise ValueError(
            f"{where}: the log-det estimator must return a tensor of shape ({t.shape[0]},), got "
            f"{getattr(value, 'shape', type(value).__name__)}"
        )
    return LogdetTerm(value.to(t.dtype), getattr(estimator, "last_stats", None))


def check_result(out: Tensor, logdet: Tensor | None, arg: str, where: str) -> None:
    """NaN/Inf never leave a block silently (``logdet=None``: none was computed)."""
    for name, value in ((arg, out), ("logdet", logdet)):
        if value is None:
            continue
        if not bool(torch.isfinite(value.detach()).all()):
            bad = ~torch.isfinite(per_sample(value.detach()) if value.dim() > 1 else value)
            bad = bad.reshape(value.shape[0], -1).any(1).nonzero().flatten()
            raise NonFiniteError(
                f"{where}: the result {name} contains NaN or Inf (samples {bad[:8].tolist()}); "
                "the networks returned non-finite values"
            )
