"""Batched root finders with one signature: ``solver(fn, z0, *, max_iter, tol, stop_mode,
...) -> (z, SolverStats)`` (DESIGN.md §2).

Each runs with ``torch.autocast`` off on ``z0``'s device, ``fn`` included (impflow/_autocast.py);
``fn`` may turn it on inside itself and cast its output back to ``z0``'s dtype."""

import inspect

from impflow.solvers._workspace import clear as clear_history_cache
from impflow.solvers.anderson import anderson
from impflow.solvers.broyden import broyden
from impflow.solvers.fixed_point import fixed_point
from impflow.solvers.stats import SolverStats, SolverWarning

SOLVERS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}

__all__ = [
    "SOLVERS",
    "SolverStats",
    "SolverWarning",
    "anderson",
    "broyden",
    "clear_history_cache",
    "fixed_point",
    "solve",
]


def solver_options(method):
    """The keyword options that ``method`` accepts."""
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {sorted(SOLVERS)}")
    params = inspect.signature(SOLVERS[method]).parameters.values()
    return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def solve(fn, z0, method="broyden", **options):
    """Runs the solver named ``method`` with ``options``; an option the method does not take
    is an error, never silently ignored."""
    allowed = solver_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"solver {method!r} got unknown option(s) {unknown}; it accepts {allowed}")
    return SOLVERS[method](fn, z0, **options)
