r"""Unbiased Russian-roulette estimator of ``log det(I + J_g(x))`` with Hutchinson probes, and
the Neumann-series gradient estimator.

For ``N`` drawn from a distribution on the non-negative integers with ``P(N ≥ j) > 0`` for all
``j``, ``n = n_exact_terms + N`` and a probe ``v`` with ``E[v vᵀ] = I``,

.. math::
    \widehat{\log\det} = \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\, c_k\, v^\top J^k v,
    \qquad c_k = \begin{cases} 1 & k \le n_{exact} \\ 1/P(N \ge k - n_{exact}) & k > n_{exact}
    \end{cases}

is unbiased when the series converges absolutely (``Lip(g) < 1``). The Neumann gradient
estimator differentiates instead the surrogate ``wᵀ J v`` with the constant (no-graph)
``w = Σ_{k=0}^{n} (-1)^k c_k (vᵀJ^k)``, whose gradient is an unbiased estimate of
``∇ log det(I + J) = tr((I + J)^{-1} ∇J)``: only one product keeps a graph, so memory does not
grow with ``n``.

With ``backward_in_forward=True`` that gradient is moreover taken during the forward pass and
the graph of ``g`` freed at once (:mod:`impflow.logdet.backward_in_forward`): correct for any
loss, not only a sum or mean of the log-dets.

Conventions follow ResFlow: geometric ``N ≥ 1`` with ``P(N ≥ k) = (1 - p)^{k-1}``
(``numpy.random.geometric``); Poisson ``N ≥ 0`` with rate ``λ``. One ``N`` per call, shared by
the batch (and by the ``n_samples`` probes); each sample has its own probes.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Implicit Normalizing Flows (Lu et al., 2021)
    | https://arxiv.org/abs/2103.09527
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from impflow.logdet import backward_in_forward as bif
from impflow.logdet._common import (
    check_input,
    check_nonneg_int,
    check_on_divergence,
    check_pos_int,
    module_needs_graph,
    prepare,
    report_divergence,
    resolve_create_graph,
)
from impflow.logdet._module_state import StateSnapshot, parameter_aliases, trainable_parameters
from impflow.logdet.products import forward_recording, get_vjp_powers, get_vjp_series

__all__ = ["LogdetStats", "RouletteLogdet", "roulette_logdet"]

DISTRIBUTIONS = ("geometric", "poisson")
PROBES = ("rademacher", "gaussian")

# A product norm may grow by this factor over one step before the series is declared
# divergent (rounding slack; a contractive g shrinks every product norm).
_GROWTH_SLACK = 1e-6


@dataclass(frozen=True)
class LogdetStats:
    """Statistics of one estimator call (the last draw).

    Attributes:
        n_terms: series terms (products ``vᵀJ^k``) used, ``n_exact_terms + n_extra``.
        n_exact_terms: terms always computed.
        n_extra: the drawn roulette count ``N``.
        n_samples: probes per sample.
        mean: mean of the estimate over the batch.
        second_moment: mean of its square over the batch.
        growth: largest per-sample ratio ``‖vᵀJ^n‖ / ‖vᵀJ^{n-1}‖`` at the last step (< 1 for a
            contractive ``g``; ``nan`` when no product was computed, ``inf`` when one is not
            finite).
        term_means: batch mean of each weighted term ``(-1)^{k+1} c_k vᵀJ^k v / k``.
        diverged: the series was measured to diverge (a growing or non-finite product, or a
            non-finite estimate): the estimate is garbage. Only seen with
            ``on_divergence="warn"``; ``"raise"`` raises instead.
    """

    n_terms: int
    n_exact_terms: int
    n_extra: int
    n_samples: int
    mean: float
    second_moment: float
    growth: float
    term_means: tuple
    diverged: bool = False

    @property
    def variance(self) -> float:
        """Batch variance of the estimate (population form)."""
        return max(self.second_moment - self.mean**2, 0.0)


def _check_distribution(distribution, p, lam) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < float(p) < 1.0:
        raise ValueError(f"p must be a number in (0, 1), got {p!r}")
    if (
        isinstance(lam, bool)
        or not isinstance(lam, numbers.Real)
        or not math.isfinite(float(lam))
        or float(lam) <= 0.0
    ):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")


def _check_probe(probe) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")


def tail_probability(j: int, distribution: str, p: float = 0.5, lam: float = 2.0) -> float:
    """``P(N ≥ j)`` for the roulette count ``N`` (``1`` for ``j ≤ 0``)."""
    if j <= 0:
        return 1.0
    if distribution == "geometric":
        return (1.0 - p) ** (j - 1)
    if distribution == "poisson":
        # P(N ≥ j) = P(Gamma(j, 1) ≤ λ): the regularised lower incomplete gamma, no cancellation.
        return float(
            torch.special.gammainc(
                torch.tensor(float(j), dtype=torch.float64),
                torch.tensor(float(lam), dtype=torch.float64),
            )
        )
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def _sample_count(distribution: str, p: float, lam: float, generator) -> int:
    device = generator.device if generator is not None else torch.device("cpu")
    if distribution == "geometric":
        u = 1.0 - float(torch.rand((), dtype=torch.float64, device=device, generator=generator))
        # u in (0, 1]: P(floor(log u / log(1-p)) + 1 ≥ k) = P(u ≤ (1-p)^(k-1)) = (1-p)^(k-1).
        return math.floor(math.log(u) / math.log1p(-p)) + 1
    rate = torch.tensor(float(lam), dtype=torch.float64, device=device)
    return int(torch.poisson(rate, generator=generator))


def _probe(x: Tensor, probe: str, generator) -> Tensor:
    if probe == "rademacher":
        bits = torch.randint(0, 2, x.shape, device=x.device, generator=generator)
        return bits.to(x.dtype) * 2 - 1
    return torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1)


def _check_flags(neumann_grad, backward_in_forward) -> None:
    if not isinstance(neumann_grad, bool):
        raise TypeError(f"neumann_grad must be a bool, got {neumann_grad!r}")
    if not isinstance(backward_in_forward, bool):
        raise TypeError(f"backward_in_forward must be a bool, got {backward_in_forward!r}")
    if backward_in_forward and not neumann_grad:
        raise ValueError(
            "backward_in_forward=True takes the Neumann-series gradient in the forward pass: "
            "it needs neumann_grad=True"
        )


def _measure(v: Tensor, ws: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per sample: whether every product is finite, and ``‖vᵀJ^n‖ / ‖vᵀJ^{n-1}‖`` (0 when the
    previous norm is 0, ``None`` without products). ``ws``: the products stacked, (n, *v.shape)."""
    with torch.no_grad():
        norms = torch.cat([v.flatten(1).norm(dim=1)[None], ws.detach().flatten(2).norm(dim=2)])
        finite = torch.isfinite(norms).all(0)
        if len(ws) == 0:
            return finite, None
        prev, last = norms[-2], norms[-1]
        ratio = torch.where(prev > 0, last / prev.clamp(min=1e-300), torch.zeros_like(last))
        return finite, ratio


