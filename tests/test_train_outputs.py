"""The output folder of a training run: an earlier run there is refused unless resumed or
replaced (--overwrite), files that cannot be written are reported with the file, the reason and
the step the checkpoint keeps, and temporary files of killed writers are cleaned up."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import impflow.train.checkpoint as checkpoint_module
import impflow.train.loop as loop
import impflow.train.output_folder as output_folder
from impflow.train.checkpoint import load_checkpoint
from impflow.train.cli import main
from impflow.train.distributed import ProcessGroup
from impflow.train.output_folder import prepare_output
from impflow.train.run_log import RunLog
from impflow.train.loop import (
    ExistingRunError,
    OutputFolderError,
    OutputWriteError,
    train,
)
from impflow.train.toy import ToyTask
from test_train import NaNAt, QuickToy, settings

TOY = ["toy", "--data", "8gaussians", "--blocks", "1", "--hidden", "8", "--batch-size", "16",
       "--steps", "2", "--no-progress"]  # fmt: skip


@pytest.fixture
def quick_cli(monkeypatch):
    """CLI toy runs without the (slow, separately tested) final evaluation and figure."""
    monkeypatch.setattr(ToyTask, "evaluate", lambda self, model: {})
    monkeypatch.setattr(ToyTask, "figures", lambda self, model, out: [])


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _a_finished_run(out):
    """What a finished run leaves (written by hand: the refusal comes before any training)."""
    out.mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"the checkpoint of a finished run")
    (out / "log.csv").write_text("step,seconds,loss\n1,0.1,3.0\n")
    (out / "metrics.json").write_text('{"task": "toy", "figures": []}\n')
    return _snapshot(out)


def _tiny_miniboone(root):
    (root / "miniboone").mkdir(parents=True)
    np.save(root / "miniboone" / "data.npy", np.random.default_rng(0).normal(size=(120, 5)))


# ---------------------------------------------------------------------------------------------
# An earlier run in --out


@pytest.mark.parametrize("task", ["toy", "fit1d", "tabular"])  # image: the same train()
def test_rerun_over_a_finished_run_is_refused_by_every_task(tmp_path, capsys, task):
    # It replaced the checkpoint, metrics and log with a new run, exit code 0, no warning.
    out = tmp_path / "run"
    before = _a_finished_run(out)
    argv = {
        "toy": TOY,
        "fit1d": ["fit1d", "--hidden", "8", "--batch-size", "16"],
        "tabular": ["tabular", "--data", "miniboone", "--root", str(tmp_path / "data")]
        + ["--blocks", "1", "--hidden", "8", "--batch-size", "16"],
    }[task]
    if task == "tabular":
        _tiny_miniboone(tmp_path / "data")
    assert main([*argv, "--steps", "2", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {out} already holds a run (checkpoint.pt, log.csv, metrics.json): pass "
        "--resume to continue it or --overwrite to replace it\n"
    )
    assert _snapshot(out) == before  # nothing touched


def test_what_counts_as_a_run(tmp_path):
    empty, unrelated, log_only, events = (tmp_path / n for n in ("e", "u", "l", "t"))
    empty.mkdir()
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", empty, unrelated):  # new, empty or unrelated: used as is
        prepare_output(out, resume=False, overwrite=False)
        assert out.is_dir()
    assert _snapshot(unrelated) == {"notes.txt": b"mine"}
    log_only.mkdir()
    (log_only / "log.csv").write_text("step\n")  # a run killed before its first checkpoint
    (events / "tensorboard").mkdir(parents=True)
    (events / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")
    for out, found in ((log_only, "log.csv"), (events, "tensorboard/")):
        with pytest.raises(ExistingRunError, match=rf"already holds a run \({found}\)"):
            train(QuickToy(), settings(out, steps=1))


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path):
    out = tmp_path / "run"
    train(QuickToy(), settings(out, steps=4, log_every=1))
    (out / "notes.txt").write_text("mine")
    (out / "old.png").write_bytes(b"a figure of the old run")
    (tmp_path / "old.png").write_bytes(b"not in the run's folder")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["figures"] = [str(out / "old.png"), str(tmp_path / "old.png"), "../notes.txt"]
    (out / "metrics.json").write_text(json.dumps(metrics))
    train(QuickToy(), settings(out, steps=2, log_every=1, overwrite=True))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "1", "2"]  # a new log, not appended
    assert json.loads((out / "metrics.json").read_text())["iterations"] == 2
    assert not (out / "old.png").exists()  # the old run's figure
    assert (out / "notes.txt").read_text() == "mine"  # not the run's
    assert (tmp_path / "old.png").exists()  # outside the folder: never removed


def test_cli_overwrite_and_resume_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main([*TOY, "--out", str(tmp_path / "x"), "--resume", "--overwrite"])
    assert err.value.code == 2
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_overwrite_reruns_and_resume_continues(tmp_path, capsys, quick_cli):
    argv = [*TOY, "--out", str(tmp_path / "run"), "--lr-schedule", "constant"]
    assert main(argv) == 0
    assert main([*argv, "--overwrite"]) == 0
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 3
    capsys.readouterr()


class _Rank1(ProcessGroup):
    """Rank 1 of 2, as far as the loop's output checks go: ``run_on_main`` runs nothing here
    and hands over rank 0's result or error (what the broadcast carries)."""

    def __init__(self, rank0_outcome):
        super().__init__(rank=1, world_size=2)
        self.rank0_outcome, self.asked = rank0_outcome, []

    def run_on_main(self, fn, what):
        self.asked.append(what)
        if isinstance(self.rank0_outcome, Exception):
            raise self.rank0_outcome
        return self.rank0_outcome


