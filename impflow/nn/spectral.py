"""Spectrally normalised linear and convolutional layers (DESIGN.md §1).

Each layer uses its weight as ``W / max(1, σ(W) / c)``, where ``σ(W)`` is the largest singular
value of the layer's linear map, estimated by power iteration with the vectors ``u`` and ``v``
kept as buffers, and ``c`` (``coeff``) is the target Lipschitz constant. A weight whose norm is
already below ``c`` is left unchanged (soft normalisation, as in ResFlow).

For a convolution, ``σ`` is the operator norm of the convolution at the layer's input size
(power iteration with ``conv2d`` / ``conv_transpose2d``), not the norm of the reshaped kernel,
so that the bound ``Lip ≤ c`` holds for the map the layer actually computes.

The power-iteration steps live in two small functions, :func:`power_iteration_dense` and
:func:`power_iteration_conv2d`, so that a fused kernel can replace them later.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Spectral Normalization for Generative Adversarial Networks (Miyato et al., 2018)
    | https://arxiv.org/abs/1802.05957

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from impflow.ops.power import power_iteration

__all__ = [
    "SpectralConv2d",
    "SpectralLinear",
    "power_iteration_conv2d",
    "power_iteration_dense",
    "update_lipschitz",
]

# Power-iteration steps run when u and v are first set up (at construction for SpectralLinear,
# at the first forward for SpectralConv2d), so that even a layer that is only ever evaluated
# starts from a converged estimate instead of random vectors (DESIGN.md §7: too few iterations
# leave σ > c). With a tolerance (atol / rtol) they stop early.
INIT_POWER_ITERATIONS = 200


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_coeff(coeff):
    if (
        isinstance(coeff, bool)
        or not isinstance(coeff, numbers.Real)
        or not math.isfinite(coeff)
        or not 0 < coeff <= 1
    ):
        raise ValueError(f"coeff must be a number in (0, 1], got {coeff!r}")
    return float(coeff)


def _check_n_iterations(n, name="n_power_iterations"):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _check_tol(tol, name):
    if tol is None:
        return None
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not math.isfinite(tol)
        or tol < 0
    ):
        raise ValueError(f"{name} must be None or a finite number >= 0, got {tol!r}")
    return float(tol)


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_pair(value, name, minimum):
    pair = _pair(value)
    if len(pair) != 2 or any(
        isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < minimum for p in pair
    ):
        raise ValueError(f"{name} must be an integer >= {minimum} or a pair of them, got {value!r}")
    return tuple(int(p) for p in pair)


# --------------------------------------------------------------------------------------------
# Power iteration (the steps a fused kernel will replace)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    """``t / ||t||`` over all elements (a zero tensor stays zero)."""
    return t / t.norm().clamp_min(1e-12)


def _small_change(new: torch.Tensor, old: torch.Tensor, atol: float, rtol: float) -> bool:
    # ResFlow's test: root-mean-square change below atol + rtol * (largest element).
    err = (new - old).norm() / math.sqrt(new.numel())
    return bool(err < atol + rtol * new.abs().max())


def power_iteration_dense(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_iterations: int,
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Power iteration for the largest singular value of a matrix.

    Each step is ``v ← normalize(Wᵀu)``, then ``u ← normalize(Wv)``. Call it under
    ``torch.no_grad()``; the inputs are not modified.

    Args:
        weight: (out, in) matrix ``W``.
        u: (out,) left vector.
        v: (in,) right vector.
        n_iterations: number of steps (the most, when a tolerance is given).
        atol, rtol: when either is given (the other counts as 0), stop after the first step in
            which the root-mean-square change of both ``u`` and ``v`` is below
            ``atol + rtol * max|·|`` of the new vector (ResFlow's test).

    Returns:
        ``(u, v, n_used)``: the new unit vectors (new tensors) and the number of steps run.
    """
    check = atol is not None or rtol is not None
    if not check:  # a fixed number of steps: one fused call (impflow.ops.power_iteration)
        u, v = u.detach().clone(), v.detach().clone()
        power_iteration([weight.detach()], [u], [v], n_iterations)
        return u, v, n_iterations
    atol, rtol = atol or 0.0, rtol or 0.0
    steps = 0
    for steps in range(1, n_iterations + 1):
        u_old, v_old = u, v
        v = _normalize(torch.mv(weight.t(), u))
        u = _normalize(torch.mv(weight, v))
        if check and _small_change(u, u_old, atol, rtol) and _small_change(v, v_old, atol, rtol):
            break
    return u, v, steps


