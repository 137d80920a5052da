"""The ImpFlow block: ``z`` is the root of ``g_x(x) + x - g_z(z) - z = 0`` (DESIGN.md §1, §5).

References:
    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

from torch import Tensor

from impflow._autocast import without_autocast
from impflow.nn._block_base import BlockBase, check_block_input, check_network
from impflow.nn._block_settings import SolverConfig
from impflow.nn._flow_common import check_logdet_flag
from impflow.nn._frozen import power_iteration_paused
from impflow.nn._implicit import check_result, logdet_term, solve_implicit

__all__ = ["ImplicitBlock"]


class ImplicitBlock(BlockBase):
    r"""An implicit flow layer: ``z = f(x)`` is the unique root of

    .. math::  F(z, x) = g_x(x) + x - g_z(z) - z = 0,

    with ``Lip(g_x) < 1`` and ``Lip(g_z) < 1``,

    i.e. ``f = (I + g_z)^{-1} ∘ (I + g_x)``: the composition of a residual block and the inverse
    of one, whose slope in one dimension ranges over ``((1 - c)/(1 + c), (1 + c)/(1 - c))``
    where a residual block's lies in ``(1 - c, 1 + c) ⊂ (0, 2)``. ``g_z ≡ 0`` gives a
    :class:`ResidualBlock` exactly.

    **Forward** solves for ``z`` given ``x``; **inverse** solves the same equation for ``x``
    given ``z`` (roles of ``g_x`` and ``g_z`` swapped). Both solves run without graph; the
    result is re-attached by one differentiable evaluation of ``F``, and the backward pass solves
    the adjoint system ``aᵀ (I + J_{g_z}(z)) = ∂L/∂z`` (``J_{g_x}`` for the inverse), so
    gradients reach ``x`` (``z``) and every parameter by ordinary autograd: optimisers,
    clipping, hooks and ``DistributedDataParallel`` see them, and no network is copied.
    Double backward raises ``RuntimeError``.

    **Log-determinant**: ``log|det ∂z/∂x| = log det(I + J_{g_x}(x)) - log det(I + J_{g_z}(z))``;
    the second term is differentiated through ``z`` too (implicitly).

    **Mixed precision**: under ``torch.autocast`` the block computes as without it (autocast is
    off inside; a float16 or bfloat16 input is cast to float32 first). Outside autocast, inputs
    must be float32 or float64.

    **Power iteration**: in training mode the spectral layers of ``g_x`` and ``g_z`` run their
    ``n_power_iterations`` steps once per call, before the first evaluation, and not at each of
    the solver's evaluations (so every evaluation in a call sees the same weights).

    Args:
        g_x: network ``(B, ...) -> (B, ...)`` with ``Lip < 1`` (e.g. a ``LipschitzMLP`` or a
            ``LipschitzConvNet``); samples must not interact (no batch statistics), and it must
            be deterministic.
        g_z: the same for ``z``.
        logdet: ``"auto"`` (default: exact up to per-sample dimension 10, series otherwise),
            ``"exact"`` (per-sample Jacobian, from one forward-mode pass for a ``LipschitzMLP``,
            + ``slogdet`` or its closed form for ``d ≤ 2``, with a check that each Jacobian has
            spectral norm < 1), ``"series"`` (unbiased Russian roulette: 2 exact terms in
            training, 20 in evaluation, geometric(0.5) extra terms, one Rademacher probe; a
            diverging series raises :class:`~impflow.logdet.SeriesDivergenceError`), a dict of
            :class:`~impflow.logdet.RouletteLogdet` options, or an estimator ``est(g, x) ->
            (B,)`` such as a ``RouletteLogdet`` instance. A module estimator is a submodule, so
            ``.eval()`` selects its evaluation settings.
        forward_solver: ``None`` or a dict ``{"method": "broyden" | "anderson" | "fixed_point",
            **options}`` (options of that solver, e.g. ``tol``, ``max_iter``, ``history``,
            ``stop_mode``; unknown ones are errors). Default: Broyden, ``max_iter=100``,
            absolute ``tol`` 1e-6 in float32 and 1e-10 in float64 on ``‖F‖₂`` per sample (so
            ``max|F| ≤ 1e-5`` in float32; a ``tol`` the dtype cannot meet is replaced by its
            floor, see :class:`~impflow.solvers.SolverStats`).
        inverse_solver: the same for the inverse.
        adjoint_solver: the same for the adjoint (gradient) solves, also ``"exact"`` (per-sample
            Jacobian, ``torch.linalg.solve`` in float64) and ``"auto"`` (default: exact up to
            per-sample dimension 10, Broyden otherwise). Default tolerance: relative,
            ``‖residual‖ ≤ tol ‖a‖`` with 1e-5 in float32 and 1e-10 in float64.
        on_failure: ``"warn"`` (default): a solve that leaves samples unconverged emits a
            :class:`~impflow.solvers.SolverWarning` naming the solve, with its statistics, and
            the best iterate is used; a Jacobian of norm ≥ 1 found by the exact log-det emits a
            :class:`~impflow.nn.NonContractiveWarning`. ``"raise"``: both raise
            :class:`~impflow.nn.ImplicitSolveError` instead.

    Attributes:
        g_x, g_z: the networks.
        last_stats: :class:`~impflow.nn.BlockStats`: ``forward``, ``inverse``, ``adjoint``,
            ``inverse_adjoint`` (:class:`~impflow.solvers.SolverStats`) and ``logdet``.

    Shapes:
        ``x``, ``z``: ``(B, ...)``, e.g. vectors ``(B, d)`` or images ``(B, C, H, W)``;
        ``logdet``: ``(B,)``.

    Raises:
        ValueError: ``x``/``z`` not finite or of a shape the networks do not take, a network
            changing the shape, ``det(I + J) ≤ 0`` in the exact log-det, a non-finite result.

    Example:
        >>> g_x = LipschitzMLP([2, 64, 64, 2], coeff=0.9)
        >>> g_z = LipschitzMLP([2, 64, 64, 2], coeff=0.9)
        >>> block = ImplicitBlock(g_x, g_z)
        >>> z, logdet = block(torch.randn(16, 2))
        >>> x, logdet_inv = block.inverse(z)

    References:
        | Implicit Normalizing Flows (Lu et al., 2021)
        | https://arxiv.org/abs/2103.09527
    """

    def __init__(
        self,
        g_x,
        g_z,
        logdet="auto",
        *,
        forward_solver=None,
        inverse_solver=None,
        adjoint_solver=None,
        on_failure: str = "warn",
    ):
        super().__init__()
        self.g_x = check_network(g_x, "g_x", "ImplicitBlock")
        self.g_z = check_network(g_z, "g_z", "ImplicitBlock")
        self._configure(logdet, inverse_solver, adjoint_solver, on_failure)
        self.forward_solver = SolverConfig(forward_solver, name="ImplicitBlock forward_solver")

    def extra_repr(self) -> str:
        return f"forward_solver={self.forward_solver}, {self._settings_repr()}"

    def _run(self, u: Tensor, forward: bool, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        # The inverse is the same equation with the roles of (g_x, x) and (g_z, z) swapped.
        if forward:
            g_in, g_out, names = self.g_x, self.g_z, ("g_x", "g_z", "x", "z")
            solver, fields, where = self.forward_solver, ("forward", "adjoint"), "forward"
        else:
            g_in, g_out, names = self.g_z, self.g_x, ("g_z", "g_x", "z", "x")
            solver, fields, where = self.inverse_solver, ("inverse", "inverse_adjoint"), "inverse"
        where = f"ImplicitBlock.{where}"
        check_block_input(u, names[2], where)
        with power_iteration_paused(self.g_x, self.g_z, refresh=True):
            # The input's term first: the exact log-det's evaluation of g_in(u) serves the solve.
            term_in = logdet_term(self, g_in, u, names[0], names[2], where) if logdet else None
            y, adjoint_state = solve_implicit(
                g_in,
                g_out,
                u,
                names=names,
                solver=solver,
                adjoint=self.adjoint_solver,
                stats=self.last_stats,
                fields=fields,
                where=where,
                on_failure=self.on_failure,
                g_in_value=None if term_in is None else term_in.net_value,
            )
            if not logdet:  # the root alone: no Jacobian, no series, no probe
                self.last_stats.logdet = ()
                check_result(y, None, names[3], where)
                return y, None
            term_out = logdet_term(self, g_out, y, names[1], names[3], where)
            if adjoint_state is not None:
                adjoint_state.use_jacobian(term_out.jacobian)
        self.last_stats.logdet = tuple(t.stats for t in (term_in, term_out) if t.stats is not None)
        logdet = term_in.value - term_out.value
        check_result(y, logdet, names[3], where)
        return y, logdet

    @without_autocast("x", upcast=True)
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: the root ``z`` of ``F(z, x) = 0`` and ``log|det ∂z/∂x|``, ``(B,)``."""
        return self._run(x, forward=True)

    @without_autocast("z", upcast=True)
    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)``: the ``x`` with ``F(z, x) = 0`` and ``log|det ∂x/∂z|``
        ``= -logdet`` at that point, ``(B,)``; differentiable with respect to ``z`` and the
        parameters (adjoint with ``G = g_x + I``), so samples can be differentiated.

        ``logdet=False``: ``(x, None)``, the same ``x`` without any log-det work (no Jacobian,
        no series estimate, no probe, and so no check of ``‖J‖₂ < 1`` at ``z`` and ``x``): what
        sampling needs. Gradients through ``x`` are the same (the exact adjoint then builds
        ``J_{g_x}(x)`` itself, in the backward pass)."""
        check_logdet_flag(logdet, "ImplicitBlock.inverse")
        return self._run(z, forward=False, logdet=logdet)
