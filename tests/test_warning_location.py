"""impflow's warnings point at the user's line (here: this file), whatever sits between:
``@torch.no_grad()``, ``nn.Module.__call__``, the solver registry, autograd's backward.
A warning attributed to torch's ``_contextlib.py`` tells the user nothing, and Python shows a
warning once per location, so it would also hide the warnings of every other call site."""

import warnings

import pytest
import torch
from torch import nn

import impflow.logdet as L
import impflow.nn as inn
from impflow.nn import NonContractiveWarning
from impflow.solvers import SolverWarning, anderson, broyden, fixed_point, solve
from impflow.train.checkpoint import capture_rng_state, restore_rng_state

from block_testing import break_lipschitz, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def warnings_of(category, action):
    """Runs ``action`` and returns the (filename, lineno) of each ``category`` warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    found = [(w.filename, w.lineno) for w in caught if issubclass(w.category, category)]
    assert found, f"no {category.__name__} was emitted"
    return found


def assert_blames_this_file(found):
    assert all(filename == __file__ for filename, _ in found), found


def _slow_contraction(z):
    return 0.99 * torch.tanh(z) + 1.0 - z


@pytest.mark.parametrize("method", [broyden, anderson, fixed_point])
def test_solver_warning_points_at_the_call(method):
    found = warnings_of(
        SolverWarning, lambda: method(_slow_contraction, torch.zeros(5, 3), max_iter=2)
    )
    assert_blames_this_file(found)


def test_solve_registry_warning_points_at_the_call():
    found = warnings_of(
        SolverWarning,
        lambda: solve(_slow_contraction, torch.zeros(5, 3), method="anderson", max_iter=2),
    )
    assert_blames_this_file(found)


def test_two_call_sites_are_two_locations():
    """With a location of their own, the default filter ("once per location") shows both."""

    def twice():
        broyden(_slow_contraction, torch.zeros(5, 3), max_iter=2)
        broyden(_slow_contraction, torch.zeros(5, 3), max_iter=2)

    found = warnings_of(SolverWarning, twice)
    assert len({lineno for _, lineno in found}) == 2


def test_block_solve_warning_points_at_the_module_call():
    torch.manual_seed(2)
    block = inn.ImplicitBlock(
        mlp(2),
        mlp(2, coeff=0.9),
        forward_solver={"method": "fixed_point", "max_iter": 1, "tol": 1e-12},
        on_failure="warn",
    ).eval()
    found = warnings_of(SolverWarning, lambda: block(torch.randn(6, 2)))
    assert_blames_this_file(found)


def test_adjoint_warning_in_backward_points_at_backward():
    block = inn.ImplicitBlock(
        inn.LipschitzMLP([16, 32, 16], coeff=0.99),
        inn.LipschitzMLP([16, 32, 16], coeff=0.99),
        logdet="series",
        adjoint_solver={"method": "fixed_point", "max_iter": 1, "tol": 1e-12},
        on_failure="warn",
    ).eval()
    z, _ = block(torch.randn(4, 16, requires_grad=True))
    found = warnings_of(SolverWarning, lambda: z.sum().backward())
    assert_blames_this_file(found)


def test_non_contractive_warning_points_at_the_module_call():
    g = inn.LipschitzMLP([2, 2], activation="identity", coeff=0.9).double()
    break_lipschitz(g, scale=1.5)
    block = inn.ResidualBlock(g.eval(), logdet="exact")
    found = warnings_of(
        NonContractiveWarning, lambda: block(torch.randn(4, 2, dtype=torch.float64))
    )
    assert_blames_this_file(found)


class _Scaled(nn.Module):
    def forward(self, x):
        return 1.5 * x


def test_series_divergence_warning_points_at_the_call():
    x = torch.randn(4, 3, dtype=torch.float64)
    found = warnings_of(
        L.SeriesDivergenceWarning,
        lambda: L.roulette_logdet(_Scaled(), x, n_exact_terms=4, on_divergence="warn"),
    )
    assert_blames_this_file(found)


def test_checkpoint_warning_points_at_the_call():
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)
    found = warnings_of(RuntimeWarning, lambda: restore_rng_state(state))
    assert_blames_this_file(found)
