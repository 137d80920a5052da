"""The training loop and CLI (issue 6): outputs, exact resume, the NaN guard, the time budget,
checkpoint mismatch and corruption, unknown options."""

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch

from impflow.train.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from impflow.train.cli import main
from impflow.train.fit1d import Fit1dTask
from impflow.train.loop import NonFiniteLossError, ResumeWarning, TrainSettings, train
from impflow.train.toy import ToyTask


class QuickToy(ToyTask):
    """A tiny toy model without the (slow, separately tested) final evaluation."""

    def __init__(self, model="residual", blocks=1, **kw):
        super().__init__("8gaussians", model, blocks, hidden=(8,), batch_size=16, **kw)

    def evaluate(self, model):
        return {}

    def figures(self, model, out):
        return []


def settings(tmp_path, **kw):
    kw.setdefault("progress", False)
    return TrainSettings(out=tmp_path, **kw)


def final_parameters(out):
    return load_checkpoint(out / "checkpoint.pt")["model"]


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:  # e.g. Flow's extra state (shapes)
            assert a[key] == b[key], key


@pytest.mark.parametrize(
    "model, steps",
    [("residual", 2000), ("implicit", 60)],  # issue 6: 2k straight vs 1k + resume 1k
)
def test_resume_continues_exactly(tmp_path, model, steps):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(QuickToy(model), settings(straight, steps=steps, ckpt_every=10**6))
    train(QuickToy(model), settings(split, steps=steps // 2, ckpt_every=10**6))
    train(QuickToy(model), settings(split, steps=steps, resume=True, ckpt_every=10**6))
    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(split / "checkpoint.pt")
    assert a["step"] == b["step"] == steps
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    # the resumed log continues the first one
    rows = (split / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and rows.count(rows[0]) == 1
    assert int(rows[-1].split(",")[0]) == steps


def test_resume_drops_the_log_rows_after_the_checkpoint(tmp_path):
    # A run killed after its last checkpoint has logged steps that the resumed run logs again:
    # they appeared twice in log.csv.
    train(QuickToy(), settings(tmp_path, steps=10, ckpt_every=10, log_every=5))
    log = tmp_path / "log.csv"
    header = log.read_text().splitlines()[0]
    with open(log, "a") as f:
        f.write("15,0.1,-123.0" + "," * (header.count(",") - 2) + "\n")  # the killed run's row
    train(QuickToy(), settings(tmp_path, steps=20, ckpt_every=10, log_every=5, resume=True))
    rows = log.read_text().strip().splitlines()
    assert rows[0] == header
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 5, 10, 15, 20]
    assert "-123.0" not in log.read_text()


def test_resume_warns_when_the_cosine_schedule_or_the_step_count_breaks_continuity(tmp_path):
    # The learning rate jumped (cosine follows --steps), or nothing was trained, silently.
    cosine = dict(lr_schedule="cosine", ckpt_every=10**6)
    train(QuickToy(), settings(tmp_path, steps=4, **cosine))
    with pytest.warns(ResumeWarning, match=r"another schedule \(steps 4 -> 8\)"):
        train(QuickToy(), settings(tmp_path, steps=8, resume=True, **cosine))
    with pytest.warns(ResumeWarning, match=r"another schedule \(lr_schedule 'cosine' -> 'c"):
        train(QuickToy(), settings(tmp_path, steps=10, resume=True, lr_schedule="constant"))
    constant = tmp_path / "constant"
    train(QuickToy(), settings(constant, steps=4, lr_schedule="constant"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)  # extending a constant schedule is exact
        train(QuickToy(), settings(constant, steps=8, resume=True, lr_schedule="constant"))
    with pytest.warns(ResumeWarning, match="the checkpoint is at step 8, not before --steps 6"):
        train(QuickToy(), settings(constant, steps=6, resume=True, lr_schedule="constant"))


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(QuickToy(), settings(tmp_path, steps=2, resume=True))


def test_resume_with_other_model_is_refused(tmp_path):
    train(QuickToy(blocks=1), settings(tmp_path, steps=2))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointMismatchError, match="blocks"):
        train(QuickToy(blocks=2), settings(tmp_path, steps=4, resume=True))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("first, second", [("float64", "float32"), ("float32", "float64")])
def test_resume_in_another_dtype_is_refused(tmp_path, first, second):
    # A float64 checkpoint was resumed silently in float32 (the config recorded the dtype only
    # when it was not float32).
    train(QuickToy(), settings(tmp_path, steps=2, dtype=first))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(
        CheckpointMismatchError,
        match=f"config.dtype: checkpoint has '{first}', this run '{second}'",
    ):
        train(QuickToy(), settings(tmp_path, steps=4, resume=True, dtype=second))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_a_checkpoint_without_a_dtype_resumes_as_float32(tmp_path):
    # Checkpoints written before the dtype was recorded are float32 runs.
    train(QuickToy(), settings(tmp_path, steps=2))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["config"].pop("dtype") == "float32"
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    train(QuickToy(), settings(tmp_path, steps=4, resume=True))
    assert final_parameters(tmp_path) and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4
    with pytest.raises(CheckpointMismatchError, match="config.dtype"):
        state = load_checkpoint(tmp_path / "checkpoint.pt")
        state["config"].pop("dtype")
        save_checkpoint(tmp_path / "checkpoint.pt", state)
        train(QuickToy(), settings(tmp_path, steps=6, resume=True, dtype="float64"))


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    train(QuickToy(), settings(tmp_path, steps=2))
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])  # truncated
    corrupt = path.read_bytes()
    with pytest.raises(CheckpointError, match="unreadable"):
        train(QuickToy(), settings(tmp_path, steps=4, resume=True))
    assert path.read_bytes() == corrupt


