"""SpectralConv2d: a convolution whose operator norm at its input size is at most ``coeff``.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Spectral Normalization for Generative Adversarial Networks (Miyato et al., 2018)
    | https://arxiv.org/abs/1802.05957
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from impflow.nn.spectral._checks import (
    _check_coeff,
    _check_n_iterations,
    _check_pair,
    _check_size,
    _check_tol,
)
from impflow.nn.spectral._mixin import INIT_POWER_ITERATIONS, _reset_like_torch, _SpectralNormMixin
from impflow.nn.spectral.power import _normalize, power_iteration_conv2d

__all__ = ["SpectralConv2d"]


class SpectralConv2d(_SpectralNormMixin, nn.Module):
    r"""A 2-D convolution whose kernel is scaled so that its operator norm is at most ``coeff``.

    ``σ`` is the operator norm (largest singular value) of the linear map ``x ↦ conv2d(x, W)``
    at the input spatial size ``H×W`` of the FIRST forward, estimated by power iteration with
    ``conv2d`` and ``conv_transpose2d`` on the vectors ``u`` (1, C_out, H_out, W_out) and
    ``v`` (1, C_in, H, W). The kernel is used as ``W / max(1, σ / coeff)``; training and eval
    modes behave as in :class:`SpectralLinear`.

    The vectors are created at the first forward (with ``INIT_POWER_ITERATIONS`` steps), and
    the input size is stored in the buffer ``input_size``; all three save and load through
    ``state_dict``, also into a fresh layer that has never seen an input. Pass ``input_size``
    to create them at construction instead (needed, for example, before wrapping the layer in
    ``DistributedDataParallel``, which expects buffers of fixed shapes).

    The operator norm depends on the input size, so the layer refuses inputs of another
    spatial size (``ValueError``) rather than silently giving up its Lipschitz bound; use one
    layer per input size.

    Args:
        in_channels, out_channels: numbers of channels.
        kernel_size, stride, padding: as in ``nn.Conv2d`` (ints or pairs; zero padding only).
        bias: whether to learn an additive bias.
        coeff, n_power_iterations, atol, rtol: as in :class:`SpectralLinear`.
        groups: only 1 is supported (``ValueError`` otherwise).
        input_size: optional ``(H, W)`` (or an int) to set up the vectors at construction.
        device, dtype: factory arguments, as in ``nn.Conv2d``.

    Attributes:
        weight: (C_out, C_in, kH, kW) parameter, initialised as in ``nn.Conv2d``.
        bias: (C_out,) parameter or None.
        u, v: buffers (shape ``(0,)`` until the first forward).
        input_size: (2,) long buffer, ``(H, W)``, or zeros until the first forward.

    Shapes:
        input: ``(B, C_in, H, W)`` or ``(C_in, H, W)``; output: ``(B, C_out, H_out, W_out)``
        or ``(C_out, H_out, W_out)``.

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735

        | Invertible Residual Networks (Behrmann et al., 2019)
        | https://arxiv.org/abs/1811.00995
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
        *,
        groups: int = 1,
        input_size=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels = _check_size(in_channels, "in_channels")
        self.out_channels = _check_size(out_channels, "out_channels")
        if groups != 1:
            raise ValueError(f"SpectralConv2d supports only groups=1, got groups={groups!r}")
        if isinstance(padding, str):
            raise ValueError(f"padding must be an integer or a pair of them, got {padding!r}")
        self.kernel_size = _check_pair(kernel_size, "kernel_size", 1)
        self.stride = _check_pair(stride, "stride", 1)
        self.padding = _check_pair(padding, "padding", 0)
        self.coeff = _check_coeff(coeff)
        self.n_power_iterations = _check_n_iterations(n_power_iterations)
        self.atol = _check_tol(atol, "atol")
        self.rtol = _check_tol(rtol, "rtol")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels, *self.kernel_size, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        # Placeholders until the first forward; _load_from_state_dict resizes them on load.
        self.register_buffer("u", self.weight.new_empty(0))
        self.register_buffer("v", self.weight.new_empty(0))
        self.register_buffer(
            "input_size", torch.zeros(2, dtype=torch.long, device=self.weight.device)
        )
        if input_size is not None:
            self._setup(_check_pair(input_size, "input_size", 1))

    def reset_parameters(self):
        """Initialises ``weight`` and ``bias`` as ``nn.Conv2d`` does."""
        _reset_like_torch(self.weight, self.bias)

    # -- lazily created vectors --------------------------------------------------------------

    def _ready(self) -> bool:
        return self.v.dim() == 4

    def _output_size(self, size):
        return tuple(
            (n + 2 * p - k) // s + 1
            for n, p, k, s in zip(size, self.padding, self.kernel_size, self.stride)
        )

    def _output_padding(self):
        # conv_transpose2d maps H_out back to (H_out - 1) s - 2p + k + output_padding; choose
        # output_padding (in [0, s - 1]) so that this is the input size H again.
        size = tuple(int(n) for n in self.input_size.tolist())
        out = self._output_size(size)
        return tuple(
            n - ((m - 1) * s - 2 * p + k)
            for n, m, s, p, k in zip(size, out, self.stride, self.padding, self.kernel_size)
        )

    @torch.no_grad()
    def _setup(self, size):
        out = self._output_size(size)
        if min(out) < 1:
            raise ValueError(
                f"input of spatial size {size[0]}x{size[1]} is too small for kernel_size="
                f"{self.kernel_size}, padding={self.padding}"
            )
        w = self.weight
        self.input_size = torch.tensor(size, dtype=torch.long, device=w.device)
        self.u = _normalize(w.new_empty(1, self.out_channels, *out).normal_())
        self.v = _normalize(w.new_empty(1, self.in_channels, *size).normal_())
        self.power_iteration(INIT_POWER_ITERATIONS, self.atol, self.rtol)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Give the buffers the saved shapes first, so that the ordinary copy succeeds even in a
        # layer that has never seen an input (or saw another size).
        for name in ("u", "v"):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and saved.shape != getattr(self, name).shape:
                current = getattr(self, name)
                setattr(
                    self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device)
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- power iteration and forward ---------------------------------------------------------

    def _iterate(self, n, atol, rtol):
        return power_iteration_conv2d(
            self.weight,
            self.u,
            self.v,
            n,
            self.stride,
            self.padding,
            self._output_padding(),
            atol,
            rtol,
        )

    def _sigma_from(self, u, v):
        return (u * F.conv2d(v, self.weight, stride=self.stride, padding=self.padding)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(
                f"SpectralConv2d expects (B, C, H, W) or (C, H, W) input, got {tuple(x.shape)}"
            )
        size = tuple(x.shape[-2:])
        if not self._ready():
            self._setup(size)
        else:
            expected = tuple(int(n) for n in self.input_size.tolist())
            if size != expected:
                raise ValueError(
                    f"SpectralConv2d was normalised for inputs of spatial size "
                    f"{expected[0]}x{expected[1]} (its first input) and got {size[0]}x{size[1]}: "
                    "the operator norm depends on the input size, use one layer per size"
                )
        return F.conv2d(
            x, self._weight_for_forward(), self.bias, stride=self.stride, padding=self.padding
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"{self._spectral_repr()}"
        )
        if self._ready():
            s += f", input_size={tuple(self.input_size.tolist())}"
        return s
