"""Multi-process training (issue 6, item 4): ``torchrun --nproc_per_node 2`` with gloo on the CPU
against one process on the same global batch.

Two torchrun launches: the real CLI (``-m impflow.train toy``), and tests/ddp_train_worker.py,
which runs several scenarios in one process group (equality with one process, resume, a time
budget, a NaN on one rank, an uneven batch). Every model here has exact log-determinants and
runs in float64, so two processes follow one process up to rounding.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ddp_train_worker import STEPS, MixedToy, settings
from impflow.train.checkpoint import load_checkpoint
from impflow.train.cli import main
from impflow.train.distributed import rank_seed, setup_process_group
from impflow.train.loop import train

pytestmark = [
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
    pytest.mark.usefixtures("one_thread"),
]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds; a rank stuck in a collective fails the test instead of blocking CI
RTOL, ATOL = 1e-9, 1e-11  # float64; the runs differ by summation order only


def torchrun(*args) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 *args`` with one thread per process; kills
    the launcher and both ranks if it runs past TIMEOUT."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a hang can be killed whole
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ran past {TIMEOUT} s (a rank waiting on another?)\n{err[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def assert_close(a, b, where="state"):
    """Checkpoint contents equal up to float64 rounding (tensors), exactly otherwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype, where
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=where)
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training(ckpt, reference):
    """Model, EMA and optimizer state after the same number of steps."""
    assert ckpt["step"] == reference["step"]
    for part in ("model", "ema", "optimizer"):
        assert_close(ckpt[part], reference[part], part)


def max_change(ckpt, initial: dict) -> float:
    return max(
        float((ckpt["model"][k] - v).abs().max())
        for k, v in initial.items()  # parameters (not power-iteration vectors)
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and k.rsplit(".", 1)[-1] not in ("u", "v")
    )


