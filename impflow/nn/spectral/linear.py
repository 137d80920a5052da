"""SpectralLinear: a linear layer whose weight has spectral norm at most ``coeff``.

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

from impflow.nn.spectral._checks import _check_coeff, _check_n_iterations, _check_size, _check_tol
from impflow.nn.spectral._mixin import INIT_POWER_ITERATIONS, _reset_like_torch, _SpectralNormMixin
from impflow.nn.spectral.power import _normalize, power_iteration_dense

__all__ = ["SpectralLinear"]


class SpectralLinear(_SpectralNormMixin, nn.Module):
    r"""A linear layer ``y = x Ŵᵀ + b`` with ``Ŵ = W / max(1, σ(W) / coeff)``.

    ``σ(W)`` is estimated by power iteration with unit vectors ``u`` (out,) and ``v`` (in,)
    kept as buffers. In training mode each forward first runs ``n_power_iterations`` steps
    ``v ← normalize(Wᵀu), u ← normalize(Wv)`` without gradient and stores ``u`` and ``v``; then
    ``σ = uᵀWv`` is computed with gradient through ``W`` (as in ResFlow). In eval mode ``σ``
    comes from the stored vectors, refreshed first where they may be stale: the first eval-mode
    forward after a training-mode forward or after any change of the weight (an optimizer step,
    ``load_state_dict``, ``.to()``, an in-place edit) iterates them on the current weight until
    a step moves them by less than ``REFRESH_RTOL`` (1e-6, at most
    ``REFRESH_POWER_ITERATIONS`` steps; vectors that one step barely moves are kept bit for
    bit). Power iteration approaches ``σ`` from below, and an unconverged estimate leaves
    ``‖Ŵ‖ > coeff``: so no eval-mode forward uses σ of an older weight. :meth:`power_iteration`
    and :func:`update_lipschitz` count as a refresh (run them to choose the steps yourself, and
    before compiling an eval-mode model: a compiled graph does not refresh).
    ``INIT_POWER_ITERATIONS`` steps run at construction.

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