def _divergence_message(n_nonfinite: int, n_growing: int, growth: float, n: int, b: int):
    """Why the series is untrustworthy, or ``None``."""
    if n_nonfinite:
        return (
            f"the log-det series diverges: a vector-Jacobian product vᵀJ^k (k ≤ {n}) is not "
            f"finite for {n_nonfinite} of {b} sample(s): g is not contractive there "
            f"(Lip(g) < 1 is required) or g(x) is not finite"
        )
    if n_growing:
        return (
            f"the log-det series diverges: ‖vᵀJ^{n}‖ / ‖vᵀJ^{n - 1}‖ = {growth:.4g} > 1 (growth "
            f"factor per term) for {n_growing} of {b} sample(s), so Lip(g) ≥ 1 there (a "
            f"contractive g is required); run more power iterations or lower the "
            f"spectral-norm coefficient"
        )
    return None


def roulette_logdet(
    g,
    x: Tensor,
    *,
    n_exact_terms: int = 2,
    distribution: str = "geometric",
    p: float = 0.5,
    lam: float = 2.0,
    n_samples: int = 1,
    probe: str = "rademacher",
    neumann_grad: bool = False,
    backward_in_forward: bool = False,
    generator: torch.Generator | None = None,
    create_graph: bool | None = None,
    on_divergence: str = "raise",
    return_stats: bool = False,
):
    """Unbiased Russian-roulette + Hutchinson estimate of ``log det(I + J_g(x))`` per sample.

    Args:
        g: callable or ``nn.Module`` mapping ``(B, ...)`` to the same shape, samples independent,
            with ``Lip(g) < 1``.
        x: ``(B, ...)`` floating-point tensor, finite.
        n_exact_terms: terms always computed (paper: 2 in training, 20 at evaluation).
        distribution: ``"geometric"`` (parameter ``p`` in (0, 1), ``N ≥ 1``) or ``"poisson"``
            (rate ``lam > 0``, ``N ≥ 0``) for the extra terms.
        n_samples: Hutchinson probes per sample, averaged (one ``N`` for all).
        probe: ``"rademacher"`` or ``"gaussian"``.
        neumann_grad: when building a graph, return ``value + (s - s.detach())`` with the series
            ``value`` computed without graph and ``s`` the Neumann surrogate: the same number,
            the Neumann-series gradient, memory independent of the number of terms.
        backward_in_forward: with ``neumann_grad=True`` (required) and a graph to build, take
            the Neumann gradient during this call and free the graph of ``g`` at once
            (:mod:`impflow.logdet.backward_in_forward`). Memory saved: the graph of one
            evaluation of ``g`` and of one product with its double-backward buffers, otherwise
            held until the backward pass. Kept instead: the per-sample gradient with respect
            to ``x``, one gradient per parameter of ``g``, the probes and Neumann vectors
            (``2·n_samples`` tensors shaped as ``x``), a copy of ``g``'s buffers and the random
            state. Exact for any loss: when ``∂L/∂logdet`` is the same for every sample (a sum
            or mean) the stored gradients are scaled; otherwise the backward pass re-evaluates
            ``g(x)`` and one product, as the forward did (same buffers, random state, probes
            and ``N``). ``g`` must hold every trainable tensor it uses as a parameter
            (``ValueError`` otherwise); double backward raises ``RuntimeError``. Only
            gradients change: the value is the same number.
        generator: ``torch.Generator`` for ``N`` and the probes (device of ``x`` for the probes).
        create_graph: build a differentiable result; ``None``: whenever grad mode is on
            (training). Without a graph the products are plain (cheaper) products, and
            ``neumann_grad`` / ``backward_in_forward`` do nothing.
        on_divergence: what to do when the series is measured to diverge: a product
            ``vᵀJ^k`` or the estimate is not finite, or, for some sample, the product norm
            grew over the last step (``‖vᵀJ^n‖ > ‖vᵀJ^{n-1}‖``, impossible for a contractive
            ``g``). ``"raise"`` (default): :class:`SeriesDivergenceError`, before any gradient
            work; training stops at the first bad step instead of optimising garbage (or NaN,
            which would spoil the parameters for good). ``"warn"``: a
            :class:`SeriesDivergenceWarning` naming the growth factor, and the estimate is
            returned as computed (possibly NaN) with ``stats.diverged = True``, e.g. to skip
            the step.
        return_stats: also return a :class:`LogdetStats`.

    Returns:
        ``(B,)`` estimate, or ``(estimate, stats)``.

    Raises:
        SeriesDivergenceError: see ``on_divergence``.
        ValueError, TypeError: bad arguments, ``x`` not finite, ``g(x)`` of another shape.
    """
    n_exact_terms = check_nonneg_int(n_exact_terms, "n_exact_terms")
    n_samples = check_pos_int(n_samples, "n_samples")
    _check_distribution(distribution, p, lam)
    _check_probe(probe)
    on_divergence = check_on_divergence(on_divergence)
    _check_flags(neumann_grad, backward_in_forward)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
    p, lam = float(p), float(lam)
    check_input(x)
    create_graph = resolve_create_graph(create_graph) and module_needs_graph(g, x)
    use_neumann = neumann_grad and create_graph
    use_bif = backward_in_forward and create_graph
    params = trainable_parameters(g) if use_bif else []
    # Backward-in-forward differentiates g on private aliases of its parameters (no user hook
    # fires) and on a detached leaf of x.
    aliasing = parameter_aliases(g, params) if use_bif else contextlib.nullcontext([])

    with torch.enable_grad(), aliasing as aliases, forward_recording(g):
        snapshot = StateSnapshot(g, x.device) if use_bif else None  # before g runs
        x_in, gx = prepare(g, x, detach=use_bif, check_x=False)
        n_extra = _sample_count(distribution, p, lam, generator)
        n = n_exact_terms + n_extra
        coeffs = [
            1.0 / tail_probability(k - n_exact_terms, distribution, p, lam) for k in range(n + 1)
        ]
        # Weight of vᵀJ^k v in the estimate, and of vᵀJ^k in the Neumann vector, k = 1..n.
        term_weights = x.new_tensor([(-1) ** (k + 1) / k * coeffs[k] for k in range(1, n + 1)])
        neumann_weights = x.new_tensor([(-1) ** k * coeffs[k] for k in range(1, n + 1)])
        vjp_series = get_vjp_series(g)
        vjp_powers = get_vjp_powers(g)

        total = None
        term_sums = torch.zeros(n, dtype=torch.float64)
        growth = float("nan")
        n_nonfinite = n_growing = 0
        pairs = []
        for _ in range(n_samples):
            v = _probe(x, probe, generator)
            if n >= 1:
                res = vjp_series(
                    g, x_in, gx, v, n, term_weights, create_graph=create_graph and not use_neumann
                )
                ws, value = res.products, res.series
                term_sums += (term_weights[:, None] * res.traces.detach()).mean(1).double().cpu()
            else:
                ws = x.new_zeros((0, *x.shape))
                value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
            if use_neumann:
                value = value.detach()
                shape = (n,) + (1,) * x.dim()
                neumann_w = (v + (neumann_weights.reshape(shape) * ws).sum(0)).detach()
                if use_bif:
                    pairs.append((v, neumann_w))
                else:
                    (jw,) = vjp_powers(g, x_in, gx, neumann_w, 1, create_graph=True)
                    surrogate = _dot(jw, v)
                    value = value + (surrogate - surrogate.detach())
            total = value if total is None else total + value

            finite, ratio = _measure(v, ws)
            n_nonfinite = max(n_nonfinite, int((~finite).sum()))
            if ratio is not None:
                ratio = torch.where(finite, ratio, torch.zeros_like(ratio))
                r = float(ratio.max())
                growth = r if math.isnan(growth) else max(growth, r)
                n_growing = max(n_growing, int((ratio > 1.0 + _GROWTH_SLACK).sum()))
        estimate = total / n_samples if n_samples > 1 else total
        if n_nonfinite:
            growth = math.inf

        message = _divergence_message(n_nonfinite, n_growing, growth, n, x.shape[0])
        n_bad_estimate = int((~torch.isfinite(estimate.detach())).sum())
        if message is None and n_bad_estimate:
            message = f"the log-det estimate is not finite for {n_bad_estimate} sample(s)"
        if message is not None:
            if on_divergence == "warn":
                message += (
                    "; the estimate is returned flagged (LogdetStats.diverged) and must not be "
                    "trusted"
                )
            report_divergence(message, on_divergence)

        if use_bif:
            estimate = bif.attach(
                g, vjp_powers, x, x_in, gx, params, aliases, estimate, pairs, snapshot
            )
    if not create_graph:
        estimate = estimate.detach()
    if not return_stats:
        return estimate
    est = estimate.detach()
    stats = LogdetStats(
        n_terms=n,
        n_exact_terms=n_exact_terms,
        n_extra=n_extra,
        n_samples=n_samples,
        mean=float(est.mean()),
        second_moment=float((est * est).mean()),
        growth=growth,
        term_means=tuple(s / n_samples for s in term_sums.tolist()),
        diverged=message is not None,
    )
    return estimate, stats


