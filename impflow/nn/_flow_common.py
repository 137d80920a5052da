"""What the flow layers share: the checks of their inputs and of their sub-layers' outputs, the
per-sample shape a layer maps its input to (DESIGN.md §1: ``forward(x) -> (z, logdet)``,
``inverse(z) -> (x, logdet_inv)``, ``logdet`` of shape ``(B,)``), and the call of a sub-layer's
inverse with or without its log-determinant (``inverse(z, logdet=False) -> (x, None)``)."""

from __future__ import annotations

import inspect
import math
import numbers
import weakref

import torch
from torch import Tensor, nn


def check_flow_input(x, name: str, where: str, min_dim: int = 2, exact_dim: int | None = None):
    """Raises a clear error unless ``x`` is a finite floating-point tensor of shape
    ``(B, ...)`` with ``min_dim`` (or exactly ``exact_dim``) dimensions.

    The finiteness test is one reduction (a device synchronisation on a GPU): NaN or Inf
    entering a flow would otherwise come out as a silently wrong log-density."""
    check_flow_tensor(x, name, where, min_dim, exact_dim)
    check_finite(x, name, where)


def check_flow_tensor(x, name: str, where: str, min_dim: int = 2, exact_dim: int | None = None):
    """:func:`check_flow_input` without the finiteness test (no device synchronisation)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if exact_dim is not None and x.dim() != exact_dim:
        raise ValueError(
            f"{where}: {name} must have {exact_dim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"{where}: {name} must have shape (B, ...) with at least {min_dim} dimensions "
            f"(batch first), got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:  # as the solvers: an empty batch is a caller's mistake, said here
        raise ValueError(
            f"{where}: {name} must hold at least one sample, got shape {tuple(x.shape)}"
        )


class NonFiniteError(ValueError):
    """A flow layer met NaN or Inf: in its input, or in what its networks returned (e.g. once
    training has blown the weights up; the training loop reports it as a non-finite loss)."""


def check_finite(x: Tensor, name: str, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        flat = per_sample(x.detach())
        bad = (~torch.isfinite(flat)).any(1).nonzero().flatten()
        raise NonFiniteError(f"{where}: {name} contains NaN or Inf (samples {bad[:8].tolist()})")


def check_flow_layer(layer, name: str) -> nn.Module:
    """A flow layer is an ``nn.Module`` (so its parameters are registered) with ``inverse``."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must be an nn.Module flow layer, got {type(layer).__name__}")
    if not callable(getattr(layer, "inverse", None)):
        raise TypeError(
            f"{name} ({type(layer).__name__}) must have an inverse(z) -> (x, logdet_inv) method"
        )
    return layer


def check_layer_output(
    out, batch: int, where: str, *, logdet_optional: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Unpacks a sub-layer's ``(tensor, logdet)`` and checks ``logdet`` has shape ``(batch,)``;
    ``logdet_optional``: ``None`` is accepted in its place (an inverse without log-det)."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{where} must return a pair (tensor, logdet), got {type(out).__name__}; flow layers "
            "follow DESIGN.md §1"
        )
    y, logdet = out
    if logdet is None and logdet_optional:
        if not isinstance(y, Tensor):
            raise TypeError(f"{where} must return a tensor first, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != batch:
            raise ValueError(
                f"{where} must keep the batch size {batch}, got tensor {tuple(y.shape)}"
            )
        return y, None
    if not isinstance(y, Tensor) or not isinstance(logdet, Tensor):
        raise TypeError(f"{where} must return two tensors (tensor, logdet)")
    if y.dim() == 0 or y.shape[0] != batch or logdet.shape != (batch,):
        raise ValueError(
            f"{where} must keep the batch size {batch} and return logdet of shape ({batch},), "
            f"got tensor {tuple(y.shape)} and logdet {tuple(logdet.shape)}"
        )
    return y, logdet


def check_logdet_flag(logdet, where: str) -> bool:
    """The ``logdet`` keyword of ``inverse``: ``True`` (compute the log-det) or ``False`` (skip
    it and return ``None`` in its place)."""
    if not isinstance(logdet, bool):
        raise TypeError(f"{where}: logdet must be True or False, got {logdet!r}")
    return logdet


# Whether an inverse implementation takes the ``logdet`` keyword, keyed by its function (shared
# by every instance of a class); weak, so that per-instance functions can go.
_TAKES_LOGDET: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature_takes_logdet(method) -> bool:
    try:
        parameter = inspect.signature(method).parameters.get("logdet")
    except (TypeError, ValueError):  # no introspectable signature (a builtin, say)
        return False
    # A parameter of that name, by keyword; ``**kwargs`` does not count (a wrapper may pass it
    # on to something with another meaning of the word), so such a layer gets the fallback.
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def inverse_takes_logdet(layer) -> bool:
    """Whether ``layer.inverse`` accepts ``logdet=False`` (a parameter named ``logdet``),
    decided once per inverse implementation from its signature."""
    method = layer.inverse
    func = getattr(method, "__func__", method)
    try:
        return _TAKES_LOGDET[func]
    except (KeyError, TypeError):  # TypeError: not weakly referenceable, so never cached
        pass
    takes = _signature_takes_logdet(method)
    try:
        _TAKES_LOGDET[func] = takes
    except TypeError:
        pass
    return takes


def call_inverse(layer, z: Tensor, logdet: bool, where: str) -> tuple[Tensor, Tensor | None]:
    """``layer.inverse(z)`` checked as ``(x, logdet_inv)``; with ``logdet=False``, ``(x, None)``
    from ``layer.inverse(z, logdet=False)``, or, for a layer whose inverse does not take the
    keyword (a user's layer), from its full inverse with the log-det dropped."""
    batch = z.shape[0]
    if logdet:
        return check_layer_output(layer.inverse(z), batch, where)
    out = layer.inverse(z, logdet=False) if inverse_takes_logdet(layer) else layer.inverse(z)
    return check_layer_output(out, batch, where, logdet_optional=True)[0], None


def check_shape(shape, name: str, minimum: int = 1) -> tuple[int, ...]:
    """A shape: an int or a sequence of ints ``>= minimum`` (1: a per-sample shape; 0: a sample
    shape, where empty dimensions are allowed)."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if dims is None or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < minimum for d in dims
    ):
        what = "positive ints" if minimum == 1 else f"ints >= {minimum}"
        raise ValueError(f"{name} must be a sequence of {what}, got {shape!r}")
    return tuple(int(d) for d in dims)


def output_shape_of(layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape ``layer.forward`` maps ``shape`` to: ``layer.output_shape(shape)``
    where the layer defines it (shape-changing layers: Squeeze, SequentialFlow, MultiScale),
    ``shape`` itself otherwise (flow layers keep the shape unless they say so)."""
    method = getattr(layer, "output_shape", None)
    return tuple(method(tuple(shape))) if callable(method) else tuple(shape)


def per_sample(t: Tensor) -> Tensor:
    """``t`` of shape ``(B, ...)`` as ``(B, n)`` (also for ``B = 0``, where ``-1`` is ambiguous)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def constant_logdet(value: Tensor, like: Tensor) -> Tensor:
    """A per-sample log-det that is the same for every sample: ``value`` (0-d) broadcast to
    ``(B,)`` as its own tensor (callers may add into it in place), in ``like``'s dtype."""
    return value.to(like.dtype).reshape(1).expand(like.shape[0]).clone()
