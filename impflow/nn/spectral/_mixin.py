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

# An eval-mode forward first refreshes u and v where they may be stale: when the weight
# changed since they were last refreshed on it (by power_iteration, update_lipschitz or a
# refresh; then an optimizer step, load_state_dict or an EMA update), or after a
# training-mode forward. It iterates them on the weight, at most REFRESH_POWER_ITERATIONS
# steps, stopping once they change by less than REFRESH_RTOL (relative, ResFlow's test).
# Without it, σ of older weights normalises the new ones: a trained flow's log_prob was off
# by up to 0.48 nats per sample, and Lip(g) could exceed coeff. Vectors already converged for
# the weight (a single step moves them by less than that) are kept as they are, bit for bit,
# so that a loaded model evaluates exactly as the one that was saved.
REFRESH_POWER_ITERATIONS = 200
REFRESH_RTOL = 1e-6


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

        It counts as a refresh: eval-mode forwards use the vectors it stores until the weight
        changes or a training-mode forward runs (see :class:`SpectralLinear`).

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
        self._mark_vectors_current()
        return steps

    def _mark_vectors_current(self):
        """Records that ``u`` and ``v`` were refreshed on the weight as it is now."""
        self._vectors_version = _version_of(self.weight)

    def _vectors_stale(self) -> bool:
        """Whether the weight changed (in place or replaced) since ``u``, ``v`` were refreshed
        on it. Unknown counts as changed."""
        version = getattr(self, "_vectors_version", None)
        return version is None or version != _version_of(self.weight)

    @torch.no_grad()
    def _refresh_vectors(self):
        """Iterates ``u``, ``v`` on the current weight until they settle (see
        REFRESH_POWER_ITERATIONS); keeps them as they are if one step barely moves them."""
        u, v, steps = self._iterate(REFRESH_POWER_ITERATIONS, None, REFRESH_RTOL)
        if steps > 1:
            self.u.copy_(u)
            self.v.copy_(v)
        self._mark_vectors_current()

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
            # A few steps are not a refresh: the next eval-mode forward checks (a model saved
            # now and loaded evaluates as this one then, bit for bit).
            self._vectors_version = None
        elif (
            not getattr(self, "_training_paused", False)
            and not torch.compiler.is_compiling()
            and self._vectors_stale()
        ):
            # (A compiled eval-mode graph does not refresh: call update_lipschitz first.)
            self._refresh_vectors()
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


def _version_of(weight: torch.Tensor):
    """The weight's identity, memory and version counter: one of them changes with every
    in-place update and with replaced data (``module.to()`` keeps the parameter object and
    its version, ``load_state_dict(assign=True)`` replaces the object)."""
    try:
        return (id(weight), weight.data_ptr(), weight._version)
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _reset_like_torch(weight: nn.Parameter, bias: nn.Parameter | None):
    # The initialisation of nn.Linear / nn.Conv2d.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)
