"""Checkpoints: atomic writes (a crash mid-write keeps the old file), clear errors for corrupt
or mismatched files, RNG round trips, and a training loop resumed bitwise exactly."""

import io
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import impflow.train.checkpoint as checkpoint_module
from impflow.train import (
    CheckpointError,
    CheckpointMismatchError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def _keep_global_rngs():
    """These tests reseed Python's and numpy's global generators: put them back after."""
    py, npy = random.getstate(), np.random.get_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_of_tensors_and_plain_values(tmp_path):
    state = {
        "model": nn.Linear(3, 2).state_dict(),
        "step": 7,
        "config": {"dims": [2, 64, 2], "lr": 1e-3, "name": "moons", "betas": (0.9, 0.99)},
        "shape": torch.Size([2, 3]),
        "dtype": torch.float64,
        "nothing": None,
    }
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    for key in ("step", "config", "shape", "dtype", "nothing"):
        assert loaded[key] == state[key]
    assert _files(tmp_path) == ["ckpt.pt"]  # no temporary file left


@pytest.mark.parametrize("value", [b"\x00\x01", 1 + 2j], ids=["bytes", "complex"])
def test_bytes_and_complex_round_trip_where_torch_loads_them(tmp_path, value):
    """torch 2.4's weights_only loader refuses bytes and complex numbers, newer ones rebuild
    them: save_checkpoint stores them where a load will work and refuses them up front
    otherwise."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
        loadable = True
    except Exception:
        loadable = False
    path = tmp_path / "ckpt.pt"
    if loadable:
        save_checkpoint(path, {"value": value})
        assert load_checkpoint(path)["value"] == value
    else:
        with pytest.raises(TypeError, match=r"state\['value'\] is a \w+, which the weights_only"):
            save_checkpoint(path, {"value": value})
        assert not path.exists()


def test_crash_while_writing_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(4)})
    before = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the temporary file...
        raise OSError("disk full")  # ...then the write dies

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(4)})
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.pt"]  # the partial temporary file is gone
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1


def test_interrupt_before_the_rename_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def interrupted_replace(src, dst):
        assert os.path.getsize(src) > 0  # the new file was complete, only not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert _files(tmp_path) == ["ckpt.pt"]


def test_refuses_values_a_safe_load_could_not_read(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(TypeError, match=r"state\['extra'\]\['arr'\] is a numpy.ndarray"):
        save_checkpoint(path, {"step": 2, "extra": {"arr": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['lr'\] is a numpy.float64.*use .item\(\)"):
        save_checkpoint(path, {"lr": np.float64(0.1)})
    with pytest.raises(TypeError, match=r"state\['fn'\]"):
        save_checkpoint(path, {"fn": print})
    with pytest.raises(TypeError, match="mapping"):
        save_checkpoint(path, [1, 2])
    assert load_checkpoint(path)["step"] == 1 and _files(tmp_path) == ["ckpt.pt"]


def test_require_finite_never_replaces_a_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "loss": 0.5}, require_finite=True)
    bad_w = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"state\['model'\]\['w'\] holds NaN or Inf"):
        save_checkpoint(path, {"model": {"w": bad_w}, "loss": 0.5}, require_finite=True)
    with pytest.raises(ValueError, match=r"state\['loss'\] holds NaN or Inf"):
        save_checkpoint(
            path, {"model": {"w": torch.ones(3)}, "loss": float("inf")}, require_finite=True
        )
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_corrupt_truncated_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(os.urandom(512))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt"):
        with pytest.raises(CheckpointError, match=f"{name} is unreadable: truncated, corrupt"):
            load_checkpoint(tmp_path / name)
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")  # a torch file, not ours
    with pytest.raises(CheckpointError, match="not an impflow checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_configuration_lists_every_difference(tmp_path):
    path = tmp_path / "ckpt.pt"
    config = {"dims": [2, 64, 2], "dataset": "moons", "coeff": 0.9}
    save_checkpoint(path, {"config": config, "step": 3})
    # equal values pass (a tuple matches the saved list), extra saved keys are ignored
    state = load_checkpoint(path, expected={"config": {"dims": (2, 64, 2), "dataset": "moons"}})
    assert state["step"] == 3
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(
            path,
            expected={
                "config": {
                    "dims": [2, 128, 2],
                    "dataset": "moons",
                    "coeff": 0.9,
                    "arch": "implicit",
                }
            },
        )
    message = str(err.value)
    assert "config.dims: checkpoint has [2, 64, 2], this run [2, 128, 2]" in message
    assert "config.arch: missing from the checkpoint" in message
    assert "config.dataset" not in message and "config.coeff" not in message


def test_module_state_mismatch_is_named_and_leaves_the_module_alone(tmp_path):
    path = tmp_path / "ckpt.pt"
    small = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    save_checkpoint(path, {"model": small.state_dict()})
    state = load_checkpoint(path)
    twin = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    load_module_state(twin, state["model"])
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), small.parameters()))
    wide = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2), nn.Linear(2, 2))
    before = [p.clone() for p in wide.parameters()]
    with pytest.raises(CheckpointMismatchError) as err:
        load_module_state(wide, state["model"])
    message = str(err.value)
    assert "0.weight: checkpoint shape (8, 2), model shape (16, 2)" in message
    assert "missing from the checkpoint: 3.weight" in message
    assert all(torch.equal(a, b) for a, b in zip(before, wide.parameters()))


def _draw_everything(gen):
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),  # keeps numpy's cached Gaussian in play
        torch.rand(3).tolist(),
        torch.rand(3, generator=gen).tolist(),
    )


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    np.random.randn(1)  # leave a cached Gaussian in numpy's state
    path = tmp_path / "rng.pt"
    save_checkpoint(path, {"rng": capture_rng_state({"data": gen})})
    first = _draw_everything(gen)
    # scramble everything, then restore from the file
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    gen.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"], {"data": gen})
    assert _draw_everything(gen) == first
    with pytest.raises(CheckpointError, match="no generator 'other'"):
        restore_rng_state(load_checkpoint(path)["rng"], {"other": torch.Generator()})
    with pytest.raises(CheckpointError, match="no 'numpy' entry"):
        restore_rng_state({"python": random.getstate()})


def test_missing_cuda_state_warns(tmp_path):
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * (torch.cuda.device_count() + 1)
    with pytest.warns(RuntimeWarning, match="CUDA random draws will not continue exactly"):
        restore_rng_state(state)


# ---------------------------------------------------------------------------------------------
# A training loop resumed from a checkpoint ends bitwise where the straight run ends.


def _training_setup():
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data_gen = torch.Generator()
    return model, optimizer, data_gen


def _train(model, optimizer, data_gen, steps):
    """Each step draws from every generator a run might use: the data generator, torch's
    global one (dropout, noise), numpy's and Python's."""
    w_true = torch.arange(4.0)[:, None]
    for _ in range(steps):
        x = torch.randn(32, 4, generator=data_gen)
        noise = torch.from_numpy(np.random.normal(0, 0.1, (32, 1))).float()
        weight = 0.5 + random.random()
        y = x @ w_true + noise + 0.01 * torch.randn(32, 1)
        loss = weight * (model(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _seed_run():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def test_resumed_training_is_bitwise_identical(tmp_path):
    _seed_run()
    model, optimizer, data_gen = _training_setup()
    data_gen.manual_seed(5)
    _train(model, optimizer, data_gen, 40)
    straight = [p.detach().clone() for p in model.parameters()]

    _seed_run()
    model, optimizer, data_gen = _training_setup()
    data_gen.manual_seed(5)
    _train(model, optimizer, data_gen, 20)
    path = tmp_path / "ckpt.pt"
    config = {"hidden": 16, "lr": 1e-2}
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": 20,
            "rng": capture_rng_state({"data": data_gen}),
            "config": config,
        },
        require_finite=True,
    )
    del model, optimizer, data_gen

    # A new process, as far as this test can tell: other seeds, fresh objects.
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    model, optimizer, data_gen = _training_setup()
    state = load_checkpoint(path, expected={"config": config})
    load_module_state(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], {"data": data_gen})
    assert state["step"] == 20
    _train(model, optimizer, data_gen, 20)
    resumed = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))

    # and without restoring the random state it would not be (the test can tell)
    _seed_run()
    model, optimizer, data_gen = _training_setup()
    load_module_state(model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _train(model, optimizer, data_gen, 20)
    assert not all(torch.equal(a, b) for a, b in zip(straight, model.parameters()))
