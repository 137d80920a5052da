"""Argument checks and preparation shared by the log-determinant estimators."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from impflow._warnings import warn_at_caller

__all__ = ["SeriesDivergenceError", "SeriesDivergenceWarning"]


class SeriesDivergenceError(RuntimeError):
    """The power series of ``log det(I + J_g)`` diverges (or was measured to grow): ``g`` is
    not contractive where it was evaluated, and any value the series returned would be garbage."""


class SeriesDivergenceWarning(RuntimeWarning):
    """Warning variant of :class:`SeriesDivergenceError` (``on_divergence="warn"``): the
    estimate is still returned, and is flagged (``LogdetStats.diverged``) as untrustworthy."""


_ON_DIVERGENCE = ("raise", "warn")


def check_nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_on_divergence(value) -> str:
    if value not in _ON_DIVERGENCE:
        raise ValueError(f"on_divergence must be one of {_ON_DIVERGENCE}, got {value!r}")
    return value


def report_divergence(message: str, on_divergence: str) -> None:
    if on_divergence == "raise":
        raise SeriesDivergenceError(message)
    warn_at_caller(message, SeriesDivergenceWarning)


def check_input(x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"x must have shape (B, ...) with at least one per-sample dimension, got shape "
            f"{tuple(x.shape)}; use x.unsqueeze(-1) for scalar samples"
        )
    # Bad input, not a divergence of the series: refused whatever on_divergence says.
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError("x contains NaN or Inf; the log-determinant needs finite inputs")


def per_sample_dim(x: Tensor) -> int:
    return math.prod(x.shape[1:])


def resolve_create_graph(create_graph) -> bool:
    if create_graph is None:
        return torch.is_grad_enabled()
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be None or a bool, got {create_graph!r}")
    return create_graph


def prepare(g, x: Tensor, *, detach: bool = False, check_x: bool = True) -> tuple[Tensor, Tensor]:
    """Evaluates ``g`` on a private node ``x_in`` of ``x`` (call inside ``torch.enable_grad``).

    Derivatives are taken with respect to ``x_in``, never ``x`` itself: a gradient hook on
    ``x`` (e.g. a re-attached root in an implicit block, DESIGN.md §7) then does not fire
    inside the estimator's own ``autograd.grad`` calls, and ``x``'s gradient still flows
    through ``x_in`` in the caller's backward pass. With ``detach=True`` ``x_in`` is a
    detached leaf instead (no path back to ``x``: the caller connects the gradient itself).
    ``check_x=False`` skips :func:`check_input` (the caller ran it).

    Returns:
        ``(x_in, gx)`` with ``gx = g(x_in)``; ``gx.shape == x.shape`` is checked.
    """
    if check_x:
        check_input(x)
    if not callable(g):
        raise TypeError(f"g must be callable (e.g. an nn.Module), got {type(g).__name__}")
    if x.requires_grad and not detach:
        x_in = x.view_as(x)
    else:
        x_in = x.detach().requires_grad_(True)
    gx = g(x_in)
    if not isinstance(gx, Tensor):
        raise TypeError(f"g must return a tensor, got {type(gx).__name__}")
    if gx.shape != x.shape:
        raise ValueError(
            f"g must map x to a tensor of the same shape (the Jacobian must be square): "
            f"x has shape {tuple(x.shape)}, g(x) has shape {tuple(gx.shape)}"
        )
    if gx.dtype != x.dtype:
        raise ValueError(f"g(x) has dtype {gx.dtype}, x has dtype {x.dtype}")
    return x_in, gx


def module_needs_graph(g, x: Tensor) -> bool:
    """Whether a differentiable result is useful: ``x`` requires grad, or ``g`` may hold
    trainable tensors (any callable that is not a parameter-free ``nn.Module``)."""
    if x.requires_grad:
        return True
    if isinstance(g, nn.Module):
        return any(p.requires_grad for p in g.parameters())
    return True
