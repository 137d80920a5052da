"""log.csv (continued on resume, with the rows a killed run wrote after its last checkpoint
dropped) and TensorBoard scalars when asked for."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from impflow.train.checkpoint import os_reason
from impflow.train.output_folder import OutputFolderError, write_atomically

__all__ = ["RunLog", "drop_rows_after", "summary_writer_class"]


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from err
    return SummaryWriter


def drop_rows_after(path: Path, step: int) -> None:
    """Removes the rows of steps after ``step`` (logged after the last checkpoint of a run that
    was killed: the resumed run logs them again), atomically."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["step"]:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    write_atomically(path, lambda f: csv.writer(f).writerows(kept), newline="")


class RunLog:
    """log.csv (continued on resume), and TensorBoard scalars when asked for."""

    def __init__(self, out: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = out / "log.csv"
        self.writer = None
        self.tb = None
        try:
            if resume_step is not None and self.path.exists():
                drop_rows_after(self.path, resume_step)
            self.file = open(self.path, "a" if resume_step is not None else "w", newline="")
        except OSError as err:
            raise OutputFolderError(
                f"cannot write {self.path}: {os_reason(err)}; nothing was trained"
            ) from err
        if tensorboard:
            try:
                self.tb = summary_writer_class()(str(out / "tensorboard"))
            except OSError as err:
                self.file.close()
                raise OutputFolderError(
                    f"cannot write {out / 'tensorboard'}: {os_reason(err)}; nothing was trained"
                ) from err

    def write(self, row: dict) -> None:
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(row), extrasaction="ignore")
            if self.file.tell() == 0:
                self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