class RouletteLogdet(nn.Module):
    """Configured :func:`roulette_logdet` with train/eval settings and last-draw statistics.

    In training mode it uses ``n_exact_terms`` (and the Neumann gradient if ``neumann_grad``);
    in evaluation mode ``eval_exact_terms`` (ResFlow/ImpFlow: 2 and 20).

    Args:
        n_exact_terms, distribution, p, lam, n_samples, probe, neumann_grad,
            backward_in_forward, on_divergence: see :func:`roulette_logdet`; checked here, at
            construction. ``neumann_grad`` and ``backward_in_forward`` apply in training mode.
        eval_exact_terms: exact terms in evaluation mode (``None``: same as training).

    Attributes:
        last_stats: :class:`LogdetStats` of the last call (``None`` before the first).

    Example:
        >>> est = RouletteLogdet(n_exact_terms=2, distribution="geometric", p=0.5)
        >>> logdet = est(g, x)            # (B,)
        >>> est.last_stats.n_terms
    """

    def __init__(
        self,
        n_exact_terms: int = 2,
        eval_exact_terms: int | None = 20,
        distribution: str = "geometric",
        p: float = 0.5,
        lam: float = 2.0,
        n_samples: int = 1,
        probe: str = "rademacher",
        neumann_grad: bool = False,
        on_divergence: str = "raise",
        backward_in_forward: bool = False,
    ):
        super().__init__()
        self.n_exact_terms = check_nonneg_int(n_exact_terms, "n_exact_terms")
        self.eval_exact_terms = (
            self.n_exact_terms
            if eval_exact_terms is None
            else check_nonneg_int(eval_exact_terms, "eval_exact_terms")
        )
        _check_distribution(distribution, p, lam)
        _check_probe(probe)
        _check_flags(neumann_grad, backward_in_forward)
        self.distribution = distribution
        self.p = float(p)
        self.lam = float(lam)
        self.n_samples = check_pos_int(n_samples, "n_samples")
        self.probe = probe
        self.neumann_grad = neumann_grad
        self.backward_in_forward = backward_in_forward
        self.on_divergence = check_on_divergence(on_divergence)
        self.last_stats: LogdetStats | None = None

    def forward(self, g, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        estimate, self.last_stats = roulette_logdet(
            g,
            x,
            n_exact_terms=self.n_exact_terms if self.training else self.eval_exact_terms,
            distribution=self.distribution,
            p=self.p,
            lam=self.lam,
            n_samples=self.n_samples,
            probe=self.probe,
            neumann_grad=self.neumann_grad and self.training,
            backward_in_forward=self.backward_in_forward and self.training,
            generator=generator,
            on_divergence=self.on_divergence,
            return_stats=True,
        )
        return estimate

    def extra_repr(self) -> str:
        dist = f"p={self.p}" if self.distribution == "geometric" else f"lam={self.lam}"
        return (
            f"n_exact_terms={self.n_exact_terms}, eval_exact_terms={self.eval_exact_terms}, "
            f"distribution={self.distribution!r}, {dist}, n_samples={self.n_samples}, "
            f"probe={self.probe!r}, neumann_grad={self.neumann_grad}, "
            f"backward_in_forward={self.backward_in_forward}"
        )
