"""A multilayer perceptron with a Lipschitz constant below ``coeff`` (DESIGN.md §5).

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence


from impflow.nn._stack import LayerStack, fresh_activation
from impflow.nn.activations import make_activation
from impflow.nn.spectral import SpectralLinear

__all__ = ["LipschitzMLP"]


class LipschitzMLP(LayerStack):
    r"""``[SpectralLinear, act, SpectralLinear, act, …, SpectralLinear]`` as an ``nn.Sequential``.

    Every weight is spectrally normalised to norm at most ``coeff`` and every activation is
    1-Lipschitz, so the network is ``coeff``-Lipschitz (once the power iterations have
    converged: eval-mode forwards refresh them, see :class:`SpectralLinear`). There is no
    activation after the last layer.

    Args:
        dims: layer widths ``[d_in, h_1, …, d_out]``, at least 2 positive ints.
        activation: a name (``"sin"``, ``"lipswish"``, ``"elu"``, ``"softplus"``, ``"tanh"``,
            ``"identity"``), an ``nn.Module`` subclass, or an ``nn.Module`` instance used as a
            template: each position gets its own instance (a deep copy), so that learnable
            activations such as LipSwish keep one ``β`` per layer.
        coeff, n_power_iterations, atol, rtol: passed to every :class:`SpectralLinear`.

    Attributes:
        dims: the widths, as a tuple.

    Shapes:
        input: ``(*, dims[0])``; output: ``(*, dims[-1])``.

    Example:
        >>> g = LipschitzMLP([2, 128, 128, 2], activation="sin", coeff=0.99)
    """

    def __init__(
        self,
        dims: Sequence[int],
        activation="sin",
        coeff: float = 0.97,
        n_power_iterations: int = 5,
        atol: float | None = None,
        rtol: float | None = None,
    ):
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence):
            raise ValueError(f"dims must be a list of at least 2 positive ints, got {dims!r}")
        if len(dims) < 2 or any(
            isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims
        ):
            raise ValueError(f"dims must be a list of at least 2 positive ints, got {dims!r}")
        dims = tuple(int(d) for d in dims)
        make_activation(activation)  # validate once, before building anything
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                layers.append(fresh_activation(activation))
            layers.append(
                SpectralLinear(
                    d_in,
                    d_out,
                    coeff=coeff,
                    n_power_iterations=n_power_iterations,
                    atol=atol,
                    rtol=rtol,
                )
            )
        super().__init__(*layers)
        self.dims = dims
        self.coeff = layers[0].coeff
