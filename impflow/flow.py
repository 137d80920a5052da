"""A normalizing flow as a distribution: a base density pushed through an invertible
transform (DESIGN.md §1, §5).

References:
    | Normalizing Flows for Probabilistic Modeling and Inference (Papamakarios et al., 2021)
    | https://arxiv.org/abs/1912.02762

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from impflow.nn._flow_common import (
    call_inverse,
    check_flow_input,
    check_flow_tensor,
    check_flow_layer,
    check_layer_output,
    check_shape,
    output_shape_of,
    per_sample,
)

__all__ = ["Flow", "bits_per_dim"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def _check_sample_shape(sample_shape) -> torch.Size:
    return torch.Size(check_shape(sample_shape, "sample_shape", minimum=0))


def _can_rsample(dist) -> bool:
    return callable(getattr(dist, "rsample", None)) and bool(getattr(dist, "has_rsample", True))


class Flow(nn.Module):
    r"""The distribution of ``x = T⁻¹(z)`` for ``z ~ base``, where ``T`` is ``transform``.

    ``log_prob(x) = base.log_prob(z) + logdet`` with ``(z, logdet) = transform(x)``, and
    sampling draws ``z`` from the base and returns ``transform.inverse(z)``: ``sample`` and
    ``rsample`` with ``logdet=False`` (no log-determinant work, see
    :meth:`impflow.nn.SequentialFlow.inverse`), ``sample_and_log_prob`` and
    ``rsample_and_log_prob`` with it. ``transform``
    follows DESIGN.md §1 (``forward(x) -> (z, logdet)``, ``inverse(z) -> (x, logdet_inv)``), e.g.
    a :class:`impflow.nn.SequentialFlow` of blocks, or a :class:`impflow.nn.MultiScale`.

    It behaves like a ``torch.distributions.Distribution`` with ``batch_shape = ()``:
    ``event_shape``, ``log_prob``, ``sample``, ``rsample``, ``sample_and_log_prob``. Inputs
    and outputs carry leading sample dimensions: ``log_prob`` takes ``(*S, *event_shape)`` and
    returns ``(*S,)``; ``sample(S)`` returns ``(*S, *event_shape)``. It is also an
    ``nn.Module``: ``forward(x)`` is ``log_prob(x)`` (so wrappers such as
    ``DistributedDataParallel`` call it), and ``state_dict`` holds the transform, a module base,
    and the event and latent shapes.

    **Base.** ``None``: the standard normal over the latent's per-sample shape; its samples
    take the device and dtype of the transform's first floating-point parameter or buffer
    (of this module when the transform has none). Otherwise either an object with
    ``log_prob(z)`` (one value per sample) and ``sample`` / ``rsample(sample_shape)``, such as a
    ``torch.distributions.Distribution`` with ``batch_shape = ()`` (wrap elementwise ones in
    ``Independent``) or an ``nn.Module``; or a callable (e.g. an ``nn.Module``) that returns
    such a distribution when called with no argument, so that its parameters are registered,
    saved and moved with this module. A ``Distribution`` object itself is neither saved nor
    moved by ``.to()``: build it on the right device.

    **Shapes.** ``event_shape`` (per-sample data shape) is taken from the ``event_shape``
    argument, else the transform's ``input_shape`` attribute (as on ``MultiScale``), else from
    the first ``log_prob`` input; the latent shape from the transform's ``output_shape`` (layers
    without one keep the shape), else from the first ``log_prob``. The default base cannot
    sample before the latent shape is known.

    Args:
        transform: the flow layer ``T`` (data to latent).
        base: the latent distribution, see above (default: standard normal).
        event_shape: per-sample data shape, optional.

    Example:
        >>> flow = Flow(SequentialFlow(ActNorm(2), ResidualBlock(LipschitzMLP([2, 64, 2]))))
        >>> loss = -flow.log_prob(x).mean()       # x: (B, 2)
        >>> x_new = flow.sample((100,))           # (100, 2)

    References:
        | Normalizing Flows for Probabilistic Modeling and Inference (Papamakarios et al., 2021)
        | https://arxiv.org/abs/1912.02762
    """

    batch_shape = torch.Size()

    def __init__(self, transform: nn.Module, base=None, event_shape=None):
        super().__init__()
        self.transform = check_flow_layer(transform, "transform")
        if base is None:
            self._base_kind = "normal"
        elif callable(getattr(base, "log_prob", None)) and callable(getattr(base, "sample", None)):
            self._base_kind = "direct"
            if isinstance(base, Distribution) and base.batch_shape != torch.Size():
                raise ValueError(
                    f"base must have batch_shape () (one distribution over the latent), got "
                    f"batch_shape {tuple(base.batch_shape)}; wrap an elementwise distribution "
                    "in torch.distributions.Independent(base, reinterpreted_batch_ndims)"
                )
        elif callable(base):
            self._base_kind = "lazy"
        else:
            raise TypeError(
                "base must be None, a distribution (with log_prob and sample) or a callable "
                f"returning one, got {type(base).__name__}"
            )
        self.base = base
        # Follows .to(device / dtype) when the transform has no floating tensor to follow.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._event_shape = self._latent_shape = None
        if event_shape is None:
            event_shape = getattr(transform, "input_shape", None)
        if event_shape is not None:
            self._set_event_shape(check_shape(event_shape, "event_shape"))
            try:
                self._set_latent_shape(output_shape_of(transform, self._event_shape))
            except ValueError as err:
                raise ValueError(
                    f"transform does not take event_shape={self._event_shape}: {err}"
                ) from None
        if isinstance(base, Distribution):
            self._set_latent_shape(tuple(base.event_shape), "base.event_shape")

    # ----------------------------------------------------------------------------------------
    # Shapes

    @property
    def event_shape(self) -> torch.Size | None:
        """Per-sample data shape (None until known)."""
        return None if self._event_shape is None else torch.Size(self._event_shape)

    @property
    def latent_shape(self) -> torch.Size | None:
        """Per-sample latent shape (None until known)."""
        return None if self._latent_shape is None else torch.Size(self._latent_shape)

    def _set_event_shape(self, shape, source: str = "x") -> None:
        shape = tuple(shape)
        if self._event_shape is not None and shape != self._event_shape:
            raise ValueError(
                f"Flow: {source} implies event shape {shape}, but this flow's event_shape is "
                f"{self._event_shape}"
            )
        self._event_shape = shape

    def _set_latent_shape(self, shape, source: str = "the transform's output") -> None:
        shape = tuple(shape)
        if self._latent_shape is not None and shape != self._latent_shape:
            raise ValueError(
                f"Flow: {source} has per-sample shape {shape}, but this flow's latent shape is "
                f"{self._latent_shape}"
            )
        self._latent_shape = shape

    def get_extra_state(self):
        return {"event_shape": self._event_shape, "latent_shape": self._latent_shape}

    def set_extra_state(self, state) -> None:
        if state.get("event_shape") is not None:
            self._set_event_shape(state["event_shape"], "the loaded state")
        if state.get("latent_shape") is not None:
            self._set_latent_shape(state["latent_shape"], "the loaded state's latent")

    # ----------------------------------------------------------------------------------------
    # Base distribution

    def _base_distribution(self):
        if self._base_kind == "lazy":
            dist = self.base()
            if not callable(getattr(dist, "log_prob", None)):
                raise TypeError(
                    f"base() must return a distribution with log_prob, got {type(dist).__name__}"
                )
            return dist
        return self.base

    @property
    def has_rsample(self) -> bool:
        """Whether :meth:`rsample` works: the base draws reparametrised samples."""
        return self._base_kind == "normal" or _can_rsample(self._base_distribution())

    def _sample_device_dtype(self):
        for t in itertools.chain(self.transform.parameters(), self.transform.buffers()):
            if t.is_floating_point():
                return t.device, t.dtype
        return self._anchor.device, self._anchor.dtype

    def _base_log_prob(self, z: Tensor) -> Tensor:
        if self._base_kind == "normal":
            return -per_sample(0.5 * z.square() + _HALF_LOG_TWO_PI).sum(1)
        log_prob = self._base_distribution().log_prob(z)
        if not isinstance(log_prob, Tensor) or log_prob.shape != (z.shape[0],):
            shape = tuple(log_prob.shape) if isinstance(log_prob, Tensor) else log_prob
            raise ValueError(
                f"base.log_prob(z) must return one value per sample, shape ({z.shape[0]},), for "
                f"z of shape {tuple(z.shape)}, got {shape}; wrap an elementwise distribution "
                "in torch.distributions.Independent"
            )
        return log_prob

    def _base_sample(self, n: int, reparametrized: bool) -> Tensor:
        if self._base_kind == "normal":
            if self._latent_shape is None:
                raise RuntimeError(
                    "Flow: the latent shape is not known yet, so the standard normal base cannot "
                    "sample; pass event_shape=... to Flow, or call log_prob on data first"
                )
            device, dtype = self._sample_device_dtype()
            return torch.randn((n, *self._latent_shape), device=device, dtype=dtype)
        dist = self._base_distribution()
        if reparametrized:
            if not _can_rsample(dist):
                raise NotImplementedError(
                    f"base ({type(dist).__name__}) has no rsample: use sample() instead"
                )
            z = dist.rsample(torch.Size([n]))
        else:
            z = dist.sample(torch.Size([n]))
        if not isinstance(z, Tensor) or z.dim() == 0 or z.shape[0] != n:
            raise ValueError(
                f"base.sample(({n},)) must return a tensor of shape ({n}, *latent_shape), got "
                f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}"
            )
        self._set_latent_shape(z.shape[1:], "base.sample")
        return z

    # ----------------------------------------------------------------------------------------
    # Density and sampling

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of ``x`` of shape ``(*S, *event_shape)``; returns ``(*S,)``.

        With no event shape known yet, ``x`` is read as ``(B, *event_shape)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"Flow.log_prob: x must be a torch.Tensor, got {type(x).__name__}")
        if self._event_shape is None:
            check_flow_tensor(x, "x", "Flow.log_prob")
            sample_shape, event = x.shape[:1], tuple(x.shape[1:])
        else:
            event, k = self._event_shape, len(self._event_shape)
            if x.dim() < k or tuple(x.shape[x.dim() - k :]) != event:
                raise ValueError(
                    f"Flow.log_prob: x must have shape (*sample_shape, *event_shape) with "
                    f"event_shape={event}, got {tuple(x.shape)}"
                )
            sample_shape = x.shape[: x.dim() - k]
        batch = x.reshape(math.prod(sample_shape), *event)
        check_flow_input(batch, "x", "Flow.log_prob")
        z, logdet = check_layer_output(
            self.transform(batch), batch.shape[0], "Flow: transform.forward"
        )
        self._set_event_shape(event)
        self._set_latent_shape(z.shape[1:])
        return (self._base_log_prob(z) + logdet).reshape(sample_shape)

    def forward(self, x: Tensor) -> Tensor:
        """``log_prob(x)``."""
        return self.log_prob(x)

    def _draw(
        self, sample_shape, reparametrized: bool, with_log_prob: bool
    ) -> tuple[Tensor, Tensor | None]:
        shape = _check_sample_shape(sample_shape)
        n = math.prod(shape)
        z = self._base_sample(n, reparametrized)
        x, logdet_inv = call_inverse(self.transform, z, with_log_prob, "Flow: transform.inverse")
        self._set_event_shape(x.shape[1:], "transform.inverse")
        x = x.reshape(*shape, *x.shape[1:])
        if not with_log_prob:
            return x, None
        # log p(x) = log p(z) + log|det ∂z/∂x| = log p(z) - log|det ∂x/∂z|
        return x, (self._base_log_prob(z) - logdet_inv).reshape(shape)

    def rsample_and_log_prob(self, sample_shape=()) -> tuple[Tensor, Tensor]:
        """``(x, log_prob(x))`` for ``x`` of shape ``(*sample_shape, *event_shape)``, with
        gradients through the base sample (reparametrised) and the transform's inverse."""
        return self._draw(sample_shape, reparametrized=True, with_log_prob=True)

    def sample_and_log_prob(self, sample_shape=()) -> tuple[Tensor, Tensor]:
        """:meth:`rsample_and_log_prob` without gradients (like ``Distribution.sample``)."""
        with torch.no_grad():
            return self._draw(sample_shape, reparametrized=False, with_log_prob=True)

    def rsample(self, sample_shape=()) -> Tensor:
        """Samples ``(*sample_shape, *event_shape)`` with gradients (reparametrised).

        Computes no log-determinant: the transform is inverted with ``logdet=False`` (layers
        whose ``inverse`` has no such parameter run their full inverse). The samples are those
        of :meth:`rsample_and_log_prob` for the same random state."""
        return self._draw(sample_shape, reparametrized=True, with_log_prob=False)[0]

    def sample(self, sample_shape=()) -> Tensor:
        """Samples ``(*sample_shape, *event_shape)`` without gradients; no log-determinant is
        computed (as in :meth:`rsample`)."""
        with torch.no_grad():
            return self._draw(sample_shape, reparametrized=False, with_log_prob=False)[0]

    def extra_repr(self) -> str:
        base = "standard normal" if self._base_kind == "normal" else None
        return f"event_shape={self._event_shape}" + (f", base={base}" if base else "")


def bits_per_dim(log_prob: Tensor, n_dims: int, n_bins: int | None = None) -> Tensor:
    r"""Negative log-likelihood in bits per dimension, ``-log_prob / (n_dims · ln 2)``.

    With ``n_bins``, ``log_prob`` is read as a density of data in ``[0, 1]`` dequantised from
    ``n_bins`` levels (``x = (k + u) / n_bins``, ``u ~ U[0, 1)``), and ``log2(n_bins)`` is added:
    the bound on the discrete log-likelihood that image flows report (e.g. ``n_bins=256``).

    Args:
        log_prob: log-densities, any shape.
        n_dims: dimensions per sample (e.g. ``C·H·W``).
        n_bins: quantisation levels of the data, or None.

    Returns:
        a tensor of ``log_prob``'s shape.
    """
    if isinstance(n_dims, bool) or not isinstance(n_dims, numbers.Integral) or n_dims < 1:
        raise ValueError(f"n_dims must be a positive int, got {n_dims!r}")
    bpd = -log_prob / (n_dims * math.log(2))
    if n_bins is not None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 2:
            raise ValueError(f"n_bins must be None or an int >= 2, got {n_bins!r}")
        bpd = bpd + math.log2(n_bins)
    return bpd