def log_column(out: Path, column: str):
    rows = (out / "log.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert rows.count(rows[0]) == 1, "one header: one writer"
    return [int(r.split(",")[0]) for r in rows[1:]], [
        float(r.split(",")[header.index(column)]) for r in rows[1:]
    ]


# ---------------------------------------------------------------------------------------------
# The real CLI under torchrun


TOY_ARGS = ["toy", "--data", "8gaussians", "--model", "implicit", "--actnorm", "--blocks", "1",
            "--hidden", "8", "--batch-size", "16", "--steps", "8", "--log-every", "1",
            "--dtype", "float64", "--no-progress"]  # fmt: skip


def test_cli_under_torchrun_matches_one_process(tmp_path, capsys):
    ranks, one = tmp_path / "torchrun", tmp_path / "one"
    run = torchrun("-m", "impflow.train", *TOY_ARGS, "--out", ranks)
    assert run.returncode == 0, run.stderr[-4000:]
    assert main([*TOY_ARGS, "--out", str(one)]) == 0
    capsys.readouterr()

    # only rank 0 reports, and the run knows it had two processes
    assert run.stdout.count("wrote ") == 1 and run.stdout.count("task=toy") == 1, run.stdout
    metrics = json.loads((ranks / "metrics.json").read_text())
    reference = json.loads((one / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and reference["world_size"] == 1
    assert metrics["iterations"] == reference["iterations"] == 8
    assert metrics["test_bits"] == pytest.approx(reference["test_bits"], rel=1e-9)

    ckpt, ref = load_checkpoint(ranks / "checkpoint.pt"), load_checkpoint(one / "checkpoint.pt")
    assert_same_training(ckpt, ref)
    assert len(ckpt["rng_per_rank"]) == 2
    # the global-batch loss of every step, logged once (one writer)
    steps, losses = log_column(ranks, "loss")
    ref_steps, ref_losses = log_column(one, "loss")
    assert steps == ref_steps == list(range(1, 9))
    assert losses == pytest.approx(ref_losses, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Scenarios of tests/ddp_train_worker.py (one launch for the module)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    results = tmp_path_factory.mktemp("ddp_worker")
    run = torchrun(REPO / "tests" / "ddp_train_worker.py", results)
    assert run.returncode == 0, run.stderr[-4000:]

    def seen(scenario):
        return [
            json.loads((results / "seen" / scenario / f"rank{r}.json").read_text()) for r in (0, 1)
        ]

    return results, seen


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """MixedToy for STEPS steps in one process: its output folder, checkpoint, freshly built
    state and the batches it trained on."""
    out = tmp_path_factory.mktemp("one_process")
    task = MixedToy()
    train(task, settings(out, steps=STEPS))
    torch.manual_seed(0)
    initial = MixedToy().build_model().double().state_dict()
    return out, load_checkpoint(out / "checkpoint.pt"), initial, task.batches


def test_two_ranks_train_like_one_process(worker, one_process):
    results, seen = worker
    out, reference, initial, _ = one_process
    ckpt = load_checkpoint(results / "equal" / "rank0" / "checkpoint.pt")
    assert_same_training(ckpt, reference)
    assert max_change(ckpt, initial) > 1e6 * ATOL  # the comparison is not of untrained models
    _, losses = log_column(results / "equal" / "rank0", "loss")
    _, ref_losses = log_column(out, "loss")
    assert losses == pytest.approx(ref_losses, rel=1e-9)
    rank0, rank1 = seen("equal")
    # each rank: one loss call per step, plus one before the first (ActNorm's initialisation)
    assert rank0["loss_calls"] == rank1["loss_calls"] == STEPS + 1
    # evaluation on rank 0 only; every rank returns its metrics
    assert (rank0["evaluate_calls"], rank1["evaluate_calls"]) == (1, 0)
    assert rank0["metrics"] == rank1["metrics"]
    assert rank1["metrics"]["evaluated_on"] == 0 and rank1["metrics"]["iterations"] == STEPS


def test_each_rank_trains_on_its_half_of_the_global_batch(worker, one_process):
    _, seen = worker
    *_, batches = one_process
    rank0, rank1 = seen("equal")
    # the first call settles ActNorm on the whole first global batch, on both ranks
    assert rank0["batches"][0] == rank1["batches"][0] == batches[0]
    assert len(batches[0]) == 16
    for step in range(STEPS):  # then rank 0 takes rows 0-7 and rank 1 rows 8-15 of each batch
        assert rank0["batches"][step + 1] + rank1["batches"][step + 1] == batches[step]
        assert len(rank1["batches"][step + 1]) == 8


def test_ranks_draw_their_own_random_streams(worker):
    _, seen = worker
    rank0, rank1 = seen("equal")
    assert rank0["global_seed"] == 0  # the run seed, as in one process
    assert rank1["global_seed"] == rank_seed(0, 1) != 0


def test_only_rank_0_writes(worker):
    results, _ = worker
    # each rank was given its own output folder: rank 1 would have created its own
    written = sorted(p.name for p in (results / "equal" / "rank0").iterdir())
    assert written == ["checkpoint.pt", "log.csv", "metrics.json"]
    assert not (results / "equal" / "rank1").exists()


def test_resume_under_ddp_continues_exactly(worker, one_process):
    results, seen = worker
    _, reference, _, _ = one_process
    assert_same_training(load_checkpoint(results / "resume" / "checkpoint.pt"), reference)
    steps, _ = log_column(results / "resume", "loss")
    assert steps == list(range(1, STEPS + 1))  # appended once, by rank 0
    assert all(s["error"] is None for s in seen("resume"))


def test_time_budget_stops_every_rank_at_the_same_step(worker):
    results, seen = worker
    rank0, rank1 = seen("budget")
    assert rank0["error"] is None and rank1["error"] is None
    iterations = rank0["metrics"]["iterations"]
    assert rank0["loss_calls"] == rank1["loss_calls"] == iterations + 1
    assert load_checkpoint(results / "budget" / "checkpoint.pt")["step"] == iterations
    assert rank0["metrics"]["seconds"] >= 1.0  # rank 0's clock (not rank 1's fast one) decided


def test_nan_on_one_rank_stops_every_rank(worker):
    results, seen = worker
    for rank in seen("nan"):
        assert rank["error"].startswith("NonFiniteLossError: the loss is nan at step 4 ")
        assert "(non-finite on rank 1 of 2)" in rank["error"]
        assert rank["loss_calls"] == 5 and rank["evaluate_calls"] == 0
    kept = load_checkpoint(results / "nan" / "checkpoint.pt")
    assert kept["step"] == 2  # the last good checkpoint (every 2 steps), not step 3
    assert not (results / "nan" / "metrics.json").exists()


def test_global_batch_must_divide_over_ranks(worker):
    results, seen = worker
    for rank in seen("odd_batch"):
        assert rank["error"] == (
            "ValueError: --batch-size 15 is the global batch, split evenly over the 2 "
            "processes: it must be divisible by 2"
        )
    assert not (results / "odd_batch").exists()


# ---------------------------------------------------------------------------------------------
# Process group setup in this process (no group is created)


def test_process_group_settings_are_checked(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cpu = torch.device("cpu")
    group, device = setup_process_group(cpu)  # no torchrun: one process
    assert (group.world_size, group.rank, group.distributed, device) == (1, 0, False, cpu)
    with pytest.raises(ValueError, match="needs torchrun"):
        setup_process_group(cpu, distributed=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        setup_process_group(cpu, backend="mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="'nccl' needs a CUDA device"):
        setup_process_group(cpu, backend="nccl")
    assert setup_process_group(cpu, distributed=False)[0].world_size == 1
    assert not dist.is_initialized()


def test_cli_rejects_bad_backend_dtype_and_uneven_batch(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["toy", "--out", str(tmp_path), "--backend", "mpi"])
    with pytest.raises(SystemExit):
        main(["toy", "--out", str(tmp_path), "--dtype", "float16"])
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)  # as torchrun would: refused before any group is made
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        main(["toy", "--out", str(tmp_path / "x"), "--batch-size", "15"])
    assert err.value.code == 2
    assert "--batch-size 15 is the global batch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not dist.is_initialized()


def test_rank_seeds_differ_and_rank_0_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(seed, rank, step) for seed in (0, 1) for rank in range(4) for step in (0, 5)}
    assert len(seeds) == 16
