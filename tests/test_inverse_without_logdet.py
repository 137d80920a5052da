"""``inverse(z, logdet=False)`` of every flow layer, and sampling without the log-determinant:
the same ``x`` as ``inverse(z)`` with ``None`` for the log-det, no log-det work at all (spies on
the exact Jacobian, the series estimator, ActNorm's and the logit's log-dets, and the random
state that the series' probes would use), the flag passed down by the containers, user layers
without the flag (full inverse, log-det dropped, never retried), ``Flow.sample`` / ``rsample``
against ``sample_and_log_prob`` / ``rsample_and_log_prob``, gradients through the samples, and
the training task's sample figure."""

import pytest
import torch
from torch import nn

import impflow.nn._flow_common as flow_common
import impflow.nn._implicit as implicit_machinery
from impflow import Flow
from impflow.logdet import RouletteLogdet, exact_logdet
from impflow.solvers import SolverWarning
from impflow.nn import (
    ActNorm,
    ImplicitBlock,
    ImplicitSolveError,
    LogitTransform,
    MultiScale,
    ResidualBlock,
    SequentialFlow,
    Squeeze,
)
from block_testing import convnet, mlp
from flow_testing import ElementwiseAffine, Invertible1x1Conv

pytestmark = pytest.mark.usefixtures("one_thread")

# What the brief of this feature allows between the x of the two paths (float32 included);
# on the CPU they are in fact bitwise equal.
SAME_X = {"atol": 1e-6, "rtol": 0.0}
TIGHT = {"tol": 1e-13}


class LogdetWorkDone(AssertionError):
    """Raised by the spies: some log-determinant work ran."""


def _raise(*args, **kwargs):
    raise LogdetWorkDone("log-det work ran")


def _spy_on_logdet_work(monkeypatch):
    """Every source of log-det work raises: the exact term's Jacobian, the series estimator,
    ActNorm's and LogitTransform's log-dets."""
    monkeypatch.setattr(implicit_machinery, "value_and_jacobian", _raise)
    monkeypatch.setattr(RouletteLogdet, "forward", _raise)
    monkeypatch.setattr(ActNorm, "_logdet", _raise)
    monkeypatch.setattr(LogitTransform, "_logdet", _raise)


@pytest.fixture
def no_logdet_work(monkeypatch):
    _spy_on_logdet_work(monkeypatch)


def _actnorm(channels):
    layer = ActNorm(channels, data_init=False)
    with torch.no_grad():
        layer.log_scale.normal_(0, 0.3)
        layer.bias.normal_()
    return layer


def _image_multiscale():
    # (1, 4, 4) -> squeeze (4, 2, 2) -> level 0 -> keep 2 -> squeeze (8, 1, 1) -> level 1.
    levels = [
        SequentialFlow(_actnorm(4), ResidualBlock(convnet(4, (2, 2)), logdet="series")),
        SequentialFlow(Invertible1x1Conv(8), ImplicitBlock(convnet(8, (1, 1)), convnet(8, (1, 1)))),
    ]
    return MultiScale(levels, input_shape=(1, 4, 4))


def _layers():
    """name -> (layer in eval mode, z, whether it does log-det work that a spy sees)."""
    return {
        "actnorm": (_actnorm(3), torch.randn(5, 3, 2, 2), True),
        "squeeze": (Squeeze(2), torch.randn(2, 8, 2, 2), False),
        "logit": (LogitTransform(0.05), torch.randn(4, 6), True),
        "implicit_exact": (ImplicitBlock(mlp(3), mlp(3), logdet="exact"), torch.randn(6, 3), True),
        "implicit_series": (
            ImplicitBlock(mlp(3), mlp(3), logdet="series"),
            torch.randn(6, 3),
            True,
        ),
        "implicit_image": (
            ImplicitBlock(convnet(2, (4, 4)), convnet(2, (4, 4))),  # auto: series (d = 32)
            torch.randn(3, 2, 4, 4),
            True,
        ),
        "residual_exact": (ResidualBlock(mlp(3), logdet="exact"), torch.randn(6, 3), True),
        "residual_series": (ResidualBlock(mlp(3), logdet="series"), torch.randn(6, 3), True),
        "residual_image": (
            ResidualBlock(convnet(2, (4, 4))),
            torch.randn(3, 2, 4, 4),
            True,
        ),
        "sequential": (
            SequentialFlow(
                _actnorm(3),
                ImplicitBlock(mlp(3), mlp(3)),
                ElementwiseAffine((3,)),  # a user layer without the flag
                ResidualBlock(mlp(3), logdet="series"),
                LogitTransform(0.05),
            ),
            torch.randn(6, 3),
            True,
        ),
        "multiscale": (_image_multiscale(), torch.randn(3, 16), True),
    }


