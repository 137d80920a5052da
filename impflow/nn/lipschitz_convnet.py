"""A convolutional network with a Lipschitz constant below ``coeff`` (DESIGN.md §1, §5).

This is the network ``g`` of the residual-flow and implicit-flow image models: a stack of
spectrally normalised "same" convolutions (the "3-1-3" nets of ResFlow and ImpFlow), whose
output has the shape of its input.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527

    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence


from impflow.nn._stack import LayerStack, fresh_activation
from impflow.nn.activations import make_activation
from impflow.nn.spectral import SpectralConv2d

__all__ = ["LipschitzConvNet"]


def _check_channels(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_kernel_sizes(kernel_sizes):
    message = "kernel_sizes must be a non-empty sequence of odd positive ints"
    if (
        isinstance(kernel_sizes, (str, bytes))
        or not isinstance(kernel_sizes, Sequence)
        or len(kernel_sizes) == 0
        or any(
            isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1
            for k in kernel_sizes
        )
    ):
        raise ValueError(f"{message}, got {kernel_sizes!r}")
    if any(k % 2 == 0 for k in kernel_sizes):
        raise ValueError(
            f"{message}, got {kernel_sizes!r}: an even kernel cannot keep the spatial size with "
            "symmetric zero padding"
        )
    return tuple(int(k) for k in kernel_sizes)


def _check_input_size(input_size):
    if input_size is None:
        return None
    pair = (input_size, input_size) if isinstance(input_size, numbers.Integral) else input_size
    if (
        isinstance(pair, (str, bytes))
        or not isinstance(pair, Sequence)
        or len(pair) != 2
        or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in pair)
    ):
        raise ValueError(
            f"input_size must be None, a positive int or a pair (H, W) of them, got {input_size!r}"
        )
    return tuple(int(n) for n in pair)


class LipschitzConvNet(LayerStack):
    r"""``[(act,) SpectralConv2d, act, SpectralConv2d, act, …, SpectralConv2d]`` as an
    ``nn.Sequential``: the image network ``g`` of ResFlow / ImpFlow blocks.

    There is one convolution per entry of ``kernel_sizes``, each with stride 1 and padding
    ``k // 2`` ("same"), so the output has the input's shape. The channels go
    ``in_channels → hidden_channels → … → hidden_channels → in_channels``; with a single kernel
    size the one convolution maps ``in_channels → in_channels``. Between consecutive convolutions
    there is an activation (a fresh instance at each position) and none after the last one. With
    ``preactivation=True`` an activation also comes first (ResFlow's ``preact`` option, used by
    every block but the first one of a model, where the input is the data itself).

    Every convolution is spectrally normalised to operator norm at most ``coeff`` at its input
    size and every activation is 1-Lipschitz, so the network is ``coeff``-Lipschitz for inputs
    of that spatial size (once the power iterations have converged: eval-mode forwards refresh
    them, see :class:`SpectralLinear`). The operator norm depends on the
    spatial size, so the network takes one size only: the first input's, or ``input_size`` when
    given (another size raises :class:`SpectralConv2d`'s ``ValueError``); use one network per
    size.

    No normalisation layer is included: an unconstrained affine layer inside ``g`` (ActNorm,
    batch norm with learnable scale) multiplies ``Lip(g)`` by its largest scale and would break
    ``Lip(g) ≤ coeff``, and with it the invertibility of the block. ActNorm belongs between flow
    blocks, not inside ``g``.

    Args:
        in_channels: channels of the input and of the output.
        hidden_channels: channels between the convolutions.
        kernel_sizes: one odd positive int per convolution; ``(3, 1, 3)`` is the "3-1-3" net of
            the papers. Even sizes are refused: they cannot keep the spatial size with
            symmetric padding.
        activation: a name (``"lipswish"``, ``"sin"``, ``"elu"``, ``"softplus"``, ``"tanh"``,
            ``"identity"``), an ``nn.Module`` subclass, or an ``nn.Module`` instance used as a
            template: each position gets its own instance (a deep copy), so that learnable
            activations such as LipSwish keep one ``β`` per position.
        coeff, n_power_iterations, atol, rtol: passed to every :class:`SpectralConv2d`.
        preactivation: whether an activation comes before the first convolution.
        input_size: optional ``(H, W)`` (or an int), passed to every convolution so that its
            power-iteration buffers get their shapes at construction (needed, for example,
            before wrapping the network in ``DistributedDataParallel``); by default they are
            created at the first forward.

    Attributes:
        in_channels, hidden_channels, kernel_sizes, preactivation, coeff: the arguments
            (``kernel_sizes`` as a tuple).

    Shapes:
        input: ``(B, in_channels, H, W)`` or ``(in_channels, H, W)``; output: the same shape.

    Example:
        >>> g = LipschitzConvNet(3, 512, kernel_sizes=(3, 1, 3), activation="lipswish")
        >>> g(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735

        | Implicit Normalizing Flows (Lu et al., 2021)
        | https://arxiv.org/abs/2103.09527
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        kernel_sizes: Sequence[int] = (3, 1, 3),
        activation="lipswish",
        coeff: float = 0.98,
        n_power_iterations: int = 5,
        preactivation: bool = False,
        atol: float | None = None,
        rtol: float | None = None,
        input_size=None,
    ):
        in_channels = _check_channels(in_channels, "in_channels")
        hidden_channels = _check_channels(hidden_channels, "hidden_channels")
        kernel_sizes = _check_kernel_sizes(kernel_sizes)
        if type(preactivation) is not bool:  # not 0 / 1 or other truthy values
            raise ValueError(f"preactivation must be a bool, got {preactivation!r}")
        input_size = _check_input_size(input_size)
        make_activation(activation)  # validate once, before building anything

        n = len(kernel_sizes)
        channels = [in_channels] + [hidden_channels] * (n - 1) + [in_channels]
        layers = [fresh_activation(activation)] if preactivation else []
        for i, k in enumerate(kernel_sizes):
            if i > 0:
                layers.append(fresh_activation(activation))
            layers.append(
                SpectralConv2d(
                    channels[i],
                    channels[i + 1],
                    k,
                    stride=1,
                    padding=k // 2,
                    coeff=coeff,
                    n_power_iterations=n_power_iterations,
                    atol=atol,
                    rtol=rtol,
                    input_size=input_size,
                )
            )
        super().__init__(*layers)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.kernel_sizes = kernel_sizes
        self.preactivation = preactivation
        self.coeff = layers[-1].coeff
