"""Runs the training loop's multi-process scenarios in each rank of
``torchrun --nproc_per_node 2 tests/ddp_train_worker.py RESULTS``; test_train_ddp.py starts it
and compares what it leaves in RESULTS with one process.

The process group is created here once, from torchrun's environment, and each scenario calls
:func:`impflow.train.loop.train` in it (a process group cannot be created again after it is
destroyed under torchrun; the CLI, which creates its own, is tested separately). Each records,
per rank, what this rank saw in ``RESULTS/seen/<scenario>/rank<r>.json``: the number of calls
of the task's loss and evaluation, the returned metrics and any error.
"""

import json
import math
import os
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

import impflow.train.loop as loop
from impflow.flow import Flow
from impflow.nn import ActNorm, SequentialFlow
from impflow.train.loop import NonFiniteLossError, TrainSettings, train
from impflow.train.models import block
from impflow.train.toy import ToyTask

STEPS = 6


class MixedToy(ToyTask):
    """ActNorm (data-dependent initialisation), an ImplicitBlock and a ResidualBlock, exact
    log-determinants, on 8gaussians; records the batches its loss sees and the seed of torch's
    global generator, counts its loss and evaluation calls, and returns a
    non-finite loss on rank ``nan_rank`` at its ``nan_call``-th loss call (a fresh
    multi-process run calls the loss once before its first step, to initialise ActNorm from
    the first global batch)."""

    def __init__(self, batch_size=16, nan_rank=None, nan_call=None):
        super().__init__("8gaussians", "implicit", 2, hidden=(8,), batch_size=batch_size)
        self.loss_calls = self.evaluate_calls = 0
        self.batches, self.global_seed = [], None
        self.nan_rank, self.nan_call = nan_rank, nan_call

    def build_model(self):
        def one(kind):
            return block(kind, 2, self.hidden, activation="sin", coeff=0.9,
                         n_power_iterations=5, logdet="exact")  # fmt: skip

        return Flow(SequentialFlow(ActNorm(2), one("implicit"), one("residual")), event_shape=(2,))

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.loss_calls += 1
        self.batches.append(batch.tolist())
        self.global_seed = torch.initial_seed()
        if _rank() == self.nan_rank and self.loss_calls == self.nan_call:
            loss = loss * math.nan
        return loss, metrics

    def evaluate(self, model):
        self.evaluate_calls += 1
        return {"evaluated_on": _rank()}

    def figures(self, model, out):
        return []


def settings(out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("dtype", "float64")
    kw.setdefault("log_every", 1)
    return TrainSettings(out=Path(out), **kw)


def _rank():
    return int(os.environ.get("RANK", "0"))


def _run(task, *runs):
    """Runs ``train`` once per settings in ``runs``; returns what this rank saw."""
    seen = {"rank": _rank(), "metrics": None, "error": None}
    try:
        for s in runs:
            seen["metrics"] = train(task, s)
    except (NonFiniteLossError, ValueError) as err:
        seen["error"] = f"{type(err).__name__}: {err}"
    seen["loss_calls"], seen["evaluate_calls"] = task.loss_calls, task.evaluate_calls
    seen["batches"], seen["global_seed"] = task.batches, task.global_seed
    return seen


def main(results: Path) -> None:
    rank = _rank()
    scenarios = {}
    # One process per output folder: rank 1 writing anything would create results/equal/rank1.
    scenarios["equal"] = lambda: _run(
        MixedToy(), settings(results / "equal" / f"rank{rank}", steps=STEPS, ckpt_every=2)
    )
    scenarios["resume"] = lambda: _run(
        MixedToy(),
        settings(results / "resume", steps=STEPS // 2),
        settings(results / "resume", steps=STEPS, resume=True),
    )
    scenarios["nan"] = lambda: _run(
        MixedToy(nan_rank=1, nan_call=5), settings(results / "nan", steps=20, ckpt_every=2)
    )
    scenarios["odd_batch"] = lambda: _run(
        MixedToy(batch_size=15), settings(results / "odd_batch", steps=2)
    )

    def budget():
        # Rank 1's clock runs 50 times fast: were it to decide for itself it would stop long
        # before rank 0 and leave rank 0 waiting in a collective (the test then times out).
        if rank == 1:
            loop.time = types.SimpleNamespace(perf_counter=lambda: 50 * time.perf_counter())
        try:
            return _run(MixedToy(), settings(results / "budget", steps=10**6, time_budget=1.0))
        finally:
            loop.time = time

    scenarios["budget"] = budget

    for name, scenario in scenarios.items():
        seen = scenario()
        folder = results / "seen" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        main(Path(sys.argv[1]))
    finally:
        dist.destroy_process_group()