LAYERS = list(_layers())


def _layer(name, dtype=torch.float32):
    layer, z, spied = _layers()[name]
    return layer.to(dtype).eval(), z.to(dtype), spied


# --------------------------------------------------------------------------------------------
# Each layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", LAYERS)
def test_same_x_and_no_logdet(name, dtype):
    layer, z, _ = _layer(name, dtype)
    with torch.no_grad():
        x_full, logdet_inv = layer.inverse(z)
        x, none = layer.inverse(z, logdet=False)
    assert none is None and logdet_inv.shape == (z.shape[0],)
    assert x.shape == x_full.shape and x.dtype == dtype
    torch.testing.assert_close(x, x_full, **SAME_X)
    torch.testing.assert_close(layer.inverse(z, logdet=True)[0], x_full, **SAME_X)


@pytest.mark.parametrize("name", LAYERS)
def test_no_logdet_work_is_done(name, monkeypatch):
    layer, z, spied = _layer(name)
    with torch.no_grad():
        x_ref = layer.inverse(z)[0]
        before = torch.get_rng_state()
        # The spies raise on any log-det work; the random state shows that no probe of a
        # series was drawn either.
        _spy_on_logdet_work(monkeypatch)
        x, _ = layer.inverse(z, logdet=False)
        assert torch.equal(torch.get_rng_state(), before)
        torch.testing.assert_close(x, x_ref, **SAME_X)
        if spied:  # the spies are live: the default path runs into them
            with pytest.raises(LogdetWorkDone):
                layer.inverse(z)


@pytest.mark.parametrize("block_kind", ["implicit", "residual"])
def test_custom_estimator_is_not_called(block_kind):
    calls = []

    def estimator(g, t):
        calls.append(t.shape)
        return exact_logdet(g, t)

    if block_kind == "implicit":
        block = ImplicitBlock(mlp(4), mlp(4), logdet=estimator).eval()
    else:
        block = ResidualBlock(mlp(4), logdet=estimator).eval()
    z = torch.randn(5, 4)
    with torch.no_grad():
        x_full, _ = block.inverse(z)
        assert len(calls) == (2 if block_kind == "implicit" else 1)
        calls.clear()
        x, _ = block.inverse(z, logdet=False)
    assert calls == []
    torch.testing.assert_close(x, x_full, **SAME_X)
    # The statistics of the solve are kept; those of the log-det are empty.
    assert block.last_stats.inverse.all_converged and block.last_stats.logdet == ()


@pytest.mark.parametrize("name", LAYERS)
def test_bad_flag_is_an_error(name):
    layer, z, _ = _layer(name)
    for bad in ("no", None, 0):
        with pytest.raises(TypeError, match=r"logdet must be True or False"):
            layer.inverse(z, logdet=bad)


def test_failed_solves_are_still_reported():
    class Exploding(nn.Module):
        def forward(self, x):
            return x * float("inf")

    z = torch.randn(3, 2)
    with pytest.warns(SolverWarning, match=r"ResidualBlock.inverse: the solve for x"):
        ResidualBlock(Exploding()).inverse(z, logdet=False)
    with pytest.raises(ImplicitSolveError, match=r"did not converge for 3 of 3"):
        ResidualBlock(Exploding(), on_failure="raise").inverse(z, logdet=False)
    block = ImplicitBlock(Exploding(), mlp(2), on_failure="raise")  # g_x: the solve's
    with pytest.raises(ImplicitSolveError, match=r"ImplicitBlock.inverse: the solve for x"):
        block.inverse(z, logdet=False)
    with pytest.raises(ValueError, match=r"z contains NaN or Inf"):
        block.inverse(torch.full((2, 2), float("nan")), logdet=False)


# --------------------------------------------------------------------------------------------
# Containers and user layers


class CountingUserLayer(nn.Module):
    """A user's layer whose inverse has no ``logdet`` parameter; counts its calls."""

    def __init__(self, fail=False):
        super().__init__()
        self.calls, self.fail = 0, fail

    def forward(self, x):
        return 2 * x, torch.full((x.shape[0],), 0.6931471805599453 * x[0].numel())

    def inverse(self, z):
        self.calls += 1
        if self.fail:
            raise TypeError("a bug inside the user's inverse")
        return z / 2, torch.full((z.shape[0],), -0.6931471805599453 * z[0].numel())


