"""The paper's 1-D claim: one ImplicitBlock fits a strictly increasing function whose slope ranges
over [0.1, 10], one ResidualBlock cannot.

Why: in one dimension a ResidualBlock is ``z = x + g(x)`` with ``|g'| ≤ c < 1``, so its slope
``1 + g'`` lies in ``(1 - c, 1 + c) ⊂ (0, 2)``: it can follow the flat part of the target but
never its steep part, and falls behind by ``(10 - 2)·(length of the steep part)``. An
ImplicitBlock is ``(I + g_z)^{-1} ∘ (I + g_x)``, whose slope ``(1 + g_x'(x)) / (1 + g_z'(z))``
ranges over ``((1 - c)/(1 + c), (1 + c)/(1 - c)) ≈ (0.015, 66)`` for ``c = 0.97``: the forward
residual map handles the slopes below 1, the inverse one the slopes above 1 (the paper's
slides: "the forward ResFlow handles small Lipschitz parts, and the inverse ResFlow handles
large Lipschitz parts").

The target (:mod:`impflow.data.fit1d`, also the ``fit1d`` training task's) is built that way,
``f = r2^{-1} ∘ r1`` with smooth ramps ``r1' = 0.1 → 1`` and ``r2' = 1 → 0.1``, each changing
over a few units: a spectrally normalised network's derivative cannot change faster than its
weights allow (``|g''|`` is bounded too), so a kink would be unreachable by either block and
would only measure that.
"""

import pytest
import torch

import impflow.nn as inn
from impflow.data.fit1d import fit1d_dataset, fit1d_derivative

# One intra-op thread: on a shared 2-core machine more threads only wait on each other.
pytestmark = pytest.mark.usefixtures("one_thread")


# The slope of r2 drops from 1 to 0.1 around z = _KINK_Z, away from the z values of the flat
# part (z < 0), so that the two ramps do not overlap.
def _target(n=256):
    """``x`` on the fitting domain [-6, 6], ``z = f(x)`` and ``f'(x)``."""
    x, z = fit1d_dataset(n, grid=True)
    return x, z, fit1d_derivative(x.double()).squeeze(1)


def _fit(block, x, y, steps=500, lr=3e-2):
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        z, _ = block(x)
        loss = ((z - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    block.eval()
    inn.update_lipschitz(block, 200)  # converged σ: the Lipschitz bound holds at evaluation
    with torch.no_grad():
        z, logdet = block(x)
    rms = float(((z - y) ** 2).mean().sqrt())
    return rms, logdet.exp()  # in 1-D, exp(logdet) is the slope f'(x)


def _mlp():
    return inn.LipschitzMLP([1, 32, 1], activation="elu", coeff=0.97)


def test_target_is_increasing_with_slopes_from_0_1_to_10():
    x, y, slope = _target()
    assert bool((y[1:] > y[:-1]).all())
    assert 0.1 <= float(slope.min()) < 0.11 and 9.9 < float(slope.max()) <= 10.0


def test_implicit_block_fits_what_a_residual_block_cannot():
    x, y, _ = _target()
    span = float(y.max() - y.min())  # about 34

    torch.manual_seed(0)
    implicit_rms, implicit_slope = _fit(inn.ImplicitBlock(_mlp(), _mlp(), logdet="exact"), x, y)
    torch.manual_seed(0)
    residual_rms, residual_slope = _fit(inn.ResidualBlock(_mlp(), logdet="exact"), x, y)

    # Measured (seeds 0-3): implicit rms 0.07-0.16, residual 5.16-5.18.
    assert implicit_rms < 0.01 * span, implicit_rms
    assert residual_rms > 10 * implicit_rms, (residual_rms, implicit_rms)
    # The reason: the residual block's slope stays inside (1 - c, 1 + c), the implicit block's
    # reaches the steep part of the target.
    assert float(residual_slope.max()) < 1.97
    assert float(implicit_slope.max()) > 8.0
    assert float(implicit_slope.min()) < 0.5
