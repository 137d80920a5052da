"""The process group of a multi-process (DistributedDataParallel) training run, and the few
collectives the training loop needs.

A run is distributed when it is started by ``torchrun`` with more than one process
(``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in the environment), or when the caller has
already initialised a process group (then the caller also destroys it). The backend is gloo for
a CPU run and NCCL for a CUDA one, unless given; each process of a CUDA run uses the GPU
``cuda:LOCAL_RANK`` when the device is given as plain ``cuda``.

Every collective here is called by every rank at the same point of the loop, with the same
arguments, so that no rank waits on another forever.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["BACKENDS", "ProcessGroup", "rank_seed", "setup_process_group", "torchrun_environment"]

BACKENDS = ("gloo", "nccl")
_TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def torchrun_environment() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``)."""
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s own random stream (e.g. Hutchinson probes), distinct for
    every rank and run seed; rank 0 at step 0 keeps the run seed itself."""
    if rank == 0 and step == 0:
        return seed
    return ((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63


@dataclass
class ProcessGroup:
    """Where this process stands in the run: ``rank`` of ``world_size`` processes.

    ``world_size == 1`` is an ordinary single-process run: every collective below is then a
    no-op, so the loop calls them unconditionally.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Destroys the process group if :func:`setup_process_group` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def from_main(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (e.g. rank 0's decision to stop on time)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def main_value(self, value: float) -> float:
        """Rank 0's ``value``, on every rank (e.g. its training clock)."""
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks of the float64 vector ``values`` (returned on the CPU)."""
        if not self.distributed:
            return values
        values = values.to(self.comm_device, torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def run_on_main(self, fn: Callable, what: str):
        """Runs ``fn()`` on rank 0 only and returns its (picklable) result on every rank.

        If it raises on rank 0, rank 0 re-raises and every other rank raises a copy of its
        error (the same type and message, so every rank reports it alike), or a RuntimeError
        naming ``what`` where the error cannot be copied, rather than waiting for a result
        that never comes.
        """
        if not self.distributed:
            return fn()
        box, error = [None], None
        if self.is_main:
            try:
                box = [("ok", fn())]
            except BaseException as err:  # noqa: BLE001 (tell the other ranks, then raise here)
                box, error = [("failed", _copy_of(err))], err
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        status, result = box[0]
        if status != "ok":
            if isinstance(result, Exception):
                raise result
            raise RuntimeError(f"{what} failed on rank 0 (its error is in rank 0's output)")
        return result


def _copy_of(err: BaseException) -> Exception | None:
    """A copy of ``err`` that other ranks can raise, or None: a broadcast of something that does
    not pickle would fail on rank 0 alone and leave the other ranks waiting."""
    if not isinstance(err, Exception):  # Ctrl-C and exits reach every rank by themselves
        return None
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 (any failure to copy: send none)
        return None


def _resolve_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup_process_group(
    device: torch.device, distributed: bool | None = None, backend: str | None = None
) -> tuple[ProcessGroup, torch.device]:
    """Joins (or creates) the run's process group; returns it and this process's device.

    Args:
        device: the run's device; plain ``cuda`` becomes ``cuda:LOCAL_RANK``.
        distributed: ``None`` detects a torchrun environment or an initialised group; ``True``
            requires one; ``False`` runs as a single process whatever the environment says.
        backend: ``"gloo"`` or ``"nccl"``; by default gloo on the CPU and NCCL on CUDA.

    Raises:
        ValueError: an unknown backend, NCCL without a CUDA device, or ``distributed=True``
            without torchrun or a process group.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if distributed is False:
        return ProcessGroup(), device
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    elif torchrun_environment():
        world_size = int(os.environ["WORLD_SIZE"])
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    else:
        world_size = rank = local_rank = 0
    if world_size <= 1 and not initialised:
        if distributed:
            raise ValueError(
                "distributed training needs torchrun (WORLD_SIZE > 1, RANK, LOCAL_RANK set) or "
                "an initialised torch.distributed process group"
            )
        return ProcessGroup(), device
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; cannot train on ranks")
    device = _resolve_device(device, local_rank)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got device {device}")
    if not initialised:
        dist.init_process_group(backend, init_method="env://", world_size=world_size, rank=rank)
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    group = ProcessGroup(rank, world_size, local_rank, not initialised, comm_device)
    return group, device
