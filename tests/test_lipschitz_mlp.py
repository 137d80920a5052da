"""LipschitzMLP (DESIGN.md §5): its layout, the Lipschitz bound on its Jacobian once the power
iterations have converged (and its failure when they have not), gradients, save/load and
argument checks."""

import io

import pytest
import torch
from torch import nn

import impflow.nn as inn
from impflow.nn import LipschitzMLP, LipSwish, Sin, SpectralLinear, update_lipschitz


# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _new_weights(net, scale):
    # Draw new weights with norms well above coeff, so that each normalisation is active and
    # the stored u, v (converged for the old weights) are stale until update_lipschitz.
    with torch.no_grad():
        for layer in net.modules():
            if isinstance(layer, SpectralLinear):
                layer.weight.normal_().mul_(scale / layer.in_features**0.5)


def _jacobian_norms(net, x):
    norms = []
    for point in x:
        J = torch.autograd.functional.jacobian(net, point)
        norms.append(float(torch.linalg.matrix_norm(J.double(), 2)))
    return norms


def test_layout():
    torch.manual_seed(0)
    net = LipschitzMLP([3, 16, 8, 2], activation="lipswish", coeff=0.9, n_power_iterations=3)
    assert isinstance(net, nn.Sequential) and len(net) == 5
    kinds = [type(m) for m in net]
    assert kinds == [SpectralLinear, LipSwish, SpectralLinear, LipSwish, SpectralLinear]
    assert [(m.in_features, m.out_features) for m in net[::2]] == [(3, 16), (16, 8), (8, 2)]
    assert all(m.coeff == 0.9 and m.n_power_iterations == 3 for m in net[::2])
    assert net.dims == (3, 16, 8, 2)
    assert isinstance(net[:2], nn.Sequential) and net[:2][1] is net[1]  # slices work
    # Integers pick layers as nn.Sequential does: negative from the end, IndexError past it.
    plain = nn.Sequential(*net)
    for i in range(-5, 5):
        assert net[i] is plain[i]
    assert net[torch.tensor(2)] is plain[2]
    for bad in (5, -6):
        with pytest.raises(IndexError, match=f"index {bad} is out of range"):
            net[bad]
    assert net[1] is not net[3]  # one β per position
    names = [n for n, _ in net.named_parameters()]
    assert names == [
        "0.weight", "0.bias", "1.raw_beta", "2.weight", "2.bias", "3.raw_beta", "4.weight",
        "4.bias",
    ]  # fmt: skip
    assert net(torch.randn(7, 3)).shape == (7, 2)
    assert net(torch.randn(4, 5, 3)).shape == (4, 5, 2)
    # Two dims: a single layer, no activation.
    single = LipschitzMLP([4, 6])
    assert len(single) == 1 and isinstance(single[0], SpectralLinear)
    # The DESIGN.md §5 example.
    assert len(inn.LipschitzMLP([2, 128, 128, 2], activation="sin", coeff=0.99)) == 5


def test_activation_forms():
    template = LipSwish(beta_init=2.0)
    net = LipschitzMLP([2, 4, 4, 2], activation=template)
    acts = [net[1], net[3]]
    assert all(isinstance(a, LipSwish) for a in acts)
    assert all(a is not template for a in acts) and acts[0] is not acts[1]
    assert all(abs(float(a.beta.detach()) - 2.0) < 1e-5 for a in acts)
    with torch.no_grad():
        acts[0].raw_beta.add_(1.0)
    assert float(acts[1].beta.detach()) != float(acts[0].beta.detach())
    assert isinstance(LipschitzMLP([2, 4, 2], activation=Sin)[1], Sin)
    assert isinstance(LipschitzMLP([2, 4, 2], activation="TANH")[1], inn.Tanh)
    assert isinstance(LipschitzMLP([2, 4, 2])[1], Sin)  # the default


