"""Settings of the implicit and residual blocks, checked at construction: the solver of each
root-finding problem (forward, inverse, adjoint), the log-det estimator, what to do on failure,
and the statistics record (DESIGN.md §5)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from impflow._warnings import warn_at_caller
from impflow.logdet import RouletteLogdet
from impflow.solvers import SOLVERS, SolverStats, SolverWarning, solve, solver_options

__all__ = [
    "AUTO_EXACT_MAX_DIM",
    "BlockStats",
    "ImplicitSolveError",
    "NonContractiveWarning",
    "SolverConfig",
    "check_on_failure",
    "report_failure",
]

# "auto" (log-det and adjoint) is exact up to this per-sample dimension (DESIGN.md §5).
AUTO_EXACT_MAX_DIM = 10

# Forward/inverse: absolute stop on ||F||_2 per sample, so max|F| <= tol; 1e-6 in float32 leaves
# max|F| <= 1e-5 with room for rounding (DESIGN.md §5). The solver raises a tol below what the
# dtype resolves to its floor (SolverStats.tol_floor).
_ROOT_TOL = {torch.float32: 1e-6, torch.float64: 1e-10}
# Adjoint: relative stop, ||r||_2 <= tol ||a||_2 (and ||a|| is within a factor (1 ± Lip) of
# ||∂L/∂z||); float32 rounding of a residual through a network sits near 1e-6 relative.
_ADJOINT_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
_DEFAULT_MAX_ITER = 100

_ON_FAILURE = ("warn", "raise")


class ImplicitSolveError(RuntimeError):
    """A solve of an implicit or residual block did not converge (``on_failure="raise"``), or its
    network is not contractive where it was evaluated. ``stats`` holds the
    :class:`~impflow.solvers.SolverStats` (or ``None``)."""

    def __init__(self, message: str, stats: SolverStats | None = None):
        super().__init__(message)
        self.stats = stats


class NonContractiveWarning(RuntimeWarning):
    """A block's network has a Jacobian of spectral norm ``≥ 1`` somewhere it was evaluated:
    ``Lip(g) < 1`` does not hold, so the block is not guaranteed invertible (run more power
    iterations, e.g. :func:`impflow.nn.update_lipschitz`, or lower ``coeff``)."""


def check_on_failure(value) -> str:
    if value not in _ON_FAILURE:
        raise ValueError(f"on_failure must be one of {_ON_FAILURE}, got {value!r}")
    return value


def report_failure(message: str, on_failure: str, stats=None, category=SolverWarning) -> None:
    """Raises :class:`ImplicitSolveError` or warns (``category``, at the user's line), by
    ``on_failure``."""
    if on_failure == "raise":
        raise ImplicitSolveError(message, stats)
    warn_at_caller(message, category)


@dataclass
class BlockStats:
    """Statistics of a block's last solves (DESIGN.md §2: per-sample tensors of shape (B,)).

    Attributes:
        forward: :class:`~impflow.solvers.SolverStats` of the last forward solve
            (``None`` for a :class:`~impflow.nn.ResidualBlock`, whose forward is explicit).
        inverse: of the last inverse solve.
        adjoint: of the last adjoint solve, run in the backward pass through a forward solve.
        inverse_adjoint: of the last backward pass through an inverse solve.
        logdet: :class:`~impflow.logdet.LogdetStats` of the series estimates of the last
            forward or inverse (one per network term; empty for exact log-dets).
    """

    forward: SolverStats | None = None
    inverse: SolverStats | None = None
    adjoint: SolverStats | None = None
    inverse_adjoint: SolverStats | None = None
    logdet: tuple = ()

    def summary(self) -> str:
        """One line per solve that ran."""
        lines = []
        for name in ("forward", "inverse", "adjoint", "inverse_adjoint"):
            stats = getattr(self, name)
            if stats is not None:
                lines.append(f"{name}: {stats.summary()}")
        return "\n".join(lines) if lines else "no solve yet"


def _check_tol(tol, where):
    if tol is None:
        return None
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not math.isfinite(tol)
        or tol <= 0
    ):
        raise ValueError(f"{where}: tol must be None or a finite number > 0, got {tol!r}")
    return float(tol)


class SolverConfig:
    """The method and options of one root-finding problem of a block.

    Built from ``None`` (the defaults) or a dict ``{"method": ..., **options}``: ``method`` is a
    solver of :mod:`impflow.solvers` (``"broyden"``, ``"anderson"``, ``"fixed_point"``), and for
    the adjoint also ``"exact"`` (per-sample Jacobian and ``torch.linalg.solve``; option
    ``tol`` only, the level at which the solve counts as converged) or ``"auto"`` (``"exact"``
    up to per-sample dimension 10, else Broyden with the options given). Options are those of
    the solver; an unknown one is an error, and values are checked by a dry run of the solver
    at construction. ``tol=None`` (the default) picks one by dtype at each solve. ``warn`` is
    not an option: the block reports failures itself (``on_failure``).
    """

    def __init__(self, spec, *, name: str, adjoint: bool = False):
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise TypeError(
                f"{name} must be None or a dict such as {{'method': 'broyden', 'tol': 1e-6, "
                f"'max_iter': 100}}, got {type(spec).__name__}"
            )
        spec = dict(spec)
        methods = sorted(SOLVERS) + (["auto", "exact"] if adjoint else [])
        method = spec.pop("method", "auto" if adjoint else "broyden")
        if method not in methods:
            raise ValueError(f"{name}: method must be one of {methods}, got {method!r}")
        iterative = "broyden" if method == "auto" else method
        allowed = ["tol"] if method == "exact" else solver_options(iterative)
        allowed = [k for k in allowed if k != "warn"]
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise TypeError(
                f"{name}: unknown option(s) {unknown} for method {method!r}; it accepts {allowed}"
            )
        self.name = name
        self.method = method
        self.adjoint = adjoint
        self.tol = _check_tol(spec.pop("tol", None), name)
        options = {"max_iter": _DEFAULT_MAX_ITER} if method != "exact" else {}
        options.update(spec)
        self.options = options
        if method != "exact":  # the solver checks every value: one step on a 1x1 problem
            try:
                solve(lambda z: -z, torch.ones(1, 1), iterative, tol=1.0, warn=False, **options)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name}: {err}") from None

    def tol_for(self, dtype: torch.dtype) -> float:
        if self.tol is not None:
            return self.tol
        table = _ADJOINT_TOL if self.adjoint else _ROOT_TOL
        return table.get(dtype, table[torch.float32])

    def use_exact(self, dim: int) -> bool:
        return self.method == "exact" or (self.method == "auto" and dim <= AUTO_EXACT_MAX_DIM)

    def run(self, fn, z0: Tensor):
        """Solves ``fn(z) = 0`` from ``z0`` with these settings; never warns (the caller
        reports)."""
        method = "broyden" if self.method == "auto" else self.method
        options = dict(self.options)
        if self.adjoint:
            options.setdefault("stop_mode", "rel")
        # The options were checked against the solver at construction; solve() would check
        # them again from its signature at every call, a cost that matters for small batches.
        return SOLVERS[method](fn, z0, tol=self.tol_for(z0.dtype), warn=False, **options)

    def __repr__(self) -> str:
        tol = "by dtype" if self.tol is None else repr(self.tol)
        opts = ", ".join([f"tol={tol}"] + [f"{k}={v!r}" for k, v in self.options.items()])
        return f"{self.method}({opts})"


def make_logdet_estimator(spec):
    """``(mode, estimator)`` from a block's ``logdet`` argument.

    ``"exact"``: brute-force Jacobian + ``slogdet`` (estimator ``None``). ``"series"``: a
    :class:`~impflow.logdet.RouletteLogdet` with the paper's settings (2 exact terms in
    training, 20 in evaluation, geometric(0.5) extra terms, one Rademacher probe). ``"auto"``:
    exact up to per-sample dimension 10, that series estimator otherwise. A dict: the keyword
    arguments of a ``RouletteLogdet``. A ``RouletteLogdet`` (or any ``nn.Module`` or callable
    ``est(g, x) -> (B,)``): used as it is (mode ``"custom"``).
    """
    if isinstance(spec, str):
        if spec not in ("auto", "exact", "series"):
            raise ValueError(
                f"logdet must be 'auto', 'exact', 'series', a dict of RouletteLogdet options or "
                f"an estimator est(g, x) -> (B,), got {spec!r}"
            )
        return spec, (None if spec == "exact" else RouletteLogdet())
    if isinstance(spec, dict):
        try:
            return "custom", RouletteLogdet(**spec)
        except TypeError as err:
            raise TypeError(f"logdet: {err} (a dict holds RouletteLogdet options)") from None
    if isinstance(spec, nn.Module) or callable(spec):
        return "custom", spec
    raise TypeError(
        f"logdet must be 'auto', 'exact', 'series', a dict or an estimator, got "
        f"{type(spec).__name__}"
    )
