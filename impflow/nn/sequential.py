"""A composition of flow layers (DESIGN.md §1, §5)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from impflow.nn._flow_common import (
    call_inverse,
    check_flow_layer,
    check_flow_tensor,
    check_layer_output,
    check_logdet_flag,
    output_shape_of,
)

__all__ = ["SequentialFlow"]


class SequentialFlow(nn.Sequential):
    r"""Flow layers applied in order: ``z = f_n(… f_1(x))``.

    ``forward`` returns ``(z, Σ_i logdet_i)``; ``inverse`` applies the layers' inverses in
    reverse order and returns ``(x, Σ_i logdet_inv_i)``. Each layer must be an ``nn.Module``
    with ``forward(x) -> (z, logdet)`` and ``inverse(z) -> (x, logdet_inv)``, ``logdet`` of
    shape ``(B,)``; what each layer returns is checked, with the failing layer named.

    ``inverse(z, logdet=False)`` returns ``(x, None)`` and asks each layer for the same: a
    layer whose ``inverse`` has a ``logdet`` parameter gets ``logdet=False`` (no log-det work),
    any other (a user's layer) runs its full inverse and its log-det is dropped.

    As an ``nn.Sequential`` it indexes, slices (a slice is a ``SequentialFlow``), iterates and
    takes an ``OrderedDict`` of named layers.

    Args:
        *layers: flow layers, or one ``OrderedDict`` of them. No layer gives the identity.

    Shapes:
        whatever the layers take; ``logdet``: ``(B,)``.

    Example:
        >>> flow = SequentialFlow(LogitTransform(0.05), ActNorm(3), Squeeze())
        >>> z, logdet = flow(torch.rand(8, 3, 4, 4))
    """

    def __init__(self, *layers):
        # One OrderedDict argument is also how nn.Sequential rebuilds a slice.
        if len(layers) == 1 and isinstance(layers[0], OrderedDict):
            named = list(layers[0].items())
        else:
            named = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in named:
            check_flow_layer(layer, f"SequentialFlow layer {name!r}")
        super().__init__(*layers)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample output shape for a per-sample input ``shape``."""
        for layer in self:
            shape = output_shape_of(layer, shape)
        return tuple(shape)

    def _where(self, key, layer, method: str) -> str:
        return f"SequentialFlow layer {key!r} ({type(layer).__name__}).{method}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: the layers in order, their log-dets summed."""
        check_flow_tensor(x, "x", "SequentialFlow.forward", min_dim=1)
        h, total = x, x.new_zeros(x.shape[0])
        for key, layer in self._modules.items():
            h, logdet = check_layer_output(layer(h), h.shape[0], self._where(key, layer, "forward"))
            total = total + logdet
        return h, total

    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)``: the layers' inverses in reverse order, log-dets summed;
        ``logdet=False``: ``(x, None)``, no layer computing its log-det (see above)."""
        check_logdet_flag(logdet, "SequentialFlow.inverse")
        check_flow_tensor(z, "z", "SequentialFlow.inverse", min_dim=1)
        h, total = z, (z.new_zeros(z.shape[0]) if logdet else None)
        for key, layer in reversed(list(self._modules.items())):
            h, logdet_inv = call_inverse(layer, h, logdet, self._where(key, layer, "inverse"))
            if logdet:
                total = total + logdet_inv
        return h, total
