"""Implicit gradients under DistributedDataParallel: two CPU processes (gloo), each with half the
batch, give the parameter gradients of one process on the whole batch (DESIGN.md §1, §7: the
gradients reach the parameters through ordinary autograd, where DDP's reducer sees them).
The CUDA case runs the two processes on one GPU, with gloo (NCCL refuses two ranks on one
device; a machine with one GPU cannot test NCCL)."""

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import impflow
import impflow.nn as inn
from testing import DEVICES

# One intra-op thread: on a shared 2-core machine more threads only wait on each other.
pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 12
DIM = 3


def _model():
    """A flow with an ImplicitBlock and a ResidualBlock; exact log-dets and adjoints, so the
    result is deterministic."""
    torch.manual_seed(0)

    def mlp():
        return inn.LipschitzMLP([DIM, 16, 16, DIM], activation="lipswish", coeff=0.9)

    tight = {"tol": 1e-12}
    transform = inn.SequentialFlow(
        inn.ImplicitBlock(mlp(), mlp(), logdet="exact", forward_solver=tight),
        inn.ActNorm(DIM, data_init=False),
        inn.ResidualBlock(mlp(), logdet="exact"),
    )
    return impflow.Flow(transform, event_shape=(DIM,)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, DIM, dtype=torch.float64, generator=gen)


def _grads(model):
    return {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def _worker(rank, world_size, init_file, state_path, out_dir, device):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    ddp = loss = None
    try:
        model = _model().to(device)
        model.load_state_dict(torch.load(state_path, weights_only=True))
        device_ids = [torch.device(device).index or 0] if device != "cpu" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        x = _data().to(device).chunk(world_size)[rank]
        loss = -ddp(x).mean()  # Flow.forward is log_prob
        loss.backward()
        torch.save(_grads(model), os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        # DistributedDataParallel sits in reference cycles: free it while its process group
        # exists (freed at interpreter exit instead, it can abort the process with SIGABRT).
        ddp = loss = None
        gc.collect()
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("device", DEVICES)
def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path, device):
    model = _model().to(device)
    state_path = tmp_path / "state.pt"
    torch.save(model.state_dict(), state_path)

    # One process, whole batch (after saving the state: a training-mode forward runs power
    # iteration, which changes the buffers).
    loss = -model(_data().to(device)).mean()
    loss.backward()
    reference = _grads(model)

    world_size = 2
    mp.spawn(
        _worker,
        args=(world_size, str(tmp_path / "init"), str(state_path), str(tmp_path), device),
        nprocs=world_size,
        join=True,
    )
    for rank in range(world_size):
        grads = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert grads.keys() == reference.keys()
        for name, ref in reference.items():
            assert ref.abs().max() > 0, name  # every parameter gets a gradient
            err = float((grads[name] - ref).abs().max() / ref.abs().max())
            assert err < 1e-5, (rank, name, err)
