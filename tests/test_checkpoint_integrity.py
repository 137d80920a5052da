"""Checkpoints whose bytes changed after they were written are refused (the CRC-32s that torch's
zip writer stores, which torch.load never checks), failed writes name the file and the reason,
and the temporary files of killed writers are removed by the next save."""

import errno
import os
import random
import re
import struct
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import impflow.train.checkpoint as checkpoint_module
from impflow.train import CheckpointError, CheckpointMismatchError
from impflow.train.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    load_module_state,
    remove_stale_temporaries,
    save_checkpoint,
)


def _state():
    return {
        "model": {"w": torch.randn(64, 64), "b": torch.randn(64)},
        "step": 3,
        "config": {"name": "toy"},
    }


def _records(path):
    """``{name: (start, end)}``: where each record's bytes lie in the file."""
    spans = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            start = info.header_offset + 30 + name_length + extra_length
            spans[info.filename] = (start, start + info.compress_size)
    return spans


def _flip(path, offset, count=8):
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _state())
    return path


@pytest.mark.parametrize("seed", range(4))
def test_flipped_bytes_inside_tensor_data_are_refused(saved, seed):
    # 8 flipped bytes inside a tensor's data loaded silently (torch.load checks no CRC).
    spans = _records(saved)
    rng = random.Random(seed)
    name = rng.choice(sorted(n for n in spans if "/data/" in n and not n.endswith("_id")))
    start, end = spans[name]
    _flip(saved, rng.randrange(start, end - 8))
    with pytest.raises(CheckpointError, match=rf"ckpt.pt is corrupt: its record '{name}' fails"):
        load_checkpoint(saved)


@pytest.mark.parametrize("seed", range(3))
def test_flipped_bytes_in_the_pickled_header_are_refused(saved, seed):
    # The pickle holds the keys, the step, dtypes and shapes: a flip could change a value.
    start, end = next(span for name, span in _records(saved).items() if name.endswith("data.pkl"))
    _flip(saved, random.Random(seed).randrange(start, end - 1), count=1)
    with pytest.raises(CheckpointError, match="ckpt.pt is (corrupt|unreadable)"):
        load_checkpoint(saved)


def test_a_changed_value_in_the_pickled_header_is_refused(saved):
    # One byte of the pickle turned step 3 into step 9: it loaded, as a valid checkpoint.
    data = saved.read_bytes()
    at = re.search(rb"step(q.)?K\x03", data, re.DOTALL).end() - 1  # BININT1 3 (after a memo)
    saved.write_bytes(data[:at] + b"\x09" + data[at + 1 :])
    with pytest.raises(CheckpointError, match="ckpt.pt is corrupt: its record '.*data.pkl'"):
        load_checkpoint(saved)


def test_flipped_bytes_in_the_zip_headers_are_refused(saved):
    with zipfile.ZipFile(saved) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    _flip(saved, info.header_offset + 30, count=4)  # the record's name in its local header
    with pytest.raises(CheckpointError, match="ckpt.pt is unreadable"):
        load_checkpoint(saved)


def test_truncated_checkpoints_are_refused(saved):
    data = saved.read_bytes()
    for keep in (0, 10, len(data) // 3, len(data) - 100, len(data) - 1):
        saved.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match="ckpt.pt is unreadable"):
            load_checkpoint(saved)


def test_checkpoints_written_without_crc32s_still_load(tmp_path):
    """A checkpoint of an older impflow saved while torch's CRC-32s were turned off
    (torch.serialization.set_crc32_options(False)) holds zeros: nothing to check, it loads.
    save_checkpoint itself always writes them."""
    path = tmp_path / "old.pt"
    serialization = torch.serialization
    if not hasattr(serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRC-32s")
    serialization.set_crc32_options(False)
    try:
        torch.save({"format": "impflow.checkpoint", "version": 1, "state": _state()}, path)
        save_checkpoint(tmp_path / "new.pt", _state())
    finally:
        serialization.set_crc32_options(True)
    assert load_checkpoint(path)["step"] == 3
    with zipfile.ZipFile(tmp_path / "new.pt") as archive:
        assert all(info.CRC != 0 for info in archive.infolist())


def test_module_state_of_the_wrong_type_is_named(tmp_path):
    model = nn.Linear(2, 2)
    state = dict(model.state_dict(), weight="not a tensor")
    with pytest.raises(CheckpointMismatchError, match="weight: checkpoint has 'not a tensor'"):
        load_module_state(model, state)


# ---------------------------------------------------------------------------------------------
# Failed writes


def test_full_disk_names_the_file_and_the_reason(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 a part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(path, {"step": 2})
    assert str(err.value) == (
        f"cannot write checkpoint {path}: No space left on device (ENOSPC); {path} was left as "
        "it was"
    )
    assert err.value.path == path and err.value.reason == "No space left on device (ENOSPC)"
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_an_unwritable_folder_names_the_file_and_the_reason(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refused)
    with pytest.raises(CheckpointWriteError, match=r"ckpt.pt: Permission denied \(EACCES\)"):
        save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})


# ---------------------------------------------------------------------------------------------
# Temporary files of killed writers


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()  # reaped: its process id names no process now
    return child.pid


def test_the_next_save_removes_the_temporaries_of_dead_writers(tmp_path, monkeypatch):
    # kill -9 during a save left .checkpoint.pt.*.tmp files that nothing removed.
    path = tmp_path / "checkpoint.pt"
    dead = tmp_path / f".checkpoint.pt.{_dead_pid()}.k2j4x9.tmp"
    old_style = tmp_path / ".checkpoint.pt.ab3_9xyz.tmp"  # an older impflow's: no process id
    live = tmp_path / f".checkpoint.pt.{os.getppid()}.q8w7e6.tmp"  # a live writer's
    others = [tmp_path / ".other.pt.1.a.tmp", tmp_path / "notes.tmp"]
    for p in (dead, old_style, live, *others):
        p.write_bytes(b"partial")
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    save_checkpoint(path, {"step": 1})
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and all(p.exists() for p in others)
    # this writer's temporary file carried its process id
    assert renamed[0].startswith(f".checkpoint.pt.{os.getpid()}.") and renamed[0].endswith(".tmp")
    assert remove_stale_temporaries(path) == []  # nothing more to remove
