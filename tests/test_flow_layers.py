"""Flow layers ActNorm, Squeeze, LogitTransform and SequentialFlow (DESIGN.md §1): round trips,
log-dets against slogdet of the autograd Jacobian, gradients, ActNorm's data-dependent
initialisation and saved state, and errors on bad input."""

import io
import math

import pytest
import torch
from torch import nn

import impflow
from impflow.nn import (
    ActNorm,
    ImplicitBlock,
    LipschitzMLP,
    LogitTransform,
    ResidualBlock,
    SequentialFlow,
    Squeeze,
)
from flow_testing import (
    BadLogdet,
    ElementwiseAffine,
    Invertible1x1Conv,
    autograd_logdet,
)

# Tiny problems: intra-op threads only add scheduling noise on a small machine.
pytestmark = pytest.mark.usefixtures("one_thread")

ROUND_TRIP_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _actnorm(shape, dtype):
    """An ActNorm initialised from shifted, scaled data, then moved off its initial values."""
    layer = ActNorm(shape[1]).to(dtype)
    layer(3 * torch.randn(shape, dtype=dtype) + 1)
    with torch.no_grad():
        layer.bias.add_(0.1 * torch.randn_like(layer.bias))
        layer.log_scale.add_(0.1 * torch.randn_like(layer.log_scale))
    return layer


def _case(name, dtype):
    """(layer, input) for each parametrised case."""
    if name == "actnorm_vector":
        return _actnorm((16, 4), dtype), torch.randn(5, 4, dtype=dtype)
    if name == "actnorm_image":
        return _actnorm((6, 3, 4, 5), dtype), torch.randn(2, 3, 4, 5, dtype=dtype)
    if name == "actnorm_sequence":
        return _actnorm((4, 2, 7), dtype), torch.randn(3, 2, 7, dtype=dtype)
    if name == "logit_vector":
        return LogitTransform(0.05), torch.rand(3, 5, dtype=dtype)
    if name == "logit_image":
        return LogitTransform(1e-6), torch.rand(2, 2, 3, 3, dtype=dtype)
    if name == "squeeze":
        return Squeeze(), torch.randn(2, 3, 4, 6, dtype=dtype)
    if name == "squeeze3":
        return Squeeze(3), torch.randn(2, 2, 3, 6, dtype=dtype)
    if name == "sequential_vector":
        layer = SequentialFlow(
            LogitTransform(0.05), _actnorm((8, 3), dtype), Invertible1x1Conv(3),
            ElementwiseAffine((3,)),
        )  # fmt: skip
        return layer.to(dtype), torch.rand(4, 3, dtype=dtype)
    if name == "sequential_image":
        layer = SequentialFlow(
            LogitTransform(0.05), _actnorm((4, 2, 2, 4), dtype), Squeeze(),
            Invertible1x1Conv(8), ElementwiseAffine((8, 1, 2)),
        )  # fmt: skip
        return layer.to(dtype), torch.rand(2, 2, 2, 4, dtype=dtype)
    raise KeyError(name)


