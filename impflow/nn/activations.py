"""1-Lipschitz activations for Lipschitz-constrained networks, and a registry of them.

With spectrally normalised weights (``σ(W) ≤ c``) and activations whose derivative stays in
``[-1, 1]``, a network ``g`` has ``Lip(g) ≤ c < 1``, as ResFlow and ImpFlow blocks need.
Every activation here has ``|f'(x)| ≤ 1`` everywhere, and a class attribute ``smooth``
(``True`` when ``f`` is at least C^1, so that ``J_g`` is continuous and Newton-type solvers and
the log-determinant series behave).

References:
    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "Identity",
    "LipSwish",
    "Sin",
    "Softplus",
    "Tanh",
    "make_activation",
]

_TWO_PI = 2.0 * math.pi


class Sin(nn.Module):
    r"""Scaled sine ``f(x) = sin(2πx) / (2π)``, elementwise.

    ``f'(x) = cos(2πx) ∈ [-1, 1]``, with ``|f'| = 1`` at every half-integer multiple, so the
    bound is tight. Smooth (C^∞). This is the activation of the paper's toy experiments.

    Shapes:
        input: any shape ``(*)``; output: same shape and dtype.

    References:
        | Implicit Normalizing Flows (Lu et al., 2021)
        | https://arxiv.org/abs/2103.09527
    """

    smooth = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling in place on the sine's fresh output (autograd keeps only the sine's
        # input): the same bits as `/`, one temporary less.
        return torch.sin(_TWO_PI * x).div_(_TWO_PI)


class LipSwish(nn.Module):
    r"""LipSwish ``f(x) = x · sigmoid(βx) / 1.1`` with learnable ``β = softplus(raw_beta) > 0``.

    With ``u = βx``, ``d/dx [x·sigmoid(βx)] = s(u) + u·s(u)(1 - s(u))`` (``s`` = sigmoid) does
    not depend on ``β``; it lies in about ``[-0.0998, 1.0998]``, so dividing by 1.1 gives
    ``|f'| ≤ 1`` for every ``β > 0`` (the maximum, ``≈ 0.99985``, is at ``x ≈ 2.3994 / β``).
    Smooth (C^∞).

    Args:
        beta_init: initial ``β > 0``; ``raw_beta`` starts at ``softplus⁻¹(beta_init)``.

    Shapes:
        input: any shape ``(*)``; output: same shape and dtype.

    References:
        | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
        | https://arxiv.org/abs/1906.02735
    """

    smooth = True

    def __init__(self, beta_init: float = 0.5):
        super().__init__()
        ok = isinstance(beta_init, (int, float)) and not isinstance(beta_init, bool)
        if not ok or not math.isfinite(beta_init) or beta_init <= 0:
            raise ValueError(f"beta_init must be a finite number > 0, got {beta_init!r}")
        # softplus⁻¹(b) = log(expm1(b)); for large b expm1 overflows, but there softplus⁻¹(b) ≈ b.
        raw = math.log(math.expm1(beta_init)) if beta_init < 30 else float(beta_init)
        # A 0-dim parameter, so that the output keeps the input's shape even for 0-dim inputs.
        self.raw_beta = nn.Parameter(torch.tensor(raw))

    @property
    def beta(self) -> torch.Tensor:
        """The current ``β = softplus(raw_beta)`` (differentiable, 0-dim)."""
        return F.softplus(self.raw_beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast β to the input's dtype: the result then keeps x's dtype in every case.
        beta = self.beta.to(x.dtype)
        return (x * torch.sigmoid(beta * x)).div_(1.1)  # in place on a fresh product, as Sin

    def extra_repr(self) -> str:
        return f"beta={self.beta.item():.4g}"


class ELU(nn.Module):
    r"""ELU with ``α = 1``: ``f(x) = x`` for ``x > 0``, ``exp(x) - 1`` otherwise.

    ``f'(x) = 1`` for ``x > 0`` and ``exp(x) ∈ (0, 1]`` otherwise, so ``0 < f' ≤ 1``.
    With ``α = 1`` both one-sided derivatives at 0 equal 1, so ``f`` is C^1 (not C^2: ``f''``
    jumps from 1 to 0 at 0). Another ``α`` would break C^1, and ``α > 1`` the Lipschitz bound,
    hence no ``alpha`` argument.

    Shapes:
        input: any shape ``(*)``; output: same shape and dtype.

    References:
        | Fast and Accurate Deep Network Learning by Exponential Linear Units (Clevert et al., 2016)
        | https://arxiv.org/abs/1511.07289
    """

    smooth = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, alpha=1.0)


class Softplus(nn.Module):
    r"""Softplus ``f(x) = log(1 + exp(x))``.

    ``f'(x) = sigmoid(x) ∈ (0, 1)``; the bound 1 is approached as ``x → ∞``. Smooth (C^∞;
    torch switches to ``f(x) = x`` above ``x = 20``, where the derivatives differ by ~2e-9).

    Shapes:
        input: any shape ``(*)``; output: same shape and dtype.

    References:
        | Incorporating Second-Order Functional Knowledge for Better Option Pricing
        | (Dugas et al., 2001)
    """

    smooth = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


class Tanh(nn.Module):
    r"""Hyperbolic tangent ``f(x) = tanh(x)``.

    ``f'(x) = 1 - tanh²(x) ∈ (0, 1]``, equal to 1 at ``x = 0``. Smooth (C^∞).

    Shapes:
        input: any shape ``(*)``; output: same shape and dtype.
    """

    smooth = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class Identity(nn.Module):
    r"""Identity ``f(x) = x`` (a linear network; useful for tests and baselines).

    ``f'(x) = 1``. Smooth (C^∞).

    Shapes:
        input: any shape ``(*)``; output: the input itself.
    """

    smooth = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


ACTIVATIONS = {
    "sin": Sin,
    "lipswish": LipSwish,
    "elu": ELU,
    "softplus": Softplus,
    "tanh": Tanh,
    "identity": Identity,
}


def make_activation(activation) -> nn.Module:
    """Builds an activation module from a name, a module class or a module.

    Args:
        activation: a key of :data:`ACTIVATIONS` (case-insensitive), an ``nn.Module`` instance
            (returned as is, so it is shared, not copied) or an ``nn.Module`` subclass
            (instantiated with no arguments).

    Returns:
        The activation module.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
        TypeError: for anything that is neither a string nor an ``nn.Module`` class or instance.
    """
    if isinstance(activation, str):
        cls = ACTIVATIONS.get(activation.lower())
        if cls is None:
            valid = ", ".join(repr(k) for k in ACTIVATIONS)
            raise ValueError(f"unknown activation {activation!r}; valid names: {valid}")
        return cls()
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise TypeError(
        "activation must be a name, an nn.Module subclass or an nn.Module instance, "
        f"got {type(activation).__name__}"
    )
