"""Inside a block call the solver's evaluations (no graph) share each spectral layer's
normalised weight; evaluations with a graph build their own, and nothing outlives the call."""

import pytest
import torch

import impflow.nn as inn
from impflow.nn._frozen import power_iteration_paused
from impflow.nn.spectral._mixin import _SpectralNormMixin

F64 = torch.float64


def spectral_layers(*nets):
    return [m for g in nets for m in g.modules() if isinstance(m, _SpectralNormMixin)]


def count_normalisations(monkeypatch):
    calls = []
    original = _SpectralNormMixin._normalize_weight

    def counting(self, sigma):
        calls.append(id(self))
        return original(self, sigma)

    monkeypatch.setattr(_SpectralNormMixin, "_normalize_weight", counting)
    return calls


def mlp(train=True):
    torch.manual_seed(0)
    return inn.LipschitzMLP([3, 16, 16, 3], activation="sin", coeff=0.9).to(F64).train(train)


@pytest.mark.parametrize("train", [True, False])
def test_no_grad_evaluations_share_one_weight(monkeypatch, train):
    g = mlp(train)
    x = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        with power_iteration_paused(g):
            expected = g(x)
    calls = count_normalisations(monkeypatch)
    with power_iteration_paused(g), torch.no_grad():
        outs = [g(x) for _ in range(4)]
    assert len(calls) == 3  # once per layer, not once per evaluation
    assert all(torch.equal(o, expected) for o in outs)
    assert all(m._weight_cache is None for m in spectral_layers(g))  # released on exit


def test_graph_evaluations_keep_their_own_weight(monkeypatch):
    g = mlp()
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    calls = count_normalisations(monkeypatch)
    with power_iteration_paused(g):
        first = g(x).sum()
        # A backward inside the call frees this evaluation's graph ...
        torch.autograd.grad(first, x)
        second = g(x).sum()
    # ... and the next evaluation with a graph still differentiates.
    second.backward()
    assert len(calls) == 6
    assert all(p.grad is not None for p in g.parameters())


def test_nested_calls_keep_the_outer_weight(monkeypatch):
    g = mlp()
    x = torch.randn(5, 3, dtype=F64)
    calls = count_normalisations(monkeypatch)
    with power_iteration_paused(g), torch.no_grad():
        g(x)
        with power_iteration_paused(g):
            g(x)
        assert all(m._weight_cache for m in spectral_layers(g))  # still the outer one
        g(x)
    assert len(calls) == 3


def fresh_weight(self):
    return self._normalize_weight(self._sigma_from(self.u.clone(), self.v.clone()))


def test_block_result_unchanged_by_the_shared_weight(monkeypatch):
    """An ImplicitBlock's output, log-det and gradients equal those computed with a fresh
    normalised weight at every evaluation (the cache switched off)."""

    def run(share):
        torch.manual_seed(1)
        block = inn.ImplicitBlock(mlp(), mlp(), logdet="exact")
        x = torch.randn(7, 3, dtype=F64, requires_grad=True)
        if not share:
            monkeypatch.setattr(_SpectralNormMixin, "_stored_vector_weight", fresh_weight)
        z, logdet = block(x)
        (z.square().sum() + logdet.sum()).backward()
        monkeypatch.undo()
        grads = [p.grad.clone() for p in block.parameters()]
        return z.detach(), logdet.detach(), x.grad.clone(), grads

    shared, fresh = run(True), run(False)
    for a, b in zip(shared[:3], fresh[:3]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(shared[3], fresh[3]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