class NaNAt(QuickToy):
    def __init__(self, bad_step):
        super().__init__()
        self.calls, self.bad_step = 0, bad_step

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        return (loss * math.nan if self.calls == self.bad_step else loss), metrics


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="at step 7"):
        train(NaNAt(7), settings(tmp_path, steps=20, ckpt_every=3))
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["step"] == 6
    tensors = [t for t in kept["model"].values() if isinstance(t, torch.Tensor)]
    assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


class InfInputAt(QuickToy):
    """From ``bad_step`` on, the batch holds an Inf: a flow layer refuses it before the loss
    (as when blown-up weights make a layer's output Inf)."""

    def __init__(self, bad_step):
        super().__init__()
        self.calls, self.bad_step = 0, bad_step

    def loss(self, model, batch):
        self.calls += 1
        if self.calls >= self.bad_step:
            batch = batch.clone()
            batch[0, 0] = math.inf
        return super().loss(model, batch)


def test_inf_inside_the_model_stops_like_a_nan_loss(tmp_path):
    # It ended in a traceback of the block's input check, with no step and no advice.
    with pytest.raises(NonFiniteLossError, match=r"the model met NaN or Inf at step 5 \(.*"):
        train(InfInputAt(5), settings(tmp_path, steps=20, ckpt_every=2))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4


def test_time_budget_stops_cleanly(tmp_path):
    metrics = train(QuickToy(), settings(tmp_path, steps=10**6, time_budget=0.5))
    assert 1 <= metrics["iterations"] < 10**6
    assert metrics["seconds"] < 5
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == metrics["iterations"]


def test_toy_run_writes_metrics_log_figure_and_checkpoint(tmp_path):
    task = ToyTask(
        "checkerboard",
        "implicit",
        1,
        hidden=(16,),
        batch_size=64,
        eval_samples=500,
        figure_resolution=40,
    )
    metrics = train(task, settings(tmp_path, steps=4, log_every=2))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["iterations"] == metrics["iterations"] == 4
    # a barely trained model: worse than the data entropy (5 bits), but a finite number
    assert math.isfinite(written["test_bits"]) and written["test_bits"] > 5.0
    assert written["eval_power_iterations"] == 200 and written["test_samples"] == 500
    assert (tmp_path / "density.png").stat().st_size > 1000
    rows = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert rows[0].split(",")[:5] == ["step", "seconds", "loss", "bits", "solver_iters"]
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 4]


def test_fit1d_run_fits_both_blocks(tmp_path):
    metrics = train(Fit1dTask(hidden=(16,), batch_size=32), settings(tmp_path, steps=3))
    assert {"grid_mse_implicit", "grid_mse_residual"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("grid_mse_implicit", "grid_mse_residual"))
    assert (tmp_path / "fit1d.png").exists()


def test_cli_rejects_unknown_options_and_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["toy", "--out", str(tmp_path), "--bogus", "1"])
    assert err.value.code == 2
    assert "--bogus" in capsys.readouterr().err
    for bad in (["--data", "nope"], ["--steps", "0"], ["--hidden", "12-x"]):
        with pytest.raises(SystemExit):
            main(["toy", "--out", str(tmp_path), *bad])
    with pytest.raises(SystemExit):
        main(["nosuchtask", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--activation", "relu"], "unknown activation 'relu'"),
        (["--coeff", "1.5"], "coeff must be a number in"),
        (["--ema-decay", "1.5"], "argument --ema-decay: must be a number in [0, 1)"),
        (["--device", "foo"], "device must be a torch device"),
    ],
)
def test_cli_checks_settings_and_model_options_before_starting(tmp_path, capsys, bad, message):
    # They ended in a traceback (exit code 1) after the output folder had been created.
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main(["toy", "--out", str(out), "--steps", "2", "--no-progress", *bad])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_resume_failures_are_usage_errors(tmp_path, capsys):
    args = ["toy", "--out", str(tmp_path), "--steps", "2", "--no-progress", "--hidden", "8"]
    assert main([*args, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args[:-1], "16", "--steps", "4", "--resume"]) == 2
    assert "does not match this run" in capsys.readouterr().err


def test_cli_reports_nan_loss_with_exit_code(tmp_path, monkeypatch, capsys):
    import impflow.train.toy as toy

    monkeypatch.setattr(toy.ToyTask, "loss", lambda self, m, b: (torch.tensor(math.nan), {}))
    code = main(["toy", "--out", str(tmp_path), "--steps", "3", "--no-progress"])
    assert code == 1
    assert "at step 1" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "impflow.train", "toy", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--time-budget" in out.stdout


def test_cosine_schedule_decays_to_zero(tmp_path):
    from impflow.train.loop import lr_factor

    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == 0.0
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5) and lr_factor("constant", 0.7) == 1.0
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor("linear", 0.5)
    train(QuickToy(), settings(tmp_path, steps=40, lr_schedule="cosine"))
    lr = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * lr_factor("cosine", 39 / 40))  # set before the last step