def power_iteration_conv2d(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    n_iterations: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    output_padding: tuple[int, int],
    atol: float | None = None,
    rtol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Power iteration for the operator norm of a 2-D convolution (no bias) at a fixed size.

    Each step is ``v ← normalize(Aᵀu)`` with ``Aᵀ = conv_transpose2d``, then
    ``u ← normalize(Av)`` with ``A = conv2d``. Call it under ``torch.no_grad()``.

    Args:
        weight: (C_out, C_in, kH, kW) kernel.
        u: (1, C_out, H_out, W_out) left vector (unit norm over all elements).
        v: (1, C_in, H, W) right vector.
        n_iterations: number of steps (the most, when a tolerance is given).
        stride, padding: those of the convolution.
        output_padding: makes ``conv_transpose2d`` return ``v``'s shape (for strides > 1).
        atol, rtol: as in :func:`power_iteration_dense`.

    Returns:
        ``(u, v, n_used)`` as in :func:`power_iteration_dense`.
    """
    check = atol is not None or rtol is not None
    atol, rtol = atol or 0.0, rtol or 0.0
    steps = 0
    for steps in range(1, n_iterations + 1):
        u_old, v_old = u, v
        v = _normalize(
            F.conv_transpose2d(
                u, weight, stride=stride, padding=padding, output_padding=output_padding
            )
        )
        u = _normalize(F.conv2d(v, weight, stride=stride, padding=padding))
        if check and _small_change(u, u_old, atol, rtol) and _small_change(v, v_old, atol, rtol):
            break
    return u, v, steps


# --------------------------------------------------------------------------------------------
# Shared behaviour


class _SpectralNormMixin:
    """What both layers share: the update/σ/normalisation logic around one power-iteration step
    function. Subclasses define ``_iterate(n, atol, rtol)`` (returns new u, v, steps) and
    ``_sigma_from(u, v)`` (σ with gradient through the weight), and ``_ready()``."""

    def _ready(self) -> bool:
        return True

    def _require_ready(self):
        if not self._ready():
            raise RuntimeError(
                f"{type(self).__name__} has not seen an input yet: its power-iteration vectors "
                "are created at the first forward, at that input's spatial size"
            )

    @torch.no_grad()
    def power_iteration(
        self, n_iterations: int, atol: float | None = None, rtol: float | None = None
    ) -> int:
        """Runs power-iteration steps now (in any mode) and stores ``u`` and ``v``.

        Use it before evaluation, so that ``σ`` is converged (DESIGN.md §7).

        Args:
            n_iterations: number of steps (the most, when a tolerance is given).
            atol, rtol: optional early stop, as in :func:`power_iteration_dense`; by default
                exactly ``n_iterations`` steps run (the layer's own ``atol`` / ``rtol`` only
                apply to the steps of training-mode forwards).

        Returns:
            The number of steps run.
        """
        n_iterations = _check_n_iterations(n_iterations, "n_iterations")
        atol, rtol = _check_tol(atol, "atol"), _check_tol(rtol, "rtol")
        self._require_ready()
        u, v, steps = self._iterate(n_iterations, atol, rtol)
        self.u.copy_(u)
        self.v.copy_(v)
        return steps

    def sigma(self) -> torch.Tensor:
        """The current estimate ``σ = uᵀ W v`` from the stored vectors (no iteration).

        Returns:
            0-dim tensor, differentiable with respect to ``weight``.
        """
        self._require_ready()
        return self._sigma_from(self.u.clone(), self.v.clone())

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, σ / coeff)`` with ``σ`` from the stored vectors (no iteration).

        Returns:
            A tensor shaped as ``weight``, differentiable with respect to it.
        """
        return self._normalize_weight(self.sigma())

    def _normalize_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        factor = torch.clamp(sigma / self.coeff, min=1.0)
        return self.weight / factor

    def _weight_for_forward(self) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                u, v, _ = self._iterate(self.n_power_iterations, self.atol, self.rtol)
                self.u.copy_(u)
                self.v.copy_(v)
        # σ is computed from copies, so that a later in-place update of the buffers (the next
        # training forward) cannot invalidate the graph of this one.
        return self._normalize_weight(self._sigma_from(self.u.clone(), self.v.clone()))

    def _spectral_repr(self) -> str:
        s = f"coeff={self.coeff}, n_power_iterations={self.n_power_iterations}"
        if self.atol is not None or self.rtol is not None:
            s += f", atol={self.atol}, rtol={self.rtol}"
        return s


def _reset_like_torch(weight: nn.Parameter, bias: nn.Parameter | None):
    # The initialisation of nn.Linear / nn.Conv2d.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


# --------------------------------------------------------------------------------------------
# Layers


class SpectralLinear(_SpectralNormMixin, nn.Module):
    r"""A linear layer ``y = x Ŵᵀ + b`` with ``Ŵ = W / max(1, σ(W) / coeff)``.

    ``σ(W)`` is estimated by power iteration with unit vectors ``u`` (out,) and ``v`` (in,)
    kept as buffers. In training mode each forward first runs ``n_power_iterations`` steps
    ``v ← normalize(Wᵀu), u ← normalize(Wv)`` without gradient and stores ``u`` and ``v``; then
    ``σ = uᵀWv`` is computed with gradient through ``W`` (as in ResFlow). In eval mode no step
    runs: ``σ`` comes from the stored vectors. Power iteration approaches ``σ`` from below, so an
    unconverged estimate leaves ``‖Ŵ‖ > coeff``: run :meth:`power_iteration` (or
    :func:`update_lipschitz`) before evaluation. ``INIT_POWER_ITERATIONS`` steps run at
    construction.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        coeff: target Lipschitz constant ``c`` in (0, 1].
        n_power_iterations: power-iteration steps per training-mode forward (a positive int;
            the most steps when a tolerance is given).
        atol, rtol: optional early stop of those steps (either may be given; the other counts
            as 0), see :func:`power_iteration_dense`.
        device, dtype: factory arguments, as in ``nn.Linear``.

    Attributes:
        weight: (out_features, in_features) parameter, initialised as in ``nn.Linear``.
        bias: (out_features,) parameter or None.
        u: (out_features,) buffer, unit norm.
        v: (in_features,) buffer, unit norm.

    Shapes:
        input: ``(*, in_features)``; output: ``(*, out_features)``.

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = _check_size(in_features, "in_features")
        self.out_features = _check_size(out_features, "out_features")
        self.coeff = _check_coeff(coeff)
        self.n_power_iterations = _check_n_iterations(n_power_iterations)
        self.atol = _check_tol(atol, "atol")
        self.rtol = _check_tol(rtol, "rtol")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        w = self.weight
        self.register_buffer("u", _normalize(w.new_empty(out_features).normal_()))
        self.register_buffer("v", _normalize(w.new_empty(in_features).normal_()))
        self.power_iteration(INIT_POWER_ITERATIONS, self.atol, self.rtol)

    def reset_parameters(self):
        """Initialises ``weight`` and ``bias`` as ``nn.Linear`` does."""
        _reset_like_torch(self.weight, self.bias)

    def _iterate(self, n, atol, rtol):
        return power_iteration_dense(self.weight, self.u, self.v, n, atol, rtol)

    def _sigma_from(self, u, v):
        return torch.dot(u, torch.mv(self.weight, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._weight_for_forward(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._spectral_repr()}"
        )


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


# --------------------------------------------------------------------------------------------


@torch.no_grad()
def update_lipschitz(module: nn.Module, n_iterations: int = 20) -> int:
    """Runs power-iteration steps on every spectral layer inside ``module``.

    Call it before evaluation (and after loading weights) so that every ``σ`` estimate is
    converged and every layer is really ``coeff``-Lipschitz (DESIGN.md §7). A
    :class:`SpectralConv2d` that has not seen an input yet is skipped (its vectors are created,
    and iterated, at its first forward).

    Args:
        module: any module; ``module`` itself counts if it is a spectral layer.
        n_iterations: steps per layer (exactly that many; a positive int).

    Returns:
        The number of layers updated.
    """
    n_iterations = _check_n_iterations(n_iterations, "n_iterations")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    dense, count = {}, 0
    for layer in module.modules():
        if isinstance(layer, SpectralLinear):
            # Dense layers of one dtype and device go through a single fused call.
            dense.setdefault((layer.weight.dtype, layer.weight.device), []).append(layer)
        elif isinstance(layer, SpectralConv2d) and layer._ready():
            layer.power_iteration(n_iterations)
            count += 1
    with torch.no_grad():
        for layers in dense.values():
            power_iteration(
                [layer.weight.detach() for layer in layers],
                [layer.u for layer in layers],
                [layer.v for layer in layers],
                n_iterations,
            )
            count += len(layers)
    return count
