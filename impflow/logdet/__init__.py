"""Estimators of ``log det(I + J_g(x))`` per sample (DESIGN.md §1).

- :func:`exact_logdet`: per-sample Jacobian + ``slogdet`` (small per-sample dimension; closed
  form for ``d ≤ 2``). The Jacobian (:func:`batch_jacobian`, :func:`value_and_jacobian`) comes
  from :mod:`impflow.logdet.jacobian`: ``d`` autograd products unless an implementation is
  registered for the type of ``g`` (:class:`impflow.nn.LipschitzMLP`: one forward-mode pass,
  :mod:`impflow.logdet.mlp_jacobian`).
- :func:`power_series_logdet`: exact-trace truncated power series (tests, small dimension).
- :func:`roulette_logdet` / :class:`RouletteLogdet`: unbiased Russian roulette with Hutchinson
  probes, optional Neumann-series gradient (``backward_in_forward=True``: taken in the forward
  pass, graph freed, correct for any loss); statistics of the last draw in :class:`LogdetStats`.

All vector-Jacobian products ``vᵀJ^k`` of the series estimators come from
:mod:`impflow.logdet.products` (autograd unless a fused implementation is registered for the
type of ``g``: :class:`impflow.nn.LipschitzMLP` uses the fused op
:func:`impflow.ops.mlp_vjp_series`). :func:`autograd_products` forces autograd for the products
and the Jacobians alike.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from impflow.logdet._common import SeriesDivergenceError, SeriesDivergenceWarning
from impflow.logdet.exact import (
    batch_jacobian,
    exact_logdet,
    power_series_logdet,
    value_and_jacobian,
)
from impflow.logdet.jacobian import autograd_jacobian, get_jacobian, register_jacobian
from impflow.logdet.products import (
    VJPSeries,
    autograd_products,
    autograd_vjp_powers,
    autograd_vjp_series,
    forward_recording,
    get_vjp_powers,
    get_vjp_series,
    register_vjp_powers,
)
from impflow.logdet.roulette import (
    LogdetStats,
    RouletteLogdet,
    roulette_logdet,
    tail_probability,
)

# Last: they import impflow.nn, whose blocks import the estimators above.
from impflow.logdet import fused_mlp  # noqa: E402, F401  (registers the fused op for LipschitzMLP)
from impflow.logdet import mlp_jacobian  # noqa: E402, F401  (registers its forward-mode Jacobian)

__all__ = [
    "LogdetStats",
    "VJPSeries",
    "RouletteLogdet",
    "SeriesDivergenceError",
    "SeriesDivergenceWarning",
    "autograd_jacobian",
    "autograd_products",
    "autograd_vjp_powers",
    "autograd_vjp_series",
    "batch_jacobian",
    "exact_logdet",
    "forward_recording",
    "get_jacobian",
    "get_vjp_powers",
    "get_vjp_series",
    "power_series_logdet",
    "register_jacobian",
    "register_vjp_powers",
    "roulette_logdet",
    "tail_probability",
    "value_and_jacobian",
]