CASES = [
    "actnorm_vector", "actnorm_image", "actnorm_sequence", "logit_vector", "logit_image",
    "squeeze", "squeeze3", "sequential_vector", "sequential_image",
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", CASES)
def test_round_trip(name, dtype):
    layer, x = _case(name, dtype)
    z, logdet = layer(x)
    assert z.dtype == dtype and logdet.dtype == dtype and logdet.shape == (x.shape[0],)
    assert z.numel() == x.numel()
    x_rec, logdet_inv = layer.inverse(z)
    tol = ROUND_TRIP_TOL[dtype]
    torch.testing.assert_close(x_rec, x, atol=tol, rtol=tol)
    torch.testing.assert_close(logdet_inv, -logdet, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", CASES)
def test_logdet_matches_autograd_jacobian(name):
    layer, x = _case(name, torch.float64)
    z, logdet = layer(x)
    reference = autograd_logdet(layer, x)
    torch.testing.assert_close(logdet, reference, atol=1e-9, rtol=1e-9)
    # The inverse's log-det at z is that of its own Jacobian, too.
    torch.testing.assert_close(
        layer.inverse(z)[1], autograd_logdet(layer.inverse, z), atol=1e-9, rtol=1e-9
    )


@pytest.mark.parametrize("name", ["actnorm_image", "sequential_vector", "sequential_image"])
def test_gradients_reach_every_parameter(name):
    layer, x = _case(name, torch.float64)
    z, logdet = layer(x)
    (z.square().sum() - logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    # And through the inverse.
    layer.zero_grad()
    x_rec, logdet_inv = layer.inverse(z.detach())
    (x_rec.square().sum() + logdet_inv.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


# --------------------------------------------------------------------------------------------
# ActNorm


@pytest.mark.parametrize("shape", [(64, 3), (8, 3, 5, 6)])
def test_actnorm_initialises_to_zero_mean_unit_variance(shape):
    layer = ActNorm(3)
    assert not layer.initialized
    x = torch.randn(shape) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, *[1] * (len(shape) - 2))
    x = x + torch.tensor([-3.0, 0.0, 10.0]).view(1, 3, *[1] * (len(shape) - 2))
    z, logdet = layer(x)
    assert layer.initialized
    per_channel = z.detach().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.var(1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    positions = x[0, 0].numel()
    torch.testing.assert_close(logdet, layer.log_scale.sum().expand(shape[0]) * positions)
    # A second batch trains with the same parameters: no new initialisation.
    before = [p.detach().clone() for p in layer.parameters()]
    layer(5 * torch.randn(shape))
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))


def test_actnorm_initialises_under_no_grad_and_not_in_eval():
    x = 3 * torch.randn(10, 2) + 1
    layer = ActNorm(2).eval()
    z, logdet = layer(x)
    assert not layer.initialized and torch.equal(z, x) and torch.equal(logdet, torch.zeros(10))
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.initialized and layer.bias.requires_grad
    torch.testing.assert_close(layer.bias.detach(), -x.mean(0))


def test_actnorm_data_init_false_and_explicit_initialize():
    layer = ActNorm(2, data_init=False)
    x = 3 * torch.randn(10, 2) + 1
    z, _ = layer(x)
    assert layer.initialized and torch.equal(z, x)
    layer.initialize(x)
    z, _ = layer(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-6, rtol=0)


def test_actnorm_inverse_before_initialisation():
    layer = ActNorm(3)
    with pytest.raises(RuntimeError, match="not initialised.*forward on a data batch"):
        layer.inverse(torch.randn(2, 3))
    x, logdet_inv = layer.eval().inverse(torch.randn(2, 3))  # eval: current parameters
    assert not layer.initialized and torch.equal(logdet_inv, torch.zeros(2))


def test_actnorm_state_dict_round_trip_does_not_reinitialise():
    trained = _actnorm((6, 3, 4, 4), torch.float32)
    state = trained.state_dict()
    assert set(state) == {"bias", "log_scale", "initialized"} and bool(state["initialized"])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = ActNorm(3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.training and fresh.initialized
    x = 4 * torch.randn(5, 3, 4, 4) - 2  # other statistics than the initialisation batch
    z_fresh, logdet_fresh = fresh(x)
    z_trained, logdet_trained = trained(x)
    assert torch.equal(z_fresh, z_trained) and torch.equal(logdet_fresh, logdet_trained)
    assert torch.equal(fresh.bias, trained.bias)


def test_actnorm_bad_arguments_and_inputs():
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="num_features"):
            ActNorm(bad)
    for bad in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps"):
            ActNorm(2, eps=bad)
    with pytest.raises(TypeError, match="data_init"):
        ActNorm(2, data_init=1)
    layer = ActNorm(3)
    with pytest.raises(ValueError, match=r"x must have 3 channels.*\(4, 2, 5\)"):
        layer(torch.randn(4, 2, 5))
    with pytest.raises(ValueError, match=r"z must have 3 channels"):
        layer.eval().inverse(torch.randn(4, 2))
    layer.train()
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        layer(torch.randn(1, 3))
    assert not layer.initialized  # a failed initialisation leaves nothing half-set
    _check_common_bad_inputs(layer, "x", channels=3)


def _check_common_bad_inputs(call, name, channels=3):
    """Non-tensor, integer, too few dimensions, NaN and Inf inputs all raise naming ``name``."""
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor"):
        call([[0.5] * channels])
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor"):
        call(torch.ones(2, channels, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"{name} must have shape \\(B, ...\\)"):
        call(torch.full((channels,), 0.5))
    with pytest.raises(ValueError, match=f"{name} must hold at least one sample"):
        call(torch.full((0, channels), 0.5))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.full((4, channels), 0.5)
        x[2, 1] = bad
        with pytest.raises(ValueError, match=rf"{name} contains NaN or Inf \(samples \[2\]\)"):
            call(x)


# --------------------------------------------------------------------------------------------
# Squeeze


@pytest.mark.parametrize("factor", [1, 2, 3])
def test_squeeze_layout(factor):
    x = torch.randn(2, 3, 2 * factor, 3 * factor)
    z, logdet = Squeeze(factor)(x)
    assert z.shape == (2, 3 * factor**2, 2, 3) and torch.equal(logdet, torch.zeros(2))
    for c in range(3):
        for i in range(factor):
            for j in range(factor):
                expected = x[:, c, i::factor, j::factor]
                assert torch.equal(z[:, c * factor**2 + i * factor + j], expected)
    assert Squeeze(factor).output_shape((3, 2 * factor, 3 * factor)) == (3 * factor**2, 2, 3)
    assert Squeeze(factor).input_shape_for((3 * factor**2, 2, 3)) == (3, 2 * factor, 3 * factor)


def test_squeeze_bad_inputs():
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match="factor must be a positive int"):
            Squeeze(bad)
    layer = Squeeze(2)
    with pytest.raises(ValueError, match=r"H and W divisible by factor=2, got \(3, 5, 4\)"):
        layer(torch.randn(2, 3, 5, 4))
    with pytest.raises(ValueError, match=r"H and W divisible by factor=2, got \(3, 4, 3\)"):
        layer(torch.randn(2, 3, 4, 3))
    with pytest.raises(ValueError, match=r"C divisible by factor²=4, got \(6, 2, 2\)"):
        layer.inverse(torch.randn(2, 6, 2, 2))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions, got shape \(2, 4, 4\)"):
        layer(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"z must have 4 dimensions"):
        layer.inverse(torch.randn(2, 4))
    x = torch.randn(2, 1, 2, 2)
    x[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(samples \[1\]\)"):
        layer(x)
    with pytest.raises(ValueError, match="divisible"):
        layer.output_shape((3, 5, 4))


# --------------------------------------------------------------------------------------------
# LogitTransform


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_values(alpha):
    x = torch.rand(4, 6, dtype=torch.float64).clamp(1e-3, 1 - 1e-3)
    if alpha > 0:
        x[0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # edges are allowed
    y, logdet = LogitTransform(alpha)(x)
    s = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.logit(s))
    derivative = (1 - 2 * alpha) / (s * (1 - s))
    torch.testing.assert_close(logdet, derivative.log().sum(1))
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()


def test_logit_inverse_of_any_finite_y():
    layer = LogitTransform(0.05)
    y = 6 * torch.randn(5, 3, dtype=torch.float64)  # beyond logit(0.05) = -2.9 and logit(0.95)
    x, logdet_inv = layer.inverse(y)
    assert torch.isfinite(x).all() and torch.isfinite(logdet_inv).all()
    assert x.min() < 0 and x.max() > 1  # some samples leave [0, 1], within the bounds
    assert x.min() >= -0.05 / 0.9 and x.max() <= 0.95 / 0.9
    # ... and forward takes them back: the support is the whole interval, not [0, 1].
    y_back, logdet = layer(x)
    torch.testing.assert_close(y_back, y)
    torch.testing.assert_close(logdet, -logdet_inv)
    torch.testing.assert_close(logdet_inv, autograd_logdet(layer.inverse, y))
    # Far out, where autograd's sigmoid'(y) = s(1 - s) rounds to 0, the log-det stays finite.
    far = layer.inverse(torch.tensor([[60.0, -60.0]], dtype=torch.float64))[1]
    torch.testing.assert_close(far, torch.tensor([-120.0 - math.log(0.9) * 2], dtype=torch.float64))


def test_logit_bad_arguments_and_inputs():
    for bad in (-0.1, 0.5, 0.7, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 0.5\)"):
            LogitTransform(bad)
    layer = LogitTransform(0.05)
    support = r"x must lie in \(-0.0555556, 1.05556\), the support of LogitTransform\(alpha=0.05\)"
    with pytest.raises(ValueError, match=support + r" .*got values in \[-0.5, 0.5\]"):
        layer(torch.tensor([[0.5, -0.5]]))
    with pytest.raises(ValueError, match=support):
        layer(torch.tensor([[255.0, 0.5]]))  # pixels not scaled to [0, 1]
    with pytest.raises(ValueError, match=support):
        layer(torch.tensor([[0.95 / 0.9, 0.5]], dtype=torch.float64))  # the edge: y = inf
    with pytest.raises(ValueError, match=r"x must lie in \(0, 1\), the support of"):
        LogitTransform(0.0)(torch.tensor([[0.0, 0.5]]))
    _check_common_bad_inputs(layer, "x")
    _check_common_bad_inputs(layer.inverse, "y")


# --------------------------------------------------------------------------------------------
# SequentialFlow


def test_sequential_composes_in_order():
    torch.manual_seed(1)
    a, b, c = ActNorm(3, data_init=False), Invertible1x1Conv(3), ElementwiseAffine((3,))
    with torch.no_grad():
        a.log_scale.normal_()
    flow = SequentialFlow(a, b, c)
    x = torch.randn(4, 3)
    h1, l1 = a(x)
    h2, l2 = b(h1)
    h3, l3 = c(h2)
    z, logdet = flow(x)
    assert torch.equal(z, h3)
    torch.testing.assert_close(logdet, l1 + l2 + l3)
    g2, m2 = c.inverse(z)
    g1, m1 = b.inverse(g2)
    g0, m0 = a.inverse(g1)
    x_rec, logdet_inv = flow.inverse(z)
    assert torch.equal(x_rec, g0)
    torch.testing.assert_close(logdet_inv, m0 + m1 + m2)
    # nn.Sequential behaviour: indexing, slicing (a SequentialFlow), named layers.
    assert flow[1] is b and isinstance(flow[1:], SequentialFlow) and flow[1:][0] is b
    assert torch.equal(flow[1:](h1)[0], z)
    assert [n for n, _ in flow.named_parameters()] == ["0.bias", "0.log_scale", "1.weight",
                                                       "2.log_scale", "2.shift"]  # fmt: skip


def test_sequential_empty_and_shapes():
    flow = SequentialFlow()
    x = torch.randn(3, 2, 4, 4)
    z, logdet = flow(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(3))
    assert torch.equal(flow.inverse(x)[0], x)
    flow = SequentialFlow(Squeeze(), ActNorm(8), Squeeze())
    assert flow.output_shape((2, 4, 8)) == (32, 1, 2)


def test_sequential_bad_layers_and_inputs():
    with pytest.raises(TypeError, match=r"layer '0' \(Linear\) must have an inverse"):
        SequentialFlow(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"layer '1' must be an nn.Module flow layer"):
        SequentialFlow(ActNorm(2), lambda x: x)
    flow = SequentialFlow(ActNorm(2), BadLogdet())
    with pytest.raises(ValueError, match=r"layer '1' \(BadLogdet\).forward must .*logdet of "):
        flow(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(BadLogdet\).inverse"):
        flow.inverse(torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor"):
        flow(3.0)
    x = torch.full((3, 2), 0.5)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        SequentialFlow(ActNorm(2))(x)


def test_an_empty_batch_is_refused_by_every_layer_and_the_flow():
    # It crashed with a bare IndexError in the blocks and ActNorm (found by an audit).
    blocks = [
        ImplicitBlock(LipschitzMLP([2, 8, 2]), LipschitzMLP([2, 8, 2])),
        ResidualBlock(LipschitzMLP([2, 8, 2])),
        ActNorm(2).eval(),
        SequentialFlow(ActNorm(2)),
    ]
    empty = torch.zeros(0, 2)
    for layer in blocks:
        for call, name in ((layer, "x"), (layer.inverse, "z")):
            with pytest.raises(ValueError, match=f"{name} must hold at least one sample"):
                call(empty)
    flow = impflow.Flow(SequentialFlow(*blocks[:2]), event_shape=(2,))
    with pytest.raises(ValueError, match="x must hold at least one sample"):
        flow.log_prob(empty)