@pytest.mark.parametrize("activation", ["sin", "lipswish", "elu", "tanh", "softplus"])
@pytest.mark.parametrize("coeff", [0.97, 0.6])
def test_jacobian_norm_at_most_coeff(activation, coeff):
    torch.manual_seed(0)
    net = LipschitzMLP([4, 24, 24, 4], activation=activation, coeff=coeff)
    _new_weights(net, 4.0)
    assert update_lipschitz(net, 200) == 3
    net.eval()
    x = torch.cat([torch.zeros(1, 4), 0.5 * torch.randn(7, 4)])
    norms = _jacobian_norms(net, x)
    assert max(norms) <= coeff + 1e-5
    assert min(norms) > 1e-3  # a real network, not a collapsed one
    # Each layer is normalised to exactly coeff.
    for layer in net[::2]:
        norm = float(torch.linalg.matrix_norm(layer.normalized_weight().detach(), 2))
        assert coeff * (1 - 1e-4) <= norm <= coeff * (1 + 1e-5)


def test_bound_is_tight_for_a_single_layer():
    # One layer: J = Ŵ, whose norm is coeff exactly once σ has converged.
    torch.manual_seed(0)
    net = LipschitzMLP([5, 5], activation="identity", coeff=0.9)
    _new_weights(net, 3.0)
    update_lipschitz(net, 200)
    net.eval()
    (norm,) = _jacobian_norms(net, torch.randn(1, 5))
    assert 0.9 * (1 - 1e-4) <= norm <= 0.9 + 1e-5


def test_bound_holds_after_a_weight_change_without_update():
    # DESIGN.md §7: with stale vectors σ is underestimated and the bound was lost (the norm
    # was above 0.909 here); the eval-mode forward refreshes them on the new weight first.
    torch.manual_seed(0)
    net = LipschitzMLP([6, 6], activation="identity", coeff=0.9)
    with torch.no_grad():
        net[0].weight.normal_()  # a new weight; u, v are those of the old one
    net.eval()
    (norm,) = _jacobian_norms(net, torch.randn(1, 6))
    assert norm <= 0.9 + 1e-5


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = LipschitzMLP([3, 8, 8, 3], activation="lipswish")
    net.train()
    net(torch.randn(5, 3)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_state_dict_roundtrip():
    torch.manual_seed(0)
    a = LipschitzMLP([3, 8, 3], activation="lipswish", coeff=0.8, n_power_iterations=2)
    _new_weights(a, 3.0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    b = LipschitzMLP([3, 8, 3], activation="lipswish", coeff=0.8, n_power_iterations=2)
    b.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(4, 3)
    for mode in (False, True, True):
        a.train(mode)
        b.train(mode)
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize(
    "dims", [[], [3], [3, 0], [3, -1], [3, 2.5], [True, 3], "32", 5, None, [3, None]]
)
def test_bad_dims(dims):
    with pytest.raises(ValueError, match="dims"):
        LipschitzMLP(dims)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        LipschitzMLP([2, 3, 2], activation="relu6")
    with pytest.raises(TypeError):
        LipschitzMLP([2, 3, 2], activation=3)
    for coeff in (0, 1.5, -1):
        with pytest.raises(ValueError, match="coeff"):
            LipschitzMLP([2, 3, 2], coeff=coeff)
    for n in (0, -2, 2.5):
        with pytest.raises(ValueError, match="n_power_iterations"):
            LipschitzMLP([2, 3, 2], n_power_iterations=n)
    with pytest.raises(RuntimeError):  # torch's own shape error
        LipschitzMLP([2, 3, 2])(torch.randn(4, 5))


def test_public_names():
    for name in [
        "SpectralLinear", "SpectralConv2d", "LipschitzMLP", "update_lipschitz", "Sin",
        "LipSwish", "ELU", "Softplus", "Tanh", "Identity", "make_activation",
    ]:  # fmt: skip
        assert name in inn.__all__ and hasattr(inn, name)
