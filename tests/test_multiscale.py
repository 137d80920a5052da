"""MultiScale (factor-out image flow): the latent layout, shape planning, round trips, log-dets
against slogdet of the autograd Jacobian, gradients and errors."""

import pytest
import torch

from impflow.nn import ActNorm, LogitTransform, MultiScale, SequentialFlow, Squeeze
from flow_testing import (
    ChannelDrop,
    ElementwiseAffine,
    Invertible1x1Conv,
    autograd_logdet,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _level(channels, h, w):
    """A trainable level that mixes channels and is nonlinear in none of them."""
    actnorm = ActNorm(channels, data_init=False)
    with torch.no_grad():
        actnorm.bias.normal_()
        actnorm.log_scale.normal_(std=0.2)
    return SequentialFlow(actnorm, Invertible1x1Conv(channels), ElementwiseAffine((channels, h, w)))


def _glow(dtype=torch.float64):
    """Three Glow-style levels on (1, 8, 8): (4, 4, 4) -> (8, 2, 2) -> (16, 1, 1)."""
    levels = [_level(4, 4, 4), _level(8, 2, 2), _level(16, 1, 1)]
    return MultiScale(levels, input_shape=(1, 8, 8)).to(dtype)


def _resflow_layout(dtype=torch.float64):
    """RealNVP / ResFlow layout: squeezes inside the levels, the first level at full size."""
    levels = [
        SequentialFlow(_level(2, 4, 4), Squeeze(), _level(8, 2, 2)),
        SequentialFlow(_level(4, 2, 2), Squeeze(), _level(16, 1, 1)),
    ]
    return MultiScale(levels, input_shape=(2, 4, 4), squeeze_factor=None).to(dtype)


def test_layout_of_the_latent():
    # Identity levels: z must be the squeezed, split input, parts in order.
    levels = [ActNorm(12, data_init=False), ActNorm(24, data_init=False), ActNorm(48)]
    ms = MultiScale(levels, input_shape=(3, 16, 8)).eval()
    assert ms.level_shapes == [
        ((12, 8, 4), (12, 8, 4)), ((24, 4, 2), (24, 4, 2)), ((48, 2, 1), (48, 2, 1)),
    ]  # fmt: skip
    assert ms.latent_shapes == [(6, 8, 4), (12, 4, 2), (48, 2, 1)]
    assert ms.latent_size == 3 * 16 * 8 and ms.output_shape((3, 16, 8)) == (384,)
    x = torch.randn(2, 3, 16, 8)
    z, logdet = ms(x)
    assert z.shape == (2, 384) and torch.equal(logdet, torch.zeros(2))
    squeeze = Squeeze()
    h = squeeze(x)[0]
    expected = [h[:, 6:]]
    h = squeeze(h[:, :6])[0]
    expected += [h[:, 12:], squeeze(h[:, :12])[0]]
    parts = ms.split_latent(z)
    assert [tuple(p.shape) for p in parts] == [(2, *s) for s in ms.latent_shapes]
    assert all(torch.equal(p, e) for p, e in zip(parts, expected))
    assert torch.equal(ms.join_latent(parts), z)
    assert torch.equal(ms.inverse(z)[0], x)


def test_odd_channels_keep_the_larger_half():
    ms = MultiScale([ActNorm(3), ActNorm(2)], input_shape=(3, 2, 2), squeeze_factor=None)
    assert ms.latent_shapes == [(1, 2, 2), (2, 2, 2)]
    x = torch.randn(2, 3, 2, 2)
    z, _ = ms.eval()(x)
    assert torch.equal(ms.split_latent(z)[0], x[:, 2:]) and torch.equal(ms.inverse(z)[0], x)


@pytest.mark.parametrize("build", [_glow, _resflow_layout])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(build, dtype):
    ms = build(dtype)
    x = torch.randn(3, *ms.input_shape, dtype=dtype)
    z, logdet = ms(x)
    assert z.shape == (3, ms.latent_size) and logdet.shape == (3,) and z.dtype == dtype
    x_rec, logdet_inv = ms.inverse(z)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(x_rec, x, atol=tol, rtol=tol)
    torch.testing.assert_close(logdet_inv, -logdet, atol=tol, rtol=tol)


@pytest.mark.parametrize("build", [_glow, _resflow_layout])
def test_logdet_matches_autograd_jacobian(build):
    ms = build()
    x = torch.randn(2, *ms.input_shape, dtype=torch.float64)
    z, logdet = ms(x)
    torch.testing.assert_close(logdet, autograd_logdet(ms, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(
        ms.inverse(z)[1], autograd_logdet(ms.inverse, z), atol=1e-9, rtol=1e-9
    )


def test_with_logit_preprocessing_matches_autograd_jacobian():
    flow = SequentialFlow(LogitTransform(0.05), _glow())
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    z, logdet = flow(x)
    torch.testing.assert_close(logdet, autograd_logdet(flow, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(flow.inverse(z)[0], x, atol=1e-12, rtol=1e-12)


def test_gradients_reach_every_parameter():
    ms = _glow()
    z, logdet = ms(torch.randn(4, 1, 8, 8, dtype=torch.float64))
    (z.square().sum() - logdet.sum()).backward()
    names = [n for n, _ in ms.named_parameters()]
    assert len(names) == 3 * 5  # per level: ActNorm (2), 1x1 conv (1), affine (2)
    for name, p in ms.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_actnorm_levels_initialise_from_data():
    levels = [ActNorm(4), ActNorm(8)]
    ms = MultiScale(levels, input_shape=(1, 4, 4))
    x = 3 * torch.randn(16, 1, 4, 4) + 2
    z, _ = ms(x)
    assert all(level.initialized for level in levels)
    first = ms.split_latent(z)[0]  # (2, 2, 2): the factored half of level 0's normalised output
    per_channel = first.detach().transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(2), atol=1e-5, rtol=0)


def test_bad_construction():
    with pytest.raises(TypeError, match="levels must be a sequence"):
        MultiScale(ActNorm(4), input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="at least one flow layer"):
        MultiScale([], input_shape=(1, 4, 4))
    with pytest.raises(TypeError, match=r"levels\[1\] \(Linear\) must have an inverse"):
        MultiScale([ActNorm(4), torch.nn.Linear(2, 2)], input_shape=(1, 4, 4))
    for bad in ((4, 4), (1, 0, 4), "abc", 5):
        with pytest.raises(ValueError, match="input_shape"):
            MultiScale([ActNorm(4)], input_shape=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="squeeze_factor"):
            MultiScale([ActNorm(4)], input_shape=(1, 4, 4), squeeze_factor=bad)
    # 4x4 fits two squeezes, not three.
    with pytest.raises(ValueError, match=r"does not fit 3 levels.*level 2's input \(4, 1, 1\)"):
        MultiScale([ActNorm(4), ActNorm(8), ActNorm(32)], input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"levels\[0\] outputs \(1, 4, 4\), a single channel"):
        MultiScale([ActNorm(1), ActNorm(1)], input_shape=(1, 4, 4), squeeze_factor=None)
    with pytest.raises(ValueError, match=r"levels\[0\] does not take shape \(1, 3, 4\)"):
        MultiScale([SequentialFlow(Squeeze())], input_shape=(1, 3, 4), squeeze_factor=None)


def test_bad_inputs_and_levels():
    ms = MultiScale([ActNorm(4), ActNorm(8)], input_shape=(1, 4, 4)).eval()
    with pytest.raises(ValueError, match=r"x must have shape \(B, \*input_shape\).*\(2, 1, 4, 6\)"):
        ms(torch.randn(2, 1, 4, 6))
    with pytest.raises(ValueError, match=r"x must have 4 dimensions"):
        ms(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 16\).*got \(2, 15\)"):
        ms.inverse(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"z must have 2 dimensions"):
        ms.inverse(torch.randn(2, 1, 4, 4))
    x = torch.randn(3, 1, 4, 4)
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"x contains NaN or Inf \(samples \[1\]\)"):
        ms(x)
    z = torch.randn(3, 16)
    z[0, 5] = float("nan")
    with pytest.raises(ValueError, match=r"z contains NaN or Inf \(samples \[0\]\)"):
        ms.inverse(z)
    with pytest.raises(ValueError, match=r"expected 2 parts, got 1"):
        ms.join_latent([torch.randn(2, 2, 2, 2)])
    with pytest.raises(ValueError, match=r"parts\[1\] must have shape \(2, 8, 1, 1\)"):
        ms.join_latent([torch.randn(2, 2, 2, 2), torch.randn(2, 8, 1, 2)])
    faulty = MultiScale([ChannelDrop(), ActNorm(8)], input_shape=(1, 4, 4))
    message = r"levels\[0\] \(ChannelDrop\).forward returned per-sample shape \(3, 2, 2\)"
    with pytest.raises(ValueError, match=message):
        faulty(torch.randn(2, 1, 4, 4))
