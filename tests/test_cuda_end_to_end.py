"""The whole stack on a GPU against the same computation on the CPU: the solvers, both blocks
(vector and image, forward, inverse, gradients), a Flow, `update_lipschitz` and a few training
steps with an exact resume. The op tests compare each kernel alone; these catch what only shows
when the pieces meet on CUDA tensors (device of statistics, generators, buffers, workspaces).
Every test here needs a GPU and is skipped without one."""

import copy

import pytest
import torch

import impflow.nn as inn
from impflow import Flow
from impflow.solvers import anderson, broyden, fixed_point
from impflow.train.checkpoint import load_checkpoint
from impflow.train.loop import TrainSettings, train
from impflow.train.toy import ToyTask
from testing import HAS_CUDA, rel_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
]

SOLVERS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}


def on_both(module):
    """The module (float64, CPU) and an independent copy of it on the GPU."""
    cpu = module.double()
    return cpu, copy.deepcopy(cpu).cuda()


def grads(module, x):
    return [p.grad for p in module.parameters()] + [x.grad]


def assert_close_to_cpu(cuda_values, cpu_values, tol=1e-9):
    assert len(cuda_values) == len(cpu_values)  # zip(strict=True) needs Python 3.10
    for i, (a, b) in enumerate(zip(cuda_values, cpu_values)):
        assert a.device.type == "cuda", i
        assert rel_error(a, b) < tol, (i, rel_error(a, b))


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("shape", [(300, 2), (7, 3, 5, 5)])
def test_solver_on_cuda_finds_the_cpu_root(method, shape):
    gen = torch.Generator().manual_seed(1)
    n = shape[1] if len(shape) == 2 else shape[1] * shape[2] * shape[3]
    W = torch.randn(n, n, generator=gen, dtype=torch.float64)
    W *= 0.8 / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)

    def problem(device):
        Wd, xd = W.to(device), x.to(device)
        return lambda z: torch.tanh(z.flatten(1) @ Wd.T).view_as(z) + xd - z

    solve = SOLVERS[method]
    z_cpu, stats_cpu = solve(
        problem("cpu"), torch.zeros(shape, dtype=torch.float64), tol=1e-10, max_iter=300
    )
    z_gpu, stats_gpu = solve(
        problem("cuda"),
        torch.zeros(shape, dtype=torch.float64, device="cuda"),
        tol=1e-10,
        max_iter=300,
    )
    assert bool(stats_cpu.converged.all())
    assert bool(stats_gpu.converged.all()), stats_gpu.residual.max()
    assert stats_gpu.residual.device.type == "cuda"
    assert rel_error(z_gpu, z_cpu) < 1e-9


@pytest.mark.parametrize("kind", ["vector", "image"])
@pytest.mark.parametrize("block", ["implicit", "residual"])
def test_block_on_cuda_matches_cpu(kind, block):
    if kind == "vector":
        nets, shape = [inn.LipschitzMLP([3, 16, 16, 3], coeff=0.9) for _ in range(2)], (3,)
    else:
        nets = [inn.LipschitzConvNet(2, 8, coeff=0.9, input_size=(4, 4)) for _ in range(2)]
        shape = (2, 4, 4)
    solver = {"tol": 1e-11, "max_iter": 200}
    options = {"logdet": "exact", "forward_solver": solver, "inverse_solver": solver}
    if block == "implicit":
        module = inn.ImplicitBlock(*nets, **options)
    else:
        options.pop("forward_solver")  # a residual block's forward is explicit
        module = inn.ResidualBlock(nets[0], **options)
    cpu, gpu = on_both(module)
    x = torch.randn(5, *shape, dtype=torch.float64)
    outputs = {}
    for name, m in (("cpu", cpu), ("cuda", gpu)):
        xd = x.clone().to(name).requires_grad_()  # a leaf on each device
        z, logdet = m(xd)
        (z.square().sum() + logdet.sin().sum()).backward()
        with torch.no_grad():
            x_back, logdet_inv = m.inverse(z.detach())
        outputs[name] = [z.detach(), logdet.detach(), x_back, logdet_inv, *grads(m, xd)]
    assert_close_to_cpu(outputs["cuda"], outputs["cpu"], tol=1e-8)
    assert rel_error(outputs["cuda"][2], x) < 1e-6  # inverse(forward(x)) == x


def test_flow_log_prob_and_sample_on_cuda_match_cpu():
    layers = [
        inn.ActNorm(3),
        inn.ImplicitBlock(inn.LipschitzMLP([3, 16, 3]), inn.LipschitzMLP([3, 16, 3])),
    ]
    cpu, gpu = on_both(Flow(inn.SequentialFlow(*layers), event_shape=(3,)))
    x = torch.randn(64, 3, dtype=torch.float64)
    cpu.log_prob(x)  # ActNorm's data-dependent initialisation, then copy the initialised state
    gpu.load_state_dict(cpu.state_dict())
    assert_close_to_cpu([gpu.log_prob(x.cuda()).detach()], [cpu.log_prob(x).detach()], tol=1e-8)
    samples = gpu.sample((32,))
    assert samples.shape == (32, 3) and samples.device.type == "cuda"
    assert bool(torch.isfinite(samples).all())


def test_update_lipschitz_on_cuda_matches_cpu():
    module = torch.nn.Sequential(
        inn.LipschitzMLP([6, 32, 32, 6], coeff=0.9), inn.LipschitzConvNet(2, 8, input_size=(5, 5))
    )
    cpu, gpu = on_both(module)
    inn.update_lipschitz(cpu, 7)
    inn.update_lipschitz(gpu, 7)
    cpu_buffers = dict(cpu.named_buffers())
    for name, buffer in gpu.named_buffers():
        assert buffer.device.type == "cuda", name
        assert rel_error(buffer, cpu_buffers[name]) < 1e-9, name


class TinyToy(ToyTask):
    """A few steps of the toy task without its (slow, separately tested) evaluation."""

    def __init__(self):
        super().__init__("8gaussians", "implicit", 1, hidden=(16,), batch_size=64)

    def evaluate(self, model):
        return {}

    def figures(self, model, out):
        return []


def test_training_on_cuda_resumes_exactly(tmp_path):
    def run(out, steps, resume=False):
        settings = TrainSettings(
            out=out, steps=steps, resume=resume, device="cuda", progress=False, ckpt_every=10**6
        )
        train(TinyToy(), settings)
        return load_checkpoint(out / "checkpoint.pt")

    straight = run(tmp_path / "straight", 12)
    run(tmp_path / "split", 6)
    split = run(tmp_path / "split", 12, resume=True)
    assert straight["step"] == split["step"] == 12
    for key, value in straight["model"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(split["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
