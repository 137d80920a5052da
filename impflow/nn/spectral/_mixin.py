"""What SpectralLinear and SpectralConv2d share: power-iteration state, σ, and the normalised
weight ``W / max(1, σ / coeff)``."""

from __future__ import annotations

import math

import torch
from torch import nn

from impflow._autocast import autocast_off
from impflow.nn.spectral._checks import _check_n_iterations, _check_tol

# Power-iteration steps run when u and v are first set up (at construction for SpectralLinear,
# at the first forward for SpectralConv2d), so that even a layer that is only ever evaluated
# starts from a converged estimate instead of random vectors (DESIGN.md §7: too few iterations
# leave σ > c). With a tolerance (atol / rtol) they stop early.
INIT_POWER_ITERATIONS = 200


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
        return self._stored_vector_sigma()

    def _stored_vector_sigma(self) -> torch.Tensor:
        # In float32 under autocast too: σ rounded down in bfloat16 would let Lip(g) reach 1.
        with autocast_off(self.weight.device.type):
            return self._sigma_from(self.u.clone(), self.v.clone())

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, σ / coeff)`` with ``σ`` from the stored vectors (no iteration).

        Returns:
            A tensor shaped as ``weight``, differentiable with respect to it.
        """
        self._require_ready()
        return self._stored_vector_weight()

    def _normalize_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        factor = torch.clamp(sigma / self.coeff, min=1.0)
        return self.weight / factor

    def _weight_for_forward(self) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                u, v, _ = self._iterate(self.n_power_iterations, self.atol, self.rtol)
                self.u.copy_(u)
                self.v.copy_(v)
        return self._stored_vector_weight()

    def _stored_vector_weight(self) -> torch.Tensor:
        # Inside a block call (impflow.nn._frozen.power_iteration_paused) the weights cannot
        # change, so the solver's evaluations (no graph) share one normalised weight. With a
        # graph each evaluation builds its own: an autograd.grad inside a forward may free a
        # shared one before the loss's backward needs it.
        cache = getattr(self, "_weight_cache", None)
        if torch.is_grad_enabled():
            cache = None
        key = torch.is_inference_mode_enabled()
        if cache is not None and key in cache:
            return cache[key]
        # σ is computed from copies, so that a later in-place update of the buffers (the next
        # training forward) cannot invalidate the graph of this one.
        weight = self._normalize_weight(self._stored_vector_sigma())
        if cache is not None:
            cache[key] = weight
        return weight

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