class FlagUserLayer(CountingUserLayer):
    """A user's layer that takes the flag (positional-or-keyword) and records it."""

    def inverse(self, z, logdet=True):
        self.calls += 1
        self.seen = logdet
        return z / 2, (torch.full((z.shape[0],), -0.69314718 * z[0].numel()) if logdet else None)


class KwargsUserLayer(CountingUserLayer):
    """A wrapper-style inverse with ``**kwargs``: not taken as accepting the flag."""

    def inverse(self, z, **kwargs):
        assert kwargs == {}, "the flag must not reach a **kwargs inverse"
        return super().inverse(z)


def test_sequential_passes_the_flag_and_falls_back_for_user_layers(no_logdet_work):
    user, flagged, kwargs = CountingUserLayer(), FlagUserLayer(), KwargsUserLayer()
    flow = SequentialFlow(
        ImplicitBlock(mlp(3), mlp(3)), user, flagged, kwargs, ResidualBlock(mlp(3))
    ).eval()
    z = torch.randn(4, 3)
    with torch.no_grad():
        x, logdet = flow.inverse(z, logdet=False)
    assert logdet is None
    assert user.calls == 1 and kwargs.calls == 1 and flagged.calls == 1
    assert flagged.seen is False
    with pytest.raises(LogdetWorkDone):  # the blocks' log-dets: the spies are live
        flow.inverse(z)


def test_sequential_without_logdet_matches_with_logdet():
    flagged = FlagUserLayer()
    flow = SequentialFlow(
        _actnorm(3), ImplicitBlock(mlp(3), mlp(3)), CountingUserLayer(), flagged
    ).eval()
    z = torch.randn(4, 3)
    with torch.no_grad():
        x_full, logdet_inv = flow.inverse(z)
        assert flagged.seen is True and logdet_inv.shape == (4,)
        x, none = flow.inverse(z, logdet=False)
    assert none is None and flagged.seen is False
    torch.testing.assert_close(x, x_full, **SAME_X)


def test_errors_inside_a_user_inverse_propagate_and_are_not_retried():
    user = CountingUserLayer(fail=True)
    flow = SequentialFlow(ResidualBlock(mlp(2)), user).eval()
    with pytest.raises(TypeError, match=r"a bug inside the user's inverse"):
        flow.inverse(torch.randn(3, 2), logdet=False)
    assert user.calls == 1


def test_user_layer_outputs_are_still_checked():
    class DropsBatch(CountingUserLayer):
        def inverse(self, z, logdet=True):
            return z[1:], None

    class WrongLogdet(CountingUserLayer):
        def inverse(self, z):
            return z, torch.zeros_like(z)  # one value per entry, not per sample

    z = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"layer '0' \(DropsBatch\).inverse must keep"):
        SequentialFlow(DropsBatch()).inverse(z, logdet=False)
    with pytest.raises(ValueError, match=r"layer '0' \(WrongLogdet\).inverse must keep"):
        SequentialFlow(WrongLogdet()).inverse(z, logdet=False)
    with pytest.raises(TypeError, match=r"must return two tensors"):
        SequentialFlow(DropsBatch()).inverse(z)  # None where a log-det is asked for


def test_whether_a_layer_takes_the_flag_is_decided_once_per_implementation(monkeypatch):
    decided = []
    original = flow_common._signature_takes_logdet

    def counting(method):
        decided.append(method.__func__.__qualname__)
        return original(method)

    monkeypatch.setattr(flow_common, "_signature_takes_logdet", counting)
    monkeypatch.setattr(flow_common, "_TAKES_LOGDET", type(flow_common._TAKES_LOGDET)())
    flow = SequentialFlow(
        CountingUserLayer(), CountingUserLayer(), ResidualBlock(mlp(2)), CountingUserLayer()
    ).eval()
    with torch.no_grad():
        for _ in range(3):
            flow.inverse(torch.randn(3, 2), logdet=False)
    assert sorted(decided) == ["CountingUserLayer.inverse", "ResidualBlock.inverse"]
    assert flow_common.inverse_takes_logdet(flow[2])
    assert not flow_common.inverse_takes_logdet(flow[0])


def test_multiscale_passes_the_flag_to_its_levels(no_logdet_work):
    user = CountingUserLayer()
    levels = [SequentialFlow(ResidualBlock(convnet(4, (2, 2))), user), ActNorm(8)]
    ms = MultiScale(levels, input_shape=(1, 4, 4)).eval()
    z = torch.randn(3, 16)
    with torch.no_grad():
        x, logdet = ms.inverse(z, logdet=False)
    assert logdet is None and x.shape == (3, 1, 4, 4) and user.calls == 1
    with pytest.raises(LogdetWorkDone):
        ms.inverse(z)


# --------------------------------------------------------------------------------------------
# Flow


