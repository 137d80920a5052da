r"""The 2-D toy densities of the flow literature, as exact samplers.

Each name gives the distribution that the ``toy_data`` generator of FFJORD and Residual Flows
(which the ImpFlow code reuses) draws from: the same shapes, scales and noise levels, written
anew on torch's random number generator. One difference, on purpose: those generators split a
batch into equal parts per mixture component (rings, circles, moons, pinwheel, 2spirals) and
space angles evenly, so a batch is not i.i.d. and some return fewer points than asked for. Here
every sample picks its component and position independently, so ``sample_toy(name, n)``
returns ``n`` i.i.d. draws of the limiting distribution of those generators.

=============  ==============================================================================
name           distribution (before the noise, then the noise)
=============  ==============================================================================
checkerboard   uniform on the 8 squares of side 2 in ``[-4, 4]²`` whose cell indices
               ``⌊x/2⌋ + ⌊y/2⌋`` are even; no noise (density 1/32, entropy 5 bits)
8gaussians     centres ``4·(cos θ, sin θ)``, ``θ = kπ/4``, isotropic std 0.5, all divided by
               1.414 (centres at radius ≈ 2.83, std ≈ 0.354)
2spirals       arm ``n = 3π·√U``: ``(-n cos n + U₁/2, n sin n + U₂/2)`` or its negation, ``/3``,
               plus Gaussian noise of std 0.1
moons          scikit-learn's two moons (outer ``(cos t, sin t)``, inner
               ``(1 - cos t, 1/2 - sin t)``, ``t ~ U[0, π]``), Gaussian noise std 0.1, then
               ``·2 + (-1, -0.2)`` (noise std 0.2 in the result)
circles        radius 3 or 1.5, uniform angle, Gaussian noise std 0.24 (scikit-learn's circles,
               ``factor=0.5``, ``noise=0.08``, times 3)
pinwheel       5 arms: ``f = (N(1, 0.3²), N(0, 0.1²))`` rotated by
               ``2πk/5 + 0.25·exp(f₁)``, times 2
rings          radius 3, 2.25, 1.5 or 0.75, uniform angle, Gaussian noise std 0.08
swissroll      scikit-learn's swiss roll (``t ~ U[1.5π, 4.5π]``, ``(t cos t, t sin t)``, noise
               std 1 per coordinate), divided by 5
=============  ==============================================================================

**Checkerboard entropy.** The ImpFlow paper labels its checkerboard figure "Checkerboard data
(5.00 bits)", and its models "ResFlow, L = 8 (5.08 bits)", "ImpFlow, L = 4 (5.05 bits)". These
are negative log-likelihoods per sample, in bits, of the 2-D points (not per dimension): the
data density is ``1/32`` on its support (8 squares of area 4), so its differential entropy is
``-E[log₂ p(x)] = log₂ 32 = 5`` bits exactly, and a model's test NLL in bits is a cross entropy,
at least 5 (:func:`checkerboard_entropy`). Per dimension it would be 2.5 bits.

References:
    | FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models
    | (Grathwohl et al., 2019) https://arxiv.org/abs/1810.01367

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021) https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from impflow.data._random import as_generator

__all__ = [
    "TOY_DATASETS",
    "checkerboard_entropy",
    "checkerboard_log_prob",
    "sample_toy",
]

TOY_DATASETS = (
    "checkerboard",
    "8gaussians",
    "2spirals",
    "moons",
    "circles",
    "pinwheel",
    "rings",
    "swissroll",
)


# ---------------------------------------------------------------------------------------------
# One function per density: (n, generator) -> float64 tensor (n, 2). Every draw goes through
# `generator` (None: torch's default generator), so a seed fixes the output.


def _uniform(n, gen, *shape):
    return torch.rand(n, *shape, generator=gen, dtype=torch.float64)


def _normal(n, gen, *shape):
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64)


def _choice(n, gen, k):
    return torch.randint(0, k, (n,), generator=gen)


def _on_circle(radius: Tensor, angle: Tensor) -> Tensor:
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)


def _checkerboard(n, gen):
    x = _uniform(n, gen) * 4 - 2
    # y in [-2, -1) or [0, 1), shifted up by one on the columns where floor(x) is odd
    y = _uniform(n, gen) - 2 * _choice(n, gen, 2).double() + torch.floor(x).remainder(2)
    return torch.stack([x, y], dim=1) * 2


def _eight_gaussians(n, gen):
    angle = _choice(n, gen, 8).double() * (math.pi / 4)
    centres = _on_circle(torch.full_like(angle, 4.0), angle)
    return (centres + 0.5 * _normal(n, gen, 2)) / 1.414


def _two_spirals(n, gen):
    arm = torch.sqrt(_uniform(n, gen)) * (3 * math.pi)  # 540 degrees of turn
    point = torch.stack([-torch.cos(arm) * arm, torch.sin(arm) * arm], dim=1)
    point = point + 0.5 * _uniform(n, gen, 2)
    sign = 1 - 2 * _choice(n, gen, 2).double()  # the second spiral is the first negated
    return point * sign[:, None] / 3 + 0.1 * _normal(n, gen, 2)


def _moons(n, gen):
    t = _uniform(n, gen) * math.pi
    inner = _choice(n, gen, 2).bool()
    outer_pts = torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    inner_pts = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], dim=1)
    point = torch.where(inner[:, None], inner_pts, outer_pts) + 0.1 * _normal(n, gen, 2)
    return point * 2 + point.new_tensor([-1.0, -0.2])


def _circles(n, gen):
    radius = 3.0 - 1.5 * _choice(n, gen, 2).double()
    angle = _uniform(n, gen) * (2 * math.pi)
    return _on_circle(radius, angle) + 0.24 * _normal(n, gen, 2)


def _pinwheel(n, gen):
    arm = _choice(n, gen, 5).double()
    radial = 1 + 0.3 * _normal(n, gen)
    tangential = 0.1 * _normal(n, gen)
    angle = arm * (2 * math.pi / 5) + 0.25 * torch.exp(radial)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # the feature vector (radial, tangential) rotated clockwise by `angle`
    point = torch.stack([radial * cos + tangential * sin, tangential * cos - radial * sin], dim=1)
    return 2 * point


def _rings(n, gen):
    radius = 0.75 * (4 - _choice(n, gen, 4).double())
    angle = _uniform(n, gen) * (2 * math.pi)
    return _on_circle(radius, angle) + 0.08 * _normal(n, gen, 2)


def _swissroll(n, gen):
    t = 1.5 * math.pi * (1 + 2 * _uniform(n, gen))
    return (_on_circle(t, t) + _normal(n, gen, 2)) / 5


_SAMPLERS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "moons": _moons,
    "circles": _circles,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "swissroll": _swissroll,
}


def sample_toy(name: str, n: int, *, generator=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` i.i.d. points of the 2-D toy density ``name`` (see the module docstring).

    Args:
        name: one of :data:`TOY_DATASETS`.
        n: number of points, ``>= 0``.
        generator: where the randomness comes from: a CPU ``torch.Generator`` (advanced by
            the call), an int seed (a fresh generator seeded with it), or None for torch's
            default CPU generator (seeded by ``torch.manual_seed``). The same generator state
            or seed gives the same points.
        dtype: floating dtype of the result (the points are computed in float64).

    Returns:
        a CPU tensor of shape ``(n, 2)``.
    """
    if not isinstance(name, str) or name not in _SAMPLERS:
        raise ValueError(
            f"unknown toy dataset {name!r}; expected one of: {', '.join(TOY_DATASETS)}"
        )
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    gen = as_generator(generator)
    return _SAMPLERS[name](int(n), gen).to(dtype)


def checkerboard_entropy(base: float = 2.0) -> float:
    """Differential entropy of the checkerboard density, per 2-D sample: ``log(32)`` in the
    given logarithm base (``base=2``: 5 bits, the paper's "5.00 bits"; ``base=math.e``: nats).

    The density is uniform, ``1/32``, on 8 squares of area 4, so ``-E[log p(x)] = log 32``."""
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")
    return math.log(32) / math.log(base)


def checkerboard_log_prob(x: Tensor) -> Tensor:
    """Exact log-density (nats) of the checkerboard at points ``x`` of shape ``(..., 2)``:
    ``-log 32`` on its support, ``-inf`` elsewhere. Returns shape ``x.shape[:-1]``."""
    if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (..., 2), got {shape}")
    inside = ((x >= -4) & (x < 4)).all(dim=-1)
    cells = torch.floor(x / 2)
    on_square = (cells[..., 0] + cells[..., 1]).remainder(2) == 0
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    out = torch.full(x.shape[:-1], -math.inf, dtype=dtype, device=x.device)
    return out.masked_fill(inside & on_square, -math.log(32))
