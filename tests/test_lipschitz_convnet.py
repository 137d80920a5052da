"""LipschitzConvNet (DESIGN.md §1, §5): its layout, shapes, the Lipschitz bound on its Jacobian
at a fixed input size (and its failure without normalisation), gradients, save/load, the fixed
input size and argument checks."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import impflow.nn as inn
from impflow.nn import ELU, LipschitzConvNet, LipSwish, Sin, SpectralConv2d, update_lipschitz

# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")

C, H, W = 2, 5, 5  # 50-dimensional inputs: full Jacobians are cheap


def _convs(net):
    return [m for m in net if isinstance(m, SpectralConv2d)]


def _scale_weights(net, scale):
    # Draw new weights with operator norms well above coeff, so that every normalisation is
    # active and the stored u, v (converged for the old weights) are stale until updated.
    with torch.no_grad():
        for conv in _convs(net):
            conv.weight.normal_().mul_(scale / conv.weight[0].numel() ** 0.5)


def _jacobian_norm(fn, x):
    """Spectral norm of the Jacobian of ``fn`` at the single image ``x`` (C, H, W)."""
    J = torch.autograd.functional.jacobian(fn, x.unsqueeze(0))
    J = J.reshape(-1, x.numel()).double()
    return float(torch.linalg.matrix_norm(J, 2))


def _plain(net):
    """The same network with every spectral convolution replaced by a plain one (raw weight)."""

    def fn(x):
        for m in net:
            if isinstance(m, SpectralConv2d):
                x = F.conv2d(x, m.weight, m.bias, stride=m.stride, padding=m.padding)
            else:
                x = m(x)
        return x

    return fn


# ------------------------------------------------------------------------------------------
# Layout and shapes


def test_layout():
    torch.manual_seed(0)
    net = LipschitzConvNet(3, 16, activation="lipswish", coeff=0.9, n_power_iterations=3)
    assert isinstance(net, nn.Sequential) and len(net) == 5
    kinds = [type(m) for m in net]
    assert kinds == [SpectralConv2d, LipSwish, SpectralConv2d, LipSwish, SpectralConv2d]
    convs = _convs(net)
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 16), (16, 16), (16, 3)]
    assert [m.kernel_size for m in convs] == [(3, 3), (1, 1), (3, 3)]
    assert [m.padding for m in convs] == [(1, 1), (0, 0), (1, 1)]
    assert all(m.stride == (1, 1) for m in convs)
    assert all(m.coeff == 0.9 and m.n_power_iterations == 3 for m in convs)
    assert net.kernel_sizes == (3, 1, 3) and net.coeff == 0.9
    assert net.in_channels == 3 and net.hidden_channels == 16 and not net.preactivation
    assert net[1] is not net[3]  # one β per position
    assert isinstance(net[:2], nn.Sequential) and net[:2][1] is net[1]  # slices work
    names = [n for n, _ in net.named_parameters()]
    assert names == [
        "0.weight", "0.bias", "1.raw_beta", "2.weight", "2.bias", "3.raw_beta", "4.weight",
        "4.bias",
    ]  # fmt: skip
    # The defaults: 3-1-3, LipSwish, coeff 0.98.
    default = LipschitzConvNet(3, 8)
    assert default.kernel_sizes == (3, 1, 3) and isinstance(default[1], LipSwish)
    assert all(m.coeff == 0.98 and m.n_power_iterations == 5 for m in _convs(default))


def test_preactivation_layout():
    net = LipschitzConvNet(2, 4, kernel_sizes=(5, 3), activation="elu", preactivation=True)
    assert [type(m) for m in net] == [ELU, SpectralConv2d, ELU, SpectralConv2d]
    assert [m.padding for m in _convs(net)] == [(2, 2), (1, 1)]
    assert net[0] is not net[2]
    # One kernel size: a single in -> in convolution, no activation (unless preactivation).
    single = LipschitzConvNet(3, 7, kernel_sizes=[1])
    assert len(single) == 1 and (single[0].in_channels, single[0].out_channels) == (3, 3)
    assert [type(m) for m in LipschitzConvNet(3, 7, (3,), preactivation=True)] == [
        LipSwish,
        SpectralConv2d,
    ]


def test_activation_forms():
    template = LipSwish(beta_init=2.0)
    net = LipschitzConvNet(2, 4, activation=template, preactivation=True)
    acts = [net[0], net[2], net[4]]
    assert all(isinstance(a, LipSwish) and a is not template for a in acts)
    assert len({id(a) for a in acts}) == 3
    assert all(abs(float(a.beta.detach()) - 2.0) < 1e-5 for a in acts)
    assert isinstance(LipschitzConvNet(2, 4, activation=Sin)[1], Sin)
    assert isinstance(LipschitzConvNet(2, 4, activation="TANH")[1], inn.Tanh)


@pytest.mark.parametrize(
    "kernel_sizes,size,batch",
    [
        ((3, 1, 3), (5, 5), 1),
        ((3, 1, 3), (7, 4), 3),
        ((3, 1, 3), (1, 1), 1),
        ((5, 3), (9, 3), 2),
        ((3, 3, 3, 3), (6, 11), 1),
        ((1,), (4, 4), 2),
    ],
)
@pytest.mark.parametrize("preactivation", [False, True])
def test_output_shape_equals_input_shape(kernel_sizes, size, batch, preactivation):
    torch.manual_seed(0)
    net = LipschitzConvNet(3, 6, kernel_sizes, preactivation=preactivation)
    x = torch.randn(batch, 3, *size)
    for mode in (True, False):
        net.train(mode)
        y = net(x)
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert all(m.input_size.tolist() == list(size) for m in _convs(net))
    # Unbatched (C, H, W) input works too, and agrees with the batched one.
    net.eval()
    assert torch.allclose(net(x[0]), net(x[:1])[0], atol=1e-6)


# ------------------------------------------------------------------------------------------
# The Lipschitz bound


@pytest.mark.parametrize("activation", ["lipswish", "sin", "elu"])
@pytest.mark.parametrize("preactivation", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_jacobian_norm_at_most_coeff(activation, preactivation, lazy):
    torch.manual_seed(0)
    coeff = 0.9
    kwargs = {"activation": activation, "coeff": coeff, "preactivation": preactivation}
    if lazy:  # buffers created at the first forward
        net = LipschitzConvNet(C, 8, **kwargs)
        assert update_lipschitz(net, 5) == 0  # nothing set up yet
        net(torch.randn(1, C, H, W))
    else:
        net = LipschitzConvNet(C, 8, **kwargs, input_size=(H, W))
    _scale_weights(net, 4.0)
    assert update_lipschitz(net, 300) == 3
    net.eval()
    x = torch.cat([torch.zeros(1, C, H, W), torch.randn(3, C, H, W)])
    norms = [_jacobian_norm(net, point) for point in x]
    assert max(norms) <= coeff + 1e-4
    assert min(norms) > 1e-3  # a real network, not a collapsed one
    # Each convolution is normalised to exactly coeff as an operator at H x W.
    for conv in _convs(net):
        w = conv.normalized_weight().detach()
        norm = _jacobian_norm(
            lambda v, w=w, p=conv.padding: F.conv2d(v, w, padding=p),
            torch.zeros(conv.in_channels, H, W),
        )
        assert coeff * (1 - 1e-4) <= norm <= coeff * (1 + 1e-4)
    # Teeth: the same network with the raw (scaled) weights is far from coeff-Lipschitz, so the
    # bound above holds because of the normalisation.
    plain = [_jacobian_norm(_plain(net), point) for point in x]
    assert max(plain) > 1.5 * coeff


def test_bound_is_tight_for_aligned_layers():
    # With identity activations, a 1x1 identity in the middle and the last convolution the
    # adjoint of the first, J = c³ AᵀA / σ(A)², whose norm is c³ exactly: the composed bound is
    # reached, so the normalisation uses the true operator norm at H x W (neither more nor less).
    torch.manual_seed(0)
    coeff = 0.99
    net = LipschitzConvNet(C, 4, activation="identity", coeff=coeff)
    net(torch.randn(1, C, H, W))
    with torch.no_grad():
        a = torch.randn(4, C, 3, 3)
        net[0].weight.copy_(3.0 * a)
        net[2].weight.copy_(2.0 * torch.eye(4).reshape(4, 4, 1, 1))
        # Adjoint of a stride-1, padding-1 convolution: swap channels and flip the kernel.
        net[4].weight.copy_(3.0 * a.transpose(0, 1).flip(-1, -2))
    # The top two singular values of this convolution (at 5x5) differ by only 0.3%, so power
    # iteration converges slowly: 300 steps still underestimate σ by ~0.2% (DESIGN.md §7).
    update_lipschitz(net, 3000)
    net.eval()
    norm = _jacobian_norm(net, torch.randn(C, H, W))
    assert coeff**3 * (1 - 1e-4) <= norm <= coeff**3 * (1 + 1e-4)


def test_bound_holds_after_a_weight_change_without_update():
    # DESIGN.md §7: new weights with the old u, v leave σ underestimated (the Jacobian's norm
    # was above 0.91 here); the eval-mode forward refreshes them first.
    torch.manual_seed(0)
    net = LipschitzConvNet(C, C, kernel_sizes=(3,), activation="identity", coeff=0.9)
    net(torch.randn(1, C, H, W))
    with torch.no_grad():
        net[0].weight.normal_()
    net.eval()
    x = torch.randn(C, H, W)
    assert _jacobian_norm(net, x) <= 0.9 + 1e-4


# ------------------------------------------------------------------------------------------
# Gradients, save/load, input size


@pytest.mark.parametrize("preactivation", [False, True])
def test_gradients_reach_every_parameter(preactivation):
    torch.manual_seed(0)
    net = LipschitzConvNet(C, 6, activation="lipswish", preactivation=preactivation)
    net.train()
    net(torch.randn(3, C, H, W)).square().sum().backward()
    params = dict(net.named_parameters())
    assert len(params) == 6 + (3 if preactivation else 2)  # weights, biases, one β per act
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("input_size", [None, (H, W)])
def test_state_dict_roundtrip(input_size):
    torch.manual_seed(0)
    kwargs = {
        "activation": "lipswish",
        "coeff": 0.8,
        "n_power_iterations": 2,
        "preactivation": True,
    }
    a = LipschitzConvNet(C, 6, **kwargs, input_size=input_size)
    a(torch.randn(1, C, H, W))
    _scale_weights(a, 3.0)
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, LipSwish):
                m.raw_beta.normal_()
    state = _roundtrip(a.state_dict())
    assert {k for k in state if k.startswith("1.")} == {
        "1.weight", "1.bias", "1.u", "1.v", "1.input_size",
    }  # fmt: skip
    torch.manual_seed(1)
    b = LipschitzConvNet(C, 6, **kwargs)  # never saw an input: lazily created buffers
    assert b[1].u.numel() == 0
    b.load_state_dict(state)
    for conv_a, conv_b in zip(_convs(a), _convs(b)):
        assert conv_b.u.shape == conv_a.u.shape and conv_b.v.shape == conv_a.v.shape
        assert conv_b.input_size.tolist() == [H, W]
    c = LipschitzConvNet(C, 6, **kwargs, input_size=(7, 7))  # set up at another size
    c.load_state_dict(state)
    x = torch.randn(4, C, H, W)
    for mode in (False, True, True):
        outs = []
        for net in (a, b, c):
            net.train(mode)
            outs.append(net(x))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(ValueError, match="5x5"):
        c(torch.randn(1, C, 7, 7))


def test_input_size_at_construction():
    torch.manual_seed(0)
    net = LipschitzConvNet(C, 6, input_size=(6, 5))
    for conv in _convs(net):
        assert conv.input_size.tolist() == [6, 5]
        assert conv.v.shape == (1, conv.in_channels, 6, 5)
        assert conv.u.shape == (1, conv.out_channels, 6, 5)
    assert LipschitzConvNet(C, 6, input_size=4)[0].v.shape == (1, C, 4, 4)
    assert net(torch.randn(2, C, 6, 5)).shape == (2, C, 6, 5)
    for mode in (True, False):
        net.train(mode)
        with pytest.raises(ValueError, match=r"normalised for .*6x5.* got 5x6"):
            net(torch.randn(2, C, 5, 6))
    # The same holds for a net that took its size from its first input.
    lazy = LipschitzConvNet(C, 6)
    lazy(torch.randn(1, C, 4, 4))
    with pytest.raises(ValueError, match=r"normalised for .*4x4.* got 5x5"):
        lazy(torch.randn(1, C, 5, 5))


# ------------------------------------------------------------------------------------------
# Bad arguments


@pytest.mark.parametrize("name", ["in_channels", "hidden_channels"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, None, "3"])
def test_bad_channels(name, value):
    kwargs = {"in_channels": 3, "hidden_channels": 8, name: value}
    with pytest.raises(ValueError, match=name):
        LipschitzConvNet(**kwargs)


@pytest.mark.parametrize(
    "kernel_sizes", [(), [2], (3, 2, 3), (3, 0), (3, -1), (3, 2.5), (3, True), "313", 3, None]
)
def test_bad_kernel_sizes(kernel_sizes):
    with pytest.raises(ValueError, match="kernel_sizes"):
        LipschitzConvNet(3, 8, kernel_sizes)


def test_even_kernel_message():
    with pytest.raises(ValueError, match="odd.*even kernel cannot keep the spatial size"):
        LipschitzConvNet(3, 8, (3, 4, 3))


@pytest.mark.parametrize("input_size", [0, (5,), (5, 0), (5, 5, 5), "5x5", (5, 2.5), True])
def test_bad_input_size(input_size):
    with pytest.raises(ValueError, match="input_size"):
        LipschitzConvNet(3, 8, input_size=input_size)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        LipschitzConvNet(3, 8, activation="relu6")
    with pytest.raises(TypeError):
        LipschitzConvNet(3, 8, activation=3)
    for value in (1, "yes", None):
        with pytest.raises(ValueError, match="preactivation"):
            LipschitzConvNet(3, 8, preactivation=value)
    for coeff in (0, 1.5, -1):
        with pytest.raises(ValueError, match="coeff"):
            LipschitzConvNet(3, 8, coeff=coeff)
    for n in (0, -2, 2.5):
        with pytest.raises(ValueError, match="n_power_iterations"):
            LipschitzConvNet(3, 8, n_power_iterations=n)
    for name in ("atol", "rtol"):
        with pytest.raises(ValueError, match=name):
            LipschitzConvNet(3, 8, **{name: -1.0})
    with pytest.raises(RuntimeError):  # torch's own channel mismatch
        LipschitzConvNet(3, 8)(torch.randn(1, 4, 5, 5))


def test_public_name():
    assert "LipschitzConvNet" in inn.__all__ and inn.LipschitzConvNet is LipschitzConvNet
