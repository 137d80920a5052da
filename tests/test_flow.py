"""impflow.Flow (DESIGN.md §1, §5): log_prob against closed-form Gaussian densities, sampling
shapes and consistency, bases, shapes inferred and saved, state_dict round trips, device and
dtype of samples, bits per dimension, and errors on bad input."""

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal

import impflow
import impflow.nn as inn
from impflow import Flow, bits_per_dim
from impflow.nn import ActNorm, LogitTransform, MultiScale, SequentialFlow, Squeeze
from flow_testing import ElementwiseAffine, Invertible1x1Conv, LinearFlow

pytestmark = pytest.mark.usefixtures("one_thread")

D = 3


def _affine(dtype=torch.float64):
    A = torch.randn(D, D, dtype=dtype) + 2 * torch.eye(D, dtype=dtype)
    b = torch.randn(D, dtype=dtype)
    return LinearFlow(A, b), A, b


def _image_flow():
    levels = [SequentialFlow(ActNorm(4), Invertible1x1Conv(4)), SequentialFlow(ActNorm(8))]
    ms = MultiScale(levels, input_shape=(1, 4, 4))
    return Flow(SequentialFlow(LogitTransform(0.05), ms), event_shape=(1, 4, 4))


def test_log_prob_of_an_affine_flow_is_the_gaussian_density():
    transform, A, b = _affine()
    flow = Flow(transform)
    # z = A x + b ~ N(0, I)  <=>  x ~ N(-A⁻¹ b, A⁻¹ A⁻ᵀ)
    A_inv = torch.linalg.inv(A)
    target = MultivariateNormal(-A_inv @ b, covariance_matrix=A_inv @ A_inv.T)
    x = target.sample((50,))
    torch.testing.assert_close(flow.log_prob(x), target.log_prob(x), atol=1e-10, rtol=1e-10)
    assert flow.event_shape == (D,) and flow.latent_shape == (D,)
    assert flow.batch_shape == () and flow.has_rsample
    torch.testing.assert_close(flow(x), flow.log_prob(x))  # forward is log_prob


def test_log_prob_with_a_distribution_base():
    transform, A, b = _affine()
    mean, L = torch.randn(D, dtype=torch.float64), torch.randn(D, D, dtype=torch.float64)
    cov = L @ L.T + torch.eye(D, dtype=torch.float64)
    flow = Flow(transform, base=MultivariateNormal(mean, cov))
    # z = A x + b ~ N(m, S)  <=>  x ~ N(A⁻¹(m - b), A⁻¹ S A⁻ᵀ)
    A_inv = torch.linalg.inv(A)
    target = MultivariateNormal(A_inv @ (mean - b), A_inv @ cov @ A_inv.T)
    x = target.sample((20,))
    torch.testing.assert_close(flow.log_prob(x), target.log_prob(x), atol=1e-10, rtol=1e-10)
    assert flow.latent_shape == (D,)
    samples = flow.sample((4000,))
    assert samples.shape == (4000, D)
    # The sample mean lies within 5 standard errors of the target mean.
    error = (samples.mean(0) - target.mean) / (target.variance / 4000).sqrt()
    assert error.abs().max() < 5


def test_density_of_a_logit_flow_integrates_to_its_mass():
    # x in [0, 1] -> y = logit(α + (1 - 2α) x) ~ N(0, 1): the density of x integrates to
    # Φ(logit(1 - α)) - Φ(logit(α)), which only a correct log-det gives.
    alpha = 0.05
    flow = Flow(LogitTransform(alpha))
    x = torch.linspace(0, 1, 20001, dtype=torch.float64).unsqueeze(1)
    mass = torch.trapezoid(flow.log_prob(x).exp(), x.squeeze(1))
    edge = torch.logit(torch.tensor(1 - alpha, dtype=torch.float64))
    expected = Normal(0.0, 1.0).cdf(edge) - Normal(0.0, 1.0).cdf(-edge)
    torch.testing.assert_close(mass, expected.to(torch.float64), atol=1e-8, rtol=0)


def test_sample_shapes_and_log_prob_consistency():
    transform, _, _ = _affine()
    flow = Flow(transform)
    flow.log_prob(torch.randn(2, D, dtype=torch.float64))  # latent shape learnt here
    assert flow.sample().shape == (D,)
    assert flow.sample((5,)).shape == (5, D) and flow.sample(5).shape == (5, D)
    assert flow.sample((2, 3)).shape == (2, 3, D)
    assert flow.sample((0,)).shape == (0, D)
    x, log_prob = flow.sample_and_log_prob((4, 2))
    assert x.shape == (4, 2, D) and log_prob.shape == (4, 2)
    torch.testing.assert_close(log_prob, flow.log_prob(x), atol=1e-10, rtol=1e-10)
    # Leading sample dimensions in log_prob, and a single sample.
    torch.testing.assert_close(flow.log_prob(x), flow.log_prob(x.reshape(8, D)).reshape(4, 2))
    assert flow.log_prob(x[0, 0]).shape == ()


