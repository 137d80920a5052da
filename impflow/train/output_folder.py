"""The output folder of a training run: refusing to overwrite an earlier run unless asked,
removing that run's files when asked (``--overwrite``), checking that files can be created
before training, and writing files so that a full disk leaves the previous version or none."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from impflow.train.checkpoint import os_reason, remove_stale_temporaries

__all__ = [
    "CHECKPOINT_NAME",
    "ExistingRunError",
    "OutputFolderError",
    "OutputWriteError",
    "prepare_output",
    "run_files",
    "write_atomically",
]

CHECKPOINT_NAME = "checkpoint.pt"
# The files that make a folder hold a run (TensorBoard's event files too, see run_files).
RUN_FILES = (CHECKPOINT_NAME, "log.csv", "metrics.json")
_FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")


class ExistingRunError(RuntimeError):
    """The output folder holds a run already, and neither resume nor overwrite was asked for
    (nothing was touched)."""


class OutputFolderError(RuntimeError):
    """The output folder cannot be created or written, found before training started."""


class OutputWriteError(RuntimeError):
    """A file of the run (checkpoint, log, metrics, figure) could not be written during or
    after training: the message names it, the operating system's reason and the step the
    checkpoint keeps."""


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before anything else (rank 0): refuses a folder that holds a run unless the run resumes
    or replaces it (then removes that run's files), creates the folder, makes sure files can
    be created in it, and removes temporary checkpoint files that killed writers left."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder")
    if not resume:
        found = run_files(out)
        if found and not overwrite:
            raise ExistingRunError(
                f"{out} already holds a run ({', '.join(found)}): pass --resume to continue it "
                "or --overwrite to replace it"
            )
        if found:
            remove_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(
            f"cannot create the output folder {out}: {os_reason(err)}; choose another --out"
        ) from err
    try:
        probe_writable(out)
    except OSError as err:
        raise OutputFolderError(
            f"cannot create files in the output folder {out}: {os_reason(err)}; nothing was "
            "trained (choose another --out or make it writable)"
        ) from err
    remove_stale_temporaries(out / CHECKPOINT_NAME)


def run_files(out: Path) -> list[str]:
    """What of an earlier run ``out`` holds: its checkpoint, log.csv, metrics.json, TensorBoard
    event files. Other files (a README, data) do not make it a run's folder."""
    if not out.is_dir():
        return []
    found = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if any((out / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    return found


def figures_of(out: Path) -> list[Path]:
    """The figures an earlier run's metrics.json lists, by name inside ``out`` only."""
    try:
        listed = json.loads((out / "metrics.json").read_text()).get("figures", [])
        names = {Path(str(p)).name for p in listed}
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    return [out / n for n in sorted(names) if n.endswith(_FIGURE_SUFFIXES) and n not in RUN_FILES]


def remove_run(out: Path) -> None:
    """--overwrite: removes an earlier run's files (never a folder, nor any other file), the
    checkpoint last: a failure on the way keeps it."""
    doomed = [out / "metrics.json", *figures_of(out)]
    doomed += sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    doomed += [out / "log.csv", out / "log.csv.partial", out / CHECKPOINT_NAME]
    for path in doomed:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise OutputFolderError(
                f"--overwrite: cannot remove {path}: {os_reason(err)}; nothing was trained"
            ) from err
    remove_stale_temporaries(out / CHECKPOINT_NAME)


def probe_writable(out: Path) -> None:
    """Creates and removes an empty file named like a checkpoint writer's temporary (so that
    one left by a kill is cleaned up as such)."""
    fd, name = tempfile.mkstemp(dir=out, prefix=f".{CHECKPOINT_NAME}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def write_atomically(path: Path, write, *, newline: str | None = None) -> None:
    """Writes ``path`` through ``write(file)`` into a ``.partial`` sibling, then renames it: a
    full disk or a kill leaves the previous file or none, never half of one."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "w", newline=newline) as f:
            write(f)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