def test_under_torchrun_rank_0_alone_decides_and_every_rank_raises(tmp_path, monkeypatch):
    out = tmp_path / "run"
    before = _a_finished_run(out)
    # Rank 0 finds the run and refuses: rank 1 raises the same error, without looking at the
    # folder itself (it may see it half-written by rank 0) or waiting for a collective.
    refusal = ExistingRunError(f"{out} already holds a run")
    group = _Rank1(refusal)
    monkeypatch.setattr(output_folder, "run_files", lambda out: pytest.fail("rank 1 looked"))
    with pytest.raises(ExistingRunError, match="already holds a run"):
        loop._train(QuickToy(), settings(out, steps=1), group, torch.device("cpu"))
    assert group.asked == ["preparing the output folder"]
    assert _snapshot(out) == before
    # and rank 0's copy of its error crosses the broadcast intact (it is pickled)
    from impflow.train.distributed import _copy_of

    copied = _copy_of(refusal)
    assert type(copied) is ExistingRunError and str(copied) == str(refusal)


# ---------------------------------------------------------------------------------------------
# Files that cannot be written


def _fail_on_save(monkeypatch, call):
    """The ``call``-th torch.save of a checkpoint writes part of its file, then the disk is
    full."""
    real_save, calls = checkpoint_module.torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            f.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)


def test_full_disk_at_a_checkpoint_stops_with_the_file_and_the_step_kept(tmp_path, monkeypatch):
    # It was a raw OSError (or torch's RuntimeError) traceback.
    _fail_on_save(monkeypatch, call=2)
    with pytest.raises(OutputWriteError) as err:
        train(QuickToy(), settings(tmp_path, steps=6, ckpt_every=2))
    path = tmp_path / "checkpoint.pt"
    assert str(err.value) == (
        f"cannot write {path}: No space left on device (ENOSPC); stopped at step 4, the last "
        f"good checkpoint ({path}, step 2) is kept"
    )
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_reports_a_full_disk_in_one_line_with_exit_code_1(tmp_path, monkeypatch, capsys):
    _fail_on_save(monkeypatch, call=1)
    assert main([*TOY, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1
    assert "No space left on device (ENOSPC); stopped at step 2, no checkpoint was written" in err


def test_full_disk_while_logging_or_writing_metrics(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(RunLog, "write", full)
        with pytest.raises(OutputWriteError, match=r"log.csv: No space left on device \(ENOSPC\)"):
            train(QuickToy(), settings(tmp_path / "log", steps=3))
    with monkeypatch.context() as patch:
        patch.setattr(loop, "write_atomically", lambda path, write: full(path))
        with pytest.raises(
            OutputWriteError,
            match=r"metrics.json: No space left on device \(ENOSPC\); the training finished at "
            r"step 3, which .*checkpoint.pt holds",
        ):
            train(QuickToy(), settings(tmp_path / "metrics", steps=3))
    assert load_checkpoint(tmp_path / "metrics" / "checkpoint.pt")["step"] == 3


def test_an_unwritable_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # The injected refusal works as root too, where chmod does not stop writes.
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    out = tmp_path / "run"
    monkeypatch.setattr(output_folder.tempfile, "mkstemp", refused)
    assert main([*TOY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: cannot create files in the output folder {out}: Permission denied (EACCES); "
        "nothing was trained (choose another --out or make it writable)\n"
    )
    assert list(out.iterdir()) == []
    (tmp_path / "file").write_text("")
    assert main([*TOY, "--out", str(tmp_path / "file" / "run")]) == 2
    assert "error: cannot create the output folder" in capsys.readouterr().err


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0,
    reason="root writes into a read-only folder anyway (the injected test above always runs)",
)
def test_a_read_only_folder_is_refused_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main([*TOY, "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    assert "Permission denied (EACCES)" in capsys.readouterr().err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Temporary files of killed writers; a corrupt checkpoint on resume


def test_a_run_removes_the_temporaries_of_killed_writers_before_training(tmp_path):
    train(QuickToy(), settings(tmp_path, steps=2))
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # a writer killed mid-save: its process is gone
    stale = tmp_path / f".checkpoint.pt.{child.pid}.x1y2z3.tmp"
    stale.write_bytes(b"half a checkpoint")
    with pytest.raises(loop.NonFiniteLossError):  # stops before any save of its own
        train(NaNAt(1), settings(tmp_path, steps=4, resume=True))
    assert not stale.exists()


def test_cli_refuses_a_corrupt_checkpoint_on_resume_in_one_line(tmp_path, capsys, quick_cli):
    out = tmp_path / "run"
    assert main([*TOY, "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 :][:8])
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*TOY, "--out", str(out), "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path} is ") and err.count("\n") == 1
    assert path.read_bytes() == bytes(data)  # left as it was


def test_output_folder_errors_are_usage_errors_in_the_library_too(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputFolderError, match="is a file, not a folder"):
        train(QuickToy(), settings(tmp_path / "file", steps=1))