def test_image_flow_samples_and_log_prob():
    flow = _image_flow()
    assert flow.event_shape == (1, 4, 4) and flow.latent_shape == (16,)
    data = torch.rand(32, 1, 4, 4)
    log_prob = flow.log_prob(data)  # initialises the ActNorms
    assert log_prob.shape == (32,) and torch.isfinite(log_prob).all()
    x, log_prob = flow.sample_and_log_prob((64,))
    assert x.shape == (64, 1, 4, 4) and x.dtype == torch.float32
    outside = ((x < 0) | (x > 1)).reshape(64, -1).any(1)  # within the logit's support
    assert outside.any()  # the case that log_prob refused before
    torch.testing.assert_close(log_prob, flow.log_prob(x), atol=1e-4, rtol=1e-5)


def test_sample_has_no_graph_and_rsample_has_one():
    flow = Flow(SequentialFlow(ElementwiseAffine((D,)), Invertible1x1Conv(D)))
    flow.log_prob(torch.randn(2, D))
    x = flow.sample((3,))
    assert not x.requires_grad
    x, log_prob = flow.sample_and_log_prob((3,))
    assert not x.requires_grad and not log_prob.requires_grad
    x, log_prob = flow.rsample_and_log_prob((3,))
    (x.square().sum() + log_prob.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert flow.rsample((2,)).requires_grad


def test_callable_base_is_registered_trained_and_saved():
    class DiagonalGaussian(nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = nn.Parameter(torch.randn(D))
            self.log_scale = nn.Parameter(torch.zeros(D))

        def forward(self):
            return Independent(Normal(self.loc, self.log_scale.exp()), 1)

    flow = Flow(ElementwiseAffine((D,)), base=DiagonalGaussian())
    assert "base.loc" in flow.state_dict()
    x = torch.randn(5, D)
    z, logdet = flow.transform(x)
    expected = flow.base().log_prob(z) + logdet
    torch.testing.assert_close(flow.log_prob(x), expected)
    (-flow.log_prob(x).mean()).backward()
    assert flow.base.loc.grad is not None and flow.base.loc.grad.abs().sum() > 0
    assert flow.rsample((4,)).shape == (4, D)


def test_event_shape_is_inferred_or_required():
    flow = Flow(SequentialFlow(ElementwiseAffine((D,))))
    assert flow.event_shape is None and flow.latent_shape is None
    with pytest.raises(RuntimeError, match="latent shape is not known yet.*event_shape="):
        flow.sample((2,))
    flow.log_prob(torch.randn(4, D))
    assert flow.event_shape == (D,) and flow.sample((2,)).shape == (2, D)
    with pytest.raises(ValueError, match=r"x must have shape \(\*sample_shape, \*event_shape\)"):
        flow.log_prob(torch.randn(4, D + 1))
    # From the argument, through the transform's output_shape.
    flow = Flow(SequentialFlow(Squeeze(), ActNorm(8)), event_shape=(2, 2, 2))
    assert flow.latent_shape == (8, 1, 1) and flow.eval().sample((3,)).shape == (3, 2, 2, 2)
    # From a MultiScale's input_shape.
    flow = Flow(MultiScale([ActNorm(4, data_init=False)], input_shape=(1, 2, 2)))
    assert flow.event_shape == (1, 2, 2) and flow.latent_shape == (4,)


def test_state_dict_round_trip():
    flow = _image_flow()
    data = torch.rand(16, 1, 4, 4)
    flow.log_prob(data)  # ActNorm initialisation
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(flow.state_dict(), buffer)
    buffer.seek(0)
    levels = [SequentialFlow(ActNorm(4), Invertible1x1Conv(4)), SequentialFlow(ActNorm(8))]
    fresh = Flow(SequentialFlow(LogitTransform(0.05), MultiScale(levels, input_shape=(1, 4, 4))))
    fresh.load_state_dict(
        torch.load(buffer, weights_only=True)
    )  # the safe (weights-only) loader suffices
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(fresh.log_prob(x), flow.log_prob(x))  # training mode: no re-init
    torch.manual_seed(3)
    a = flow.sample((4,))
    torch.manual_seed(3)
    assert torch.equal(fresh.sample((4,)), a)
    # Shapes learnt lazily are saved too.
    lazy = Flow(ElementwiseAffine((D,)))
    lazy.log_prob(torch.randn(2, D))
    other = Flow(ElementwiseAffine((D,)))
    other.load_state_dict(lazy.state_dict())
    assert other.event_shape == (D,) and other.sample((2,)).shape == (2, D)
    mismatched = Flow(ElementwiseAffine((D,)), event_shape=(D + 1,))
    with pytest.raises(ValueError, match="event shape"):
        mismatched.load_state_dict(lazy.state_dict())


def test_samples_follow_the_dtype_of_the_transform_or_the_flow():
    flow = Flow(ElementwiseAffine((D,))).double()
    flow.log_prob(torch.randn(2, D, dtype=torch.float64))
    assert flow.sample((2,)).dtype == torch.float64
    parameter_free = Flow(Squeeze(), event_shape=(1, 2, 2))
    assert parameter_free.sample((2,)).dtype == torch.float32
    assert parameter_free.double().sample((2,)).dtype == torch.float64


def test_bits_per_dim():
    log_prob = torch.tensor([-4 * math.log(2), -8 * math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_prob, 4), torch.tensor([1.0, 2.0]).double())
    torch.testing.assert_close(
        bits_per_dim(log_prob, 4, n_bins=256), torch.tensor([9.0, 10.0]).double()
    )
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_dims"):
            bits_per_dim(log_prob, bad)
    with pytest.raises(ValueError, match="n_bins"):
        bits_per_dim(log_prob, 4, n_bins=1)
    assert impflow.flow.bits_per_dim is bits_per_dim


def test_bad_arguments_and_inputs():
    with pytest.raises(TypeError, match=r"transform \(Linear\) must have an inverse"):
        Flow(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="base must be None, a distribution"):
        Flow(ElementwiseAffine((D,)), base=3.0)
    with pytest.raises(ValueError, match=r"batch_shape \(\).*Independent"):
        Flow(ElementwiseAffine((D,)), base=Normal(torch.zeros(D), torch.ones(D)))
    with pytest.raises(ValueError, match="event_shape must be a sequence of positive ints"):
        Flow(ElementwiseAffine((D,)), event_shape=(0,))
    with pytest.raises(ValueError, match=r"transform does not take event_shape=\(1, 3, 3\)"):
        Flow(Squeeze(), event_shape=(1, 3, 3))
    with pytest.raises(ValueError, match="base.event_shape has per-sample shape"):
        Flow(ElementwiseAffine((D,)), base=MultivariateNormal(torch.zeros(2), torch.eye(2)),
             event_shape=(D,))  # fmt: skip

    flow = Flow(ElementwiseAffine((D,)))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        flow.log_prob([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"x must have shape \(B, ...\)"):
        flow.log_prob(torch.randn(D))  # event shape unknown: batch first
    x = torch.randn(4, D)
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Flow.log_prob: x contains NaN or Inf \(samples \[3\]\)"):
        flow.log_prob(x)
    flow.log_prob(torch.randn(2, D))
    for bad in ((-1,), "ab", (2.5,)):
        with pytest.raises(ValueError, match="sample_shape must be a sequence of ints >= 0"):
            flow.sample(bad)

    class ElementwiseBase(nn.Module):  # one value per entry: a common mistake
        def log_prob(self, z):
            return Normal(0.0, 1.0).log_prob(z)

        def sample(self, shape):
            return torch.randn(*shape, D)

    flow = Flow(ElementwiseAffine((D,)), base=ElementwiseBase())
    with pytest.raises(ValueError, match=r"one value per sample, shape \(4,\).*Independent"):
        flow.log_prob(torch.randn(4, D))
    assert not flow.has_rsample
    with pytest.raises(NotImplementedError, match="no rsample"):
        flow.rsample((2,))


def test_eval_after_training_needs_no_update_lipschitz():
    """A flow evaluated right after training scored its samples with σ of the previous
    weights (per-sample log_prob off by up to 0.48 nats); eval-mode forwards now refresh the
    power iteration of a weight that changed."""
    torch.manual_seed(0)
    nets = [inn.LipschitzMLP([2, 32, 32, 2], coeff=0.9) for _ in range(2)]
    flow = impflow.Flow(inn.ImplicitBlock(*nets))
    opt = torch.optim.Adam(flow.parameters(), lr=3e-2)
    x = torch.randn(256, 2) * torch.tensor([2.0, 0.5])
    for _ in range(10):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    flow.eval()
    with torch.no_grad():
        log_prob = flow.log_prob(x[:64])
        converged = copy.deepcopy(flow)
        inn.update_lipschitz(converged, n_iterations=1000)
        expected = converged.log_prob(x[:64])
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-4)
