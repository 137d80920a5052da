"""The ResFlow / i-ResNet block ``z = x + g(x)`` with ``Lip(g) < 1`` (DESIGN.md §1, §5).

References:
    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

from torch import Tensor

from impflow._autocast import without_autocast
from impflow.nn._block_base import BlockBase, check_block_input, check_network
from impflow.nn._flow_common import check_logdet_flag
from impflow.nn._frozen import power_iteration_paused
from impflow.nn._implicit import call_net, check_result, logdet_term, solve_implicit

__all__ = ["ResidualBlock"]


class ResidualBlock(BlockBase):
    r"""A residual flow layer ``z = x + g(x)`` with ``Lip(g) < 1``.

    **Forward** is explicit; ``logdet = log det(I + J_g(x))``. **Inverse** solves
    ``x + g(x) = z`` for ``x`` (root form ``z - g(x) - x = 0``) and returns
    ``logdet_inv = -log det(I + J_g(x))``; it is differentiable with respect to ``z`` and the
    parameters through the adjoint ``aᵀ (I + J_g(x)) = ∂L/∂x``, as in :class:`ImplicitBlock`.
    In one dimension its slope ``1 + g'(x)`` lies in ``(1 - c, 1 + c) ⊂ (0, 2)`` for
    ``Lip(g) ≤ c < 1``.

    Under ``torch.autocast`` the block computes as without it, as :class:`ImplicitBlock`.

    Args:
        g: network ``(B, ...) -> (B, ...)`` with ``Lip < 1``, samples independent,
            deterministic.
        logdet, inverse_solver, adjoint_solver, on_failure: as in :class:`ImplicitBlock`.

    Attributes:
        g: the network.
        last_stats: :class:`~impflow.nn.BlockStats` (``inverse`` and ``inverse_adjoint``;
            ``forward`` stays ``None``).

    Shapes:
        ``x``, ``z``: ``(B, ...)``; ``logdet``: ``(B,)``.

    Example:
        >>> block = ResidualBlock(LipschitzMLP([2, 64, 64, 2], coeff=0.9))
        >>> z, logdet = block(torch.randn(16, 2))
        >>> x, logdet_inv = block.inverse(z)

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735
    """

    def __init__(
        self,
        g,
        logdet="auto",
        *,
        inverse_solver=None,
        adjoint_solver=None,
        on_failure: str = "warn",
    ):
        super().__init__()
        self.g = check_network(g, "g", "ResidualBlock")
        self._configure(logdet, inverse_solver, adjoint_solver, on_failure)

    def extra_repr(self) -> str:
        return self._settings_repr()

    @without_autocast("x", upcast=True)
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)`` with ``z = x + g(x)`` and ``logdet = log det(I + J_g(x))``, ``(B,)``."""
        where = "ResidualBlock.forward"
        check_block_input(x, "x", where)
        with power_iteration_paused(self.g, refresh=True):
            term = logdet_term(self, self.g, x, "g", "x", where)
            # The exact log-det evaluated g(x) (with graph) already.
            gx = term.net_value
            z = x + (call_net(self.g, x, "g", "x", where) if gx is None else gx)
        self.last_stats.logdet = () if term.stats is None else (term.stats,)
        check_result(z, term.value, "z", where)
        return z, term.value

    @without_autocast("z", upcast=True)
    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)``: the root ``x`` of ``z - g(x) - x = 0`` and
        ``-log det(I + J_g(x))``, ``(B,)``.

        ``logdet=False``: ``(x, None)``, the same ``x`` without any log-det work (as in
        :meth:`ImplicitBlock.inverse`)."""
        where = "ResidualBlock.inverse"
        check_logdet_flag(logdet, where)
        check_block_input(z, "z", where)
        with power_iteration_paused(self.g, refresh=True):
            x, adjoint_state = solve_implicit(
                None,
                self.g,
                z,
                names=("", "g", "z", "x"),
                solver=self.inverse_solver,
                adjoint=self.adjoint_solver,
                stats=self.last_stats,
                fields=("inverse", "inverse_adjoint"),
                where=where,
                on_failure=self.on_failure,
            )
            if not logdet:  # the root alone: no Jacobian, no series, no probe
                self.last_stats.logdet = ()
                check_result(x, None, "x", where)
                return x, None
            term = logdet_term(self, self.g, x, "g", "x", where)
            if adjoint_state is not None:
                adjoint_state.use_jacobian(term.jacobian)
        self.last_stats.logdet = () if term.stats is None else (term.stats,)
        check_result(x, term.value, "x", where)
        return x, -term.value