def _flow(dtype=torch.float32, tight=False):
    solvers = {"forward_solver": TIGHT, "inverse_solver": TIGHT} if tight else {}
    adjoint = {"adjoint_solver": {"method": "exact", "tol": 1e-13}} if tight else {}
    transform = SequentialFlow(
        _actnorm(3),
        ImplicitBlock(mlp(3), mlp(3), logdet="exact", **solvers, **adjoint),
        ElementwiseAffine((3,)),
        ResidualBlock(
            mlp(3),
            logdet="series",
            **{k: v for k, v in solvers.items() if k != "forward_solver"},
            **adjoint,
        ),
    )
    return Flow(transform, event_shape=(3,)).to(dtype).eval()


def test_flow_sample_equals_the_x_of_sample_and_log_prob():
    flow = _flow()
    torch.manual_seed(3)
    x = flow.sample((4, 5))
    torch.manual_seed(3)
    x_ref, log_prob = flow.sample_and_log_prob((4, 5))
    assert x.shape == (4, 5, 3) and log_prob.shape == (4, 5) and not x.requires_grad
    torch.testing.assert_close(x, x_ref, **SAME_X)
    torch.manual_seed(3)
    torch.testing.assert_close(flow.rsample((4, 5)), x_ref, **SAME_X)


def test_flow_sample_does_no_logdet_work(no_logdet_work):
    flow = _flow()
    assert flow.sample((6,)).shape == (6, 3)
    assert flow.rsample((6,)).shape == (6, 3)
    with pytest.raises(LogdetWorkDone):
        flow.sample_and_log_prob((6,))
    with pytest.raises(LogdetWorkDone):
        flow.rsample_and_log_prob((6,))


def test_flow_sample_with_a_user_transform_without_the_flag():
    user = CountingUserLayer()
    flow = Flow(user, event_shape=(2,))
    torch.manual_seed(1)
    x = flow.sample((7,))
    torch.manual_seed(1)
    x_ref, _ = flow.sample_and_log_prob((7,))
    assert torch.equal(x, x_ref) and user.calls == 2


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def test_rsample_gradients_match_those_through_rsample_and_log_prob():
    flow = _flow(torch.float64, tight=True)
    params = list(flow.parameters())
    torch.manual_seed(7)
    x = flow.rsample((6,))
    (x.sin().sum() + (x**2).sum()).backward()
    fast = _grads(params)
    flow.zero_grad()
    torch.manual_seed(7)
    x_ref, _ = flow.rsample_and_log_prob((6,))  # the loss ignores log_prob: only x's gradient
    (x_ref.sin().sum() + (x_ref**2).sum()).backward()
    torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=0)
    for p, g, g_ref in zip(params, fast, _grads(params)):
        assert g_ref.abs().sum() > 0
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("block_kind", ["implicit", "residual"])
@pytest.mark.parametrize("dim", [3, 12])  # 12: series log-det, Broyden adjoint
def test_block_gradients_through_x_match_the_logdet_path(block_kind, dim):
    adjoint = {"tol": 1e-13} if dim > 10 else {"method": "exact", "tol": 1e-13}
    if block_kind == "implicit":
        block = ImplicitBlock(mlp(dim), mlp(dim), inverse_solver=TIGHT, adjoint_solver=adjoint)
    else:
        block = ResidualBlock(mlp(dim), inverse_solver=TIGHT, adjoint_solver=adjoint)
    block = block.double().eval()
    params = list(block.parameters())
    z0 = torch.randn(5, dim, dtype=torch.float64)
    weights = torch.randn(5, dim, dtype=torch.float64)
    grads = []
    for flag in (False, True):
        block.zero_grad()
        z = z0.clone().requires_grad_(True)
        x, _ = block.inverse(z, logdet=flag)
        (weights * x.tanh()).sum().backward()
        grads.append([z.grad] + _grads(params))
    for g, g_ref in zip(*grads):
        torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=1e-8)


def test_gradcheck_of_the_inverse_without_logdet():
    block = ImplicitBlock(
        mlp(3),
        mlp(3),
        inverse_solver=TIGHT,
        adjoint_solver={"method": "exact", "tol": 1e-13},
    )
    block = block.double().eval()
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: block.inverse(t, logdet=False)[0], (z,))


# --------------------------------------------------------------------------------------------
# The training task's figures


def test_image_sample_figure_needs_no_logdet(tmp_path, no_logdet_work):
    from test_train_tasks import tiny_digits

    task = tiny_digits()
    model = task.build_model().eval()
    paths = task.figures(model, tmp_path)
    assert paths and paths[0].stat().st_size > 1000
