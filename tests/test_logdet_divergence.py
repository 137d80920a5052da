"""A ``g`` whose log-det series diverges (issue 4, bad input): the estimators raise by default,
and with ``on_divergence="warn"`` return a flagged result, never a NaN without a word."""

import warnings

import pytest
import torch
from torch import nn

import impflow.logdet as L

DT = torch.float64


class Scaled(nn.Module):
    """``g(x) = s·x`` (``J = s·I``): the per-term growth factor of the series is exactly ``s``."""

    def __init__(self, d, s):
        super().__init__()
        self.weight = nn.Parameter(s * torch.eye(d, dtype=DT))

    def forward(self, x):
        return x @ self.weight.T


GRAD_MODES = [
    {},
    {"neumann_grad": True},
    {"neumann_grad": True, "backward_in_forward": True},
]


@pytest.mark.parametrize("kw", GRAD_MODES, ids=["basic", "neumann", "bif"])
def test_growing_series_raises_by_default(kw):
    g = Scaled(3, 1.5)
    params = list(g.parameters())
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with pytest.raises(L.SeriesDivergenceError, match=r"= 1\.5 > 1 .*for 4 of 4 sample"):
        L.roulette_logdet(g, x, n_exact_terms=4, **kw)
    # Raised before any gradient work, and g is left as it was (parameters not swapped).
    assert list(g.parameters()) == params and all(p.grad is None for p in params)
    assert x.grad is None


@pytest.mark.parametrize("kw", GRAD_MODES, ids=["basic", "neumann", "bif"])
def test_warn_returns_a_flagged_estimate_naming_the_growth(kw):
    g = Scaled(3, 1.5)
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with pytest.warns(L.SeriesDivergenceWarning, match=r"= 1\.5 > 1.*LogdetStats\.diverged"):
        out, stats = L.roulette_logdet(
            g, x, n_exact_terms=4, on_divergence="warn", return_stats=True, **kw
        )
    assert stats.diverged and stats.growth == pytest.approx(1.5, rel=1e-12)
    assert torch.isfinite(out).all()  # finite here, but garbage: the flag says so
    out.sum().backward()  # still usable, e.g. to inspect, in every gradient mode
    assert torch.isfinite(g.weight.grad).all()


def test_non_finite_products_are_never_silent():
    g = Scaled(3, 1e200)  # vᵀJ² overflows
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(L.SeriesDivergenceError, match="not finite for 4 of 4"):
        L.roulette_logdet(g, x, n_exact_terms=3)
    with pytest.warns(L.SeriesDivergenceWarning, match="not finite"):
        out, stats = L.roulette_logdet(
            g, x, n_exact_terms=3, on_divergence="warn", return_stats=True
        )
    assert not torch.isfinite(out).all()
    assert stats.diverged and stats.growth == float("inf")


def test_non_finite_g_output_is_reported():
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(L.SeriesDivergenceError, match="g is not contractive there .* or g"):
        L.roulette_logdet(lambda t: t / 0.0, x, n_exact_terms=2)


def test_module_records_divergence():
    est = L.RouletteLogdet(n_exact_terms=4, eval_exact_terms=None, on_divergence="warn")
    x = torch.randn(5, 3, dtype=DT)
    with pytest.warns(L.SeriesDivergenceWarning):
        est(Scaled(3, 1.2), x)
    assert est.last_stats.diverged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est(Scaled(3, 0.5), x)
    assert not est.last_stats.diverged and est.last_stats.growth == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "fn",
    [
        L.exact_logdet,
        lambda g, x: L.power_series_logdet(g, x, 3, on_divergence="warn"),
        lambda g, x: L.roulette_logdet(g, x, on_divergence="warn"),
    ],
    ids=["exact", "power_series", "roulette"],
)
def test_non_finite_input_is_refused(fn, bad):
    """Bad input, not a divergence: refused whatever on_divergence says."""
    x = torch.randn(3, 2, dtype=DT)
    x[1, 0] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        fn(Scaled(2, 0.5), x)
