"""What ResidualBlock and ImplicitBlock share: their settings (log-det estimator, solvers, failure
policy) and the record of their last solves (DESIGN.md §5)."""

from __future__ import annotations

import torch
from torch import nn

from impflow.nn._block_settings import (
    BlockStats,
    SolverConfig,
    check_on_failure,
    make_logdet_estimator,
)
from impflow.nn._flow_common import check_finite, check_flow_tensor


def check_block_input(u, name: str, where: str) -> None:
    """A block's input: a finite ``(B, ...)`` tensor in float32 or float64, the dtypes of the
    root solves (a float16 one under ``torch.autocast`` was cast up by the caller)."""
    check_flow_tensor(u, name, where)
    if u.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"{where}: {name} must be float32 or float64, got {u.dtype} (a root in float16 or "
            "bfloat16 cannot meet a useful tolerance; under torch.autocast such an input is "
            "cast to float32)"
        )
    check_finite(u, name, where)


def check_network(g, name: str, owner: str) -> nn.Module:
    if not isinstance(g, nn.Module):
        raise TypeError(
            f"{owner}: {name} must be an nn.Module (so that its parameters are registered), got "
            f"{type(g).__name__}"
        )
    return g


class BlockBase(nn.Module):
    """Settings shared by the blocks; see :class:`~impflow.nn.ImplicitBlock` for their meaning.

    Attributes:
        logdet_mode: ``"auto"``, ``"exact"``, ``"series"`` or ``"custom"``.
        logdet_estimator: the series estimator (a submodule when it is an ``nn.Module``, so
            ``.eval()`` switches it to its evaluation settings), ``None`` for ``"exact"``.
        inverse_solver, adjoint_solver: :class:`SolverConfig` of those solves.
        on_failure: ``"warn"`` or ``"raise"``.
        last_stats: :class:`BlockStats` of the last solves.
    """

    def _configure(self, logdet, inverse_solver, adjoint_solver, on_failure):
        """Call after the networks are set (so they come first in the module tree)."""
        mode, estimator = make_logdet_estimator(logdet)
        self.logdet_mode = mode
        self.logdet_estimator = estimator
        owner = type(self).__name__
        self.inverse_solver = SolverConfig(inverse_solver, name=f"{owner} inverse_solver")
        self.adjoint_solver = SolverConfig(
            adjoint_solver, name=f"{owner} adjoint_solver", adjoint=True
        )
        self.on_failure = check_on_failure(on_failure)
        self.last_stats = BlockStats()

    def _settings_repr(self) -> str:
        return (
            f"logdet={self.logdet_mode!r}, inverse_solver={self.inverse_solver}, "
            f"adjoint_solver={self.adjoint_solver}, on_failure={self.on_failure!r}"
        )
