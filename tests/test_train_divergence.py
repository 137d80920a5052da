"""A learning rate that blows the weights up ends in the documented stop ("... at step N ...;
stopped", exit code 1) with the last good checkpoint kept, whichever check meets it first: the
contractivity check of a block, a flow layer's NaN check, the loss, or the save."""

import math

import pytest
import torch

from impflow.train.checkpoint import load_checkpoint
from impflow.train.cli import main
from impflow.train.loop import NonFiniteLossError, train
from impflow.train.toy import ToyTask
from test_train import QuickToy, settings


def _all_finite(state):
    return all(torch.isfinite(t).all() for t in state.values() if torch.is_tensor(t))


@pytest.mark.parametrize("model", ["implicit", "residual"])
@pytest.mark.parametrize("lr", [3e38, 1e19])
def test_blown_up_weights_stop_the_run(tmp_path, model, lr):
    # 3e38: Inf weights, a traceback of "det(I + J) <= 0 ... g is not contractive"; 1e19:
    # finite weights whose norms overflow float32, the same misleading traceback.
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*; stopped, no checkpoint"):
        train(QuickToy(model), settings(tmp_path, steps=10, ckpt_every=100, lr=lr))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_blown_up_weights_are_never_saved_over_the_last_good_checkpoint(tmp_path):
    # The save raised its own ValueError traceback.
    train(QuickToy(), settings(tmp_path, steps=2))
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError) as err:
        train(QuickToy(), settings(tmp_path, steps=6, ckpt_every=1, lr=3e38, resume=True))
    path = tmp_path / "checkpoint.pt"
    assert str(err.value).startswith("the weights blew up at step 3: parameter ")
    assert str(err.value).endswith(
        f"; stopped, the last good checkpoint ({path}, step 2) is kept; lower --lr or add "
        "--grad-clip"
    )
    kept = load_checkpoint(path)
    assert kept["step"] == 2 and _all_finite(kept["model"])
    assert all(
        torch.equal(kept["model"][k], v) for k, v in good["model"].items() if torch.is_tensor(v)
    )


def test_cli_reports_blown_up_weights_in_one_line_with_exit_code_1(tmp_path, capsys):
    argv = ["toy", "--data", "8gaussians", "--blocks", "1", "--hidden", "8", "--batch-size", "16"]
    code = main([*argv, "--steps", "5", "--no-progress", "--lr", "3e38", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("error: the weights blew up") and err.count("\n") == 1
    assert "; stopped, no checkpoint was written yet; lower --lr or add --grad-clip" in err


class FailsAt(QuickToy):
    """Its loss raises an ordinary error at a step, with healthy weights."""

    def loss(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            raise ValueError("a bug in the task")
        return super().loss(model, batch)


def test_other_errors_are_not_taken_for_a_blow_up(tmp_path):
    with pytest.raises(ValueError, match="a bug in the task"):
        train(FailsAt(), settings(tmp_path, steps=5))


def test_nan_in_the_optimizer_state_is_reported_as_a_stop(tmp_path, monkeypatch):
    # Finite weights with a NaN Adam moment: refused by the save's check, reported as a stop.
    calls = []

    def poisoned_step(self, closure=None):
        result = real_step(self, closure)
        calls.append(1)
        if len(calls) == 2:  # after the update of step 2: the weights stay finite
            for entry in self.state.values():
                entry["exp_avg_sq"].fill_(math.nan)
        return result

    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match=r"\['exp_avg_sq'\] holds NaN or Inf at step 2"):
        train(QuickToy(), settings(tmp_path, steps=4, ckpt_every=2))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_toy_task_default_is_covered(tmp_path):
    """The CLI's toy task is an ImpFlow with 4 blocks by default: the blow-up stops it too."""
    task = ToyTask("8gaussians", "implicit", 2, hidden=(8,), batch_size=16)
    task.evaluate = lambda model: {}
    task.figures = lambda model, out: []
    with pytest.raises(NonFiniteLossError, match="stopped"):
        train(task, settings(tmp_path, steps=5, lr=1e30))
