"""Activation normalisation: a per-channel affine flow layer with data-dependent initialisation.

References:
    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

from impflow.nn._flow_common import check_flow_input, check_logdet_flag, constant_logdet

__all__ = ["ActNorm"]


def _check_num_features(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"num_features must be a positive int, got {value!r}")
    return int(value)


def _check_eps(value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not value > 0
    ):
        raise ValueError(f"eps must be a finite number > 0, got {value!r}")
    return float(value)


class ActNorm(nn.Module):
    r"""``z = (x + bias) · exp(log_scale)``, per channel (dimension 1).

    **Initialisation.** With ``data_init=True`` (the default) the first ``forward`` in training
    mode sets ``bias = -mean`` and ``log_scale = -log(sqrt(var + eps))`` from the statistics of
    its batch over every dimension except the channel one (population variance), so that this
    first output has zero mean and unit variance per channel (Glow). It runs without gradient,
    also under ``torch.no_grad`` (a data-initialisation pass), and then sets the ``initialized``
    buffer, which ``state_dict`` saves: a fresh layer that loads a trained state is not
    initialised again. In eval mode nothing is initialised: the layer uses its parameters as
    they are (the identity for a fresh layer).

    ``inverse`` never initialises (Glow initialises from data ``x``, which an inverse call does
    not see): in training mode it raises on a layer that has not been initialised, rather than
    fix an identity map that the next forward would replace. Call ``forward`` on a data batch
    first, or ``.eval()`` to use the parameters as they are.

    Args:
        num_features: number of channels ``C``.
        data_init: initialise from the first training-mode batch; ``False`` marks the layer
            initialised from the start (the identity, until trained).
        eps: added to the variance at initialisation.

    Attributes:
        bias: ``(C,)`` parameter.
        log_scale: ``(C,)`` parameter.
        initialized: 0-d bool buffer.

    Shapes:
        ``x``, ``z``: ``(B, C)`` or ``(B, C, *)`` (e.g. images ``(B, C, H, W)``);
        ``logdet = Σ_c log_scale_c · (number of positions per channel)``, shape ``(B,)``.

    References:
        | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
        | https://arxiv.org/abs/1807.03039
    """

    def __init__(self, num_features: int, data_init: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_features = _check_num_features(num_features)
        if not isinstance(data_init, bool):
            raise TypeError(f"data_init must be a bool, got {data_init!r}")
        self.eps = _check_eps(eps)
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(not data_init))

    def extra_repr(self) -> str:
        return f"{self.num_features}, initialized={bool(self.initialized)}"

    def _check(self, x, name: str, where: str) -> None:
        check_flow_input(x, name, where)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{where}: {name} must have {self.num_features} channels in dimension 1 "
                f"(shape (B, {self.num_features}, ...)), got shape {tuple(x.shape)}"
            )

    def _channel_view(self, t: Tensor, x: Tensor) -> Tensor:
        # (C,) -> (1, C, 1, ..., 1) to broadcast against x.
        return t.view(1, -1, *([1] * (x.dim() - 2)))

    def _logdet(self, x: Tensor) -> Tensor:
        positions = x[0, 0].numel()  # spatial size per channel (1 for vectors)
        return constant_logdet(self.log_scale.sum() * positions, x)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Sets ``bias`` and ``log_scale`` from ``x`` as described above and marks the layer
        initialised (``forward`` calls this on its first training-mode batch)."""
        self._check(x, "x", "ActNorm.initialize")
        values = x.detach().transpose(0, 1).flatten(1)  # (C, values per channel)
        if values.shape[1] < 2:
            raise ValueError(
                "ActNorm.initialize: data-dependent initialisation needs at least 2 values per "
                f"channel, got x of shape {tuple(x.shape)}; initialise with a larger batch, or "
                "construct ActNorm(..., data_init=False)"
            )
        var, mean = torch.var_mean(values, dim=1, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-0.5 * torch.log(var + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``; initialises first when training and not yet initialised."""
        self._check(x, "x", "ActNorm.forward")
        if self.training and not bool(self.initialized):
            self.initialize(x)
        scale = self._channel_view(self.log_scale.exp(), x)
        z = (x + self._channel_view(self.bias, x)) * scale
        return z, self._logdet(x)

    def inverse(self, z: Tensor, *, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(x, logdet_inv)`` with ``x = z · exp(-log_scale) - bias``, ``logdet_inv = -logdet``;
        ``logdet=False``: ``(x, None)``."""
        check_logdet_flag(logdet, "ActNorm.inverse")
        self._check(z, "z", "ActNorm.inverse")
        if self.training and not bool(self.initialized):
            raise RuntimeError(
                "ActNorm.inverse: the layer is not initialised yet (data-dependent "
                "initialisation runs on the first training-mode forward); run forward on a data "
                "batch first, or call .eval() to use the current parameters"
            )
        x = z * self._channel_view(torch.exp(-self.log_scale), z) - self._channel_view(self.bias, z)
        return x, (-self._logdet(z) if logdet else None)
