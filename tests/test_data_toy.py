"""The 2-D toy samplers and the 1-D fitting example: support, moments against their closed
forms, determinism, and bad input."""

import math

import pytest
import torch

from impflow.data import (
    FIT1D_DOMAIN,
    TOY_DATASETS,
    checkerboard_entropy,
    checkerboard_log_prob,
    fit1d_dataset,
    fit1d_derivative,
    fit1d_target,
    sample_toy,
)

N = 20000

# E|x|² of each density, from its definition (module docstring of impflow.data.toy):
_SECOND_MOMENT = {
    # uniform marginals on [-4, 4]: 2 · 16/3
    "checkerboard": 32 / 3,
    # (|centre|² + 2·0.5²) / 1.414²
    "8gaussians": (16 + 0.5) / 1.414**2,
    # (E n² + E(U₁²+U₂²)/4 - E[n cos n]/2 + E[n sin n]/2) / 9 + 2·0.1², n = 3π√U
    "2spirals": (
        9 * math.pi**2 / 2 + 1 / 6 + 0.5 * 4 / (3 * math.pi) + 0.5 * (2 - 8 / (9 * math.pi**2))
    )
    / 9
    + 0.02,
    # p: outer E|p|² = 1, inner 2.25 - 2/π, noise 2·0.1²; q = 2p + c, E p = (0.5, 0.25)
    "moons": 4 * ((1 + 2.25 - 2 / math.pi) / 2 + 0.02) + 4 * (0.5 * -1 + 0.25 * -0.2) + 1.04,
    "circles": (9 + 2.25) / 2 + 2 * 0.24**2,
    "pinwheel": 4 * (1 + 0.3**2 + 0.1**2),
    "rings": (9 + 2.25**2 + 1.5**2 + 0.75**2) / 4 + 2 * 0.08**2,
    # (E t² + 2) / 25, t ~ U[1.5π, 4.5π]
    "swissroll": (9.75 * math.pi**2 + 2) / 25,
}
# Non-zero means: moons (2·(0.5, 0.25) + (-1, -0.2)); swissroll (E[t cos t], E[t sin t]) / 5
# = (6π, 2) / (3π) / 5.
_MEAN = {"moons": (0.0, 0.3), "swissroll": (0.4, 2 / (15 * math.pi))}


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_moments_match_the_definition(name):
    x = sample_toy(name, N, generator=1).double()
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    sq = x.square().sum(1)
    tol = 5 * sq.std().item() / math.sqrt(N)  # five standard errors
    assert abs(sq.mean().item() - _SECOND_MOMENT[name]) < tol
    mean = torch.tensor(_MEAN.get(name, (0.0, 0.0)), dtype=torch.float64)
    mean_tol = 5 * x.std(0) / math.sqrt(N)
    assert ((x.mean(0) - mean).abs() < mean_tol).all(), (x.mean(0), mean)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_same_seed_same_points_other_seed_other_points(name):
    a = sample_toy(name, 500, generator=7)
    assert torch.equal(a, sample_toy(name, 500, generator=7))
    assert torch.equal(a, sample_toy(name, 500, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, sample_toy(name, 500, generator=8))
    # a generator advances: two draws from it differ, and replay from a saved state
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    first, second = sample_toy(name, 100, generator=gen), sample_toy(name, 100, generator=gen)
    assert not torch.equal(first, second)
    gen.set_state(state)
    assert torch.equal(first, sample_toy(name, 100, generator=gen))
    # None draws from torch's default generator, so torch.manual_seed fixes it
    torch.manual_seed(11)
    c = sample_toy(name, 100)
    torch.manual_seed(11)
    assert torch.equal(c, sample_toy(name, 100))


def test_checkerboard_points_lie_on_the_eight_squares_evenly():
    x = sample_toy("checkerboard", N, generator=0, dtype=torch.float64)
    assert (x >= -4).all() and (x < 4).all()
    cells = torch.floor(x / 2).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.bincount((cells[:, 0] + 2) * 4 + (cells[:, 1] + 2), minlength=16)
    occupied = counts[counts > 0]
    assert occupied.numel() == 8
    # multinomial counts, p = 1/8: within five standard deviations
    assert ((occupied - N / 8).abs() < 5 * math.sqrt(N / 8 * 7 / 8)).all()
    # uniform inside each square: position within the cell has mean 1 and variance 1/3
    within = x - 2 * cells
    assert ((within.mean(0) - 1).abs() < 5 * math.sqrt(1 / 3 / N)).all()
    assert torch.isfinite(checkerboard_log_prob(x)).all()


def test_checkerboard_entropy_is_five_bits_and_matches_the_density():
    assert checkerboard_entropy() == pytest.approx(5.0, abs=1e-12)
    assert checkerboard_entropy(math.e) == pytest.approx(math.log(32), abs=1e-12)
    x = sample_toy("checkerboard", 1000, generator=2, dtype=torch.float64)
    # -E log2 p(x) over the data is the entropy (the density is constant on its support)
    bits = -checkerboard_log_prob(x).mean().item() / math.log(2)
    assert bits == pytest.approx(5.0, abs=1e-12)
    # the density integrates to 1: Monte Carlo over the bounding square [-4, 4]²
    grid = torch.rand(200000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mass = 64 * checkerboard_log_prob(grid * 8 - 4).exp().mean().item()
    assert mass == pytest.approx(1.0, abs=0.02)
    outside = torch.tensor([[2.5, 0.5], [4.0, 0.0], [-4.5, -3.0], [0.5, 2.5]])
    assert torch.isinf(checkerboard_log_prob(outside)).all()
    with pytest.raises(ValueError, match="base"):
        checkerboard_entropy(1)


def test_rings_and_circles_sit_on_their_radii():
    for name, radii, noise in (
        ("rings", (3.0, 2.25, 1.5, 0.75), 0.08),
        ("circles", (3.0, 1.5), 0.24),
    ):
        r = sample_toy(name, N, generator=4, dtype=torch.float64).norm(dim=1)
        nearest = torch.stack([(r - rho).abs() for rho in radii]).argmin(0)
        shares = torch.bincount(nearest, minlength=len(radii)).double() / N
        assert (shares - 1 / len(radii)).abs().max() < 0.02, (name, shares)
        assert (r - torch.tensor(radii, dtype=torch.float64)[nearest]).abs().max() < 6 * noise


def test_dtype_and_empty_and_bad_input():
    assert sample_toy("moons", 3, generator=0, dtype=torch.float64).dtype == torch.float64
    assert sample_toy("moons", 0, generator=0).shape == (0, 2)
    with pytest.raises(ValueError, match="checkerboard, 8gaussians"):
        sample_toy("spiral", 10)
    with pytest.raises(ValueError, match="n must be"):
        sample_toy("moons", -1)
    with pytest.raises(ValueError, match="n must be"):
        sample_toy("moons", 2.5)
    with pytest.raises(TypeError, match="generator"):
        sample_toy("moons", 5, generator="seed")
    with pytest.raises(ValueError, match="dtype"):
        sample_toy("moons", 5, dtype=torch.int64)


def test_fit1d_target_is_increasing_with_slope_in_range():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    y, dy = fit1d_target(x), fit1d_derivative(x)
    assert (y[1:] > y[:-1]).all()
    assert (dy > 0.1).all() and (dy < 10).all()
    # the derivative is the derivative: central differences
    h = 1e-5
    assert torch.allclose((fit1d_target(x + h) - fit1d_target(x - h)) / (2 * h), dy, atol=1e-6)
    # and autograd agrees
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(fit1d_target(xg).sum(), xg)
    assert torch.allclose(grad, dy, atol=1e-12)
    # the slope spans (almost) the whole range on the fitting domain
    ends = fit1d_derivative(torch.tensor(FIT1D_DOMAIN, dtype=torch.float64))
    assert ends[0] < 0.11 and ends[1] > 9.9


def test_fit1d_dataset_grid_and_random():
    x, y = fit1d_dataset(101, dtype=torch.float64)
    assert x.shape == y.shape == (101, 1)
    assert x[0].item() == FIT1D_DOMAIN[0] and x[-1].item() == FIT1D_DOMAIN[1]
    assert torch.equal(y, fit1d_target(x))
    xr, yr = fit1d_dataset(500, grid=False, generator=3)
    low, high = FIT1D_DOMAIN
    assert xr.dtype == torch.float32 and (xr >= low).all() and (xr <= high).all()
    assert torch.equal(xr, fit1d_dataset(500, grid=False, generator=3)[0])
    assert not torch.equal(xr, fit1d_dataset(500, grid=False, generator=4)[0])
    assert torch.allclose(yr, fit1d_target(xr.double()).float())
    with pytest.raises(ValueError, match="domain"):
        fit1d_dataset(10, domain=(1.0, 1.0))
    with pytest.raises(ValueError, match="n must be"):
        fit1d_dataset(1)
    with pytest.raises(ValueError, match="grid=False"):
        fit1d_dataset(10, generator=0)
    with pytest.raises(TypeError, match="floating"):
        fit1d_target(torch.arange(3))
