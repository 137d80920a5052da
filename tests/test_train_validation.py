"""Bad values are refused before anything is created: every numeric option of every task (NaN,
Inf, negative, zero where invalid) and every field of a checkpoint that is resumed (types,
ranges, required entries), naming the option or the field."""

import math

import pytest
import torch

from impflow.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from impflow.train.cli import main
from impflow.train.loop import check_settings, train
from test_train import QuickToy, settings

TASKS = {
    "toy": ["toy", "--data", "8gaussians", "--blocks", "1", "--hidden", "8"],
    "fit1d": ["fit1d", "--hidden", "8"],
    "image": ["image"],  # refused while parsing: no dataset is loaded
}


@pytest.mark.parametrize(
    "task, option, value, message",
    [
        # a traceback (exit code 1) after the output folder was made
        ("toy", "--weight-decay", "-1", "must be a finite number >= 0, got -1"),
        ("toy", "--weight-decay", "nan", "must be a finite number >= 0, got nan"),
        ("fit1d", "--weight-decay", "inf", "must be a finite number >= 0, got inf"),
        # accepted: died at the save or inside the model
        ("toy", "--lr", "inf", "must be a finite number > 0, got inf"),
        ("image", "--lr", "1e400", "must be a finite number > 0, got 1e400"),
        ("toy", "--time-budget", "inf", "must be a finite number > 0, got inf"),
        ("fit1d", "--grad-clip", "inf", "must be a finite number > 0, got inf"),
        ("toy", "--ema-decay", "nan", "must be a number in [0, 1), got nan"),
        ("image", "--ema-decay", "-0.5", "must be a number in [0, 1), got -0.5"),
        ("toy", "--seed", "-1", "must be an integer in [0, 2**63), got -1"),
        ("fit1d", "--seed", str(2**64), f"must be an integer in [0, 2**63), got {2**64}"),
        ("toy", "--lr", "0", "must be a finite number > 0, got 0"),
        ("image", "--steps", "-3", "must be an integer >= 1, got -3"),
    ],
)
def test_cli_refuses_bad_numbers_before_anything_is_created(
    tmp_path, capsys, task, option, value, message
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main([*TASKS[task], "--out", str(out), "--no-progress", option, value])
    assert err.value.code == 2
    assert f"error: argument {option}: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_cli_refuses_bad_model_numbers_before_anything_is_created(tmp_path, capsys, value):
    # The model's own checks, run by building it once before the run starts (the image task's
    # --alpha alike, at the cost of loading its data first).
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main([*TASKS["toy"], "--out", str(out), "--no-progress", "--coeff", value])
    assert err.value.code == 2
    assert "coeff must be" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lr", math.inf, "lr must be a finite number > 0, got inf"),
        ("weight_decay", -1.0, "weight_decay must be a finite number >= 0, got -1.0"),
        ("weight_decay", math.nan, "weight_decay must be a finite number >= 0, got nan"),
        ("time_budget", math.inf, "time_budget must be a finite number > 0, got inf"),
        ("grad_clip", 0.0, "grad_clip must be a finite number > 0, got 0.0"),
        ("steps", 0, "steps must be an integer >= 1, got 0"),
        ("ckpt_every", 2.5, "ckpt_every must be an integer >= 1, got 2.5"),
        ("seed", -1, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        ("lr_schedule", "linear", "lr_schedule must be one of"),
        ("overwrite", True, "resume and overwrite exclude each other"),
    ],
)
def test_train_refuses_bad_settings_before_anything_is_created(tmp_path, field, value, message):
    s = settings(tmp_path / "out", **{field: value})
    if field == "overwrite":
        s.resume = True
    with pytest.raises(ValueError, match=message):
        check_settings(s)
    with pytest.raises(ValueError, match=message):
        train(QuickToy(), s)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Fields of a resumed checkpoint


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    train(QuickToy(), settings(out, steps=2))
    return load_checkpoint(out / "checkpoint.pt")


def _edited(state, field, value):
    state = dict(state)
    if value is KeyError:
        del state[field]
    else:
        state[field] = value
    return state


def _optimizer_with(state, **change):
    optimizer = dict(state["optimizer"])
    groups = [dict(g) for g in optimizer["param_groups"]]
    entries = {k: dict(v) for k, v in optimizer["state"].items()}
    if "lr" in change:
        groups[0]["lr"] = change["lr"]
    if "exp_avg" in change:
        entries[0]["exp_avg"] = change["exp_avg"]
    return dict(optimizer, param_groups=groups, state=entries)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("step", -5, r"'step' must be an integer >= 0, got int -5"),
        ("step", "3", r"'step' must be an integer >= 0, got str '3'"),
        ("step", 2.0, r"'step' must be an integer >= 0, got float 2.0"),
        ("seconds", math.nan, r"'seconds' must be a number >= 0, got float nan"),
        ("seconds", KeyError, r"has no 'seconds' entry"),
        ("model", [1, 2], r"'model' must be a mapping of tensors, got list"),
        ("optimizer", KeyError, r"has no 'optimizer' entry"),
        ("optimizer", {"state": {}}, r"'optimizer' state does not fit this run's optimizer"),
        ("history", "rows", r"'history' must be a list of rows"),
        ("rng_per_rank", 3, r"'rng_per_rank' must be a list of random states, got int 3"),
        ("rng", {"python": 1}, r"the saved random state is malformed"),
        ("ema", "x", r"'ema' must be None or a mapping of tensors, got str 'x'"),
        ("model.weight", "not a tensor", r"checkpoint has 'not a tensor', model a tensor"),
        ("optimizer.lr", math.inf, r"optimizer setting 'lr' is inf"),
        ("optimizer.exp_avg", torch.zeros(3, 3), r"optimizer state 'exp_avg' has shape \(3, 3\)"),
    ],
)
def test_a_resumed_checkpoint_with_bad_fields_is_refused_naming_the_field(
    tmp_path, good_checkpoint, field, value, message
):
    # step=-5 resumed; wrong types gave TypeError or KeyError tracebacks.
    if field == "model.weight":
        name = next(k for k, v in good_checkpoint["model"].items() if torch.is_tensor(v))
        state = _edited(good_checkpoint, "model", dict(good_checkpoint["model"], **{name: value}))
    elif field.startswith("optimizer."):
        change = {field.split(".")[1]: value}
        state = _edited(good_checkpoint, "optimizer", _optimizer_with(good_checkpoint, **change))
    else:
        state = _edited(good_checkpoint, field, value)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=message):
        train(QuickToy(), settings(tmp_path, steps=4, resume=True))
    assert path.read_bytes() == before
