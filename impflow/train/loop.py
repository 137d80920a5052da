"""The training loop every task shares: steps under a step and time budget, EMA weights,
atomic checkpoints with exact resume, a NaN guard, logs, a progress bar, and the final
evaluation with its metrics and figures."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from impflow.train.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    restore_rng_state,
    save_checkpoint,
)
from impflow.train.ema import EMA

__all__ = ["NonFiniteLossError", "Task", "TrainSettings", "train"]

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """What every task's run shares (the CLI's common options).

    Attributes:
        out: output directory (metrics.json, log.csv, figures, checkpoint.pt).
        steps: optimisation steps in all (a resumed run continues up to it).
        time_budget: seconds of training in all (resumed runs count the time already spent);
            ``None`` for no limit. The run stops cleanly before a step that would start after it.
        lr, weight_decay: Adam's.
        ema_decay: decay of the evaluation weights' moving average.
        grad_clip: clip the gradient norm to this (``None``: no clipping).
        log_every: steps between log rows (and progress-bar updates).
        ckpt_every: steps between checkpoints (one is always written at the end).
        seed: seeds the model's initialisation, the data stream and every random draw.
        resume: continue from ``out/checkpoint.pt`` (an error if it is missing).
        progress: show a tqdm progress bar.
        tensorboard: also log to TensorBoard (``out/tensorboard``).
    """

    out: Path
    steps: int = 1000
    time_budget: float | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    grad_clip: float | None = None
    log_every: int = 10
    ckpt_every: int = 200
    seed: int = 0
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False
    device: str = "cpu"


class Task:
    """What a task (toy, fit1d, tabular, image) provides to :func:`train`.

    Subclasses set ``name`` and implement the methods; ``config()`` returns the settings that
    define the model and data (a resumed run must have the same ones).
    """

    name = "task"

    def config(self) -> dict:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss to minimise and float metrics to log (e.g. ``bits``, ``solver_iters``)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        """Final metrics of the (EMA) model."""
        return {}

    def figures(self, model: nn.Module, out: Path) -> list:
        return []


@dataclass
class _RunState:
    step: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)


def train(task: Task, settings: TrainSettings) -> dict:
    """Runs ``task`` under ``settings``; returns the metrics also written to metrics.json."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    config = {"task": task.name, **task.config()}
    device = torch.device(settings.device)

    torch.manual_seed(settings.seed)
    model = task.build_model().to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    data_gen = torch.Generator().manual_seed(settings.seed + 1)
    ema = None  # created after the first step, once data-dependent layers are initialised
    state = _RunState()

    if settings.resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        # A checkpoint of another model or data is refused with every difference listed.
        ckpt = load_checkpoint(ckpt_path, expected={"config": config})
        load_module_state(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("ema") is not None:
            ema = EMA(model, settings.ema_decay)
            load_module_state(ema, ckpt["ema"], what="EMA")
        restore_rng_state(ckpt["rng"], {"data": data_gen})
        state = _RunState(ckpt["step"], ckpt["seconds"], list(ckpt.get("history", [])))

    def save():
        save_checkpoint(
            ckpt_path,
            {
                "config": config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "rng": capture_rng_state({"data": data_gen}),
                "step": state.step,
                "seconds": state.seconds,
                "history": state.history,
            },
            require_finite=True,  # NaN weights never replace the last good checkpoint
        )

    log = _Log(out, settings, resume=settings.resume)
    bar = _progress(settings, state.step)
    model.train()
    try:
        while state.step < settings.steps:
            if settings.time_budget is not None and state.seconds >= settings.time_budget:
                break
            started = time.perf_counter()
            batch = task.sample_batch(data_gen).to(device)
            loss, metrics = task.loss(model, batch)
            if not bool(torch.isfinite(loss.detach())):
                kept = ckpt_path if ckpt_path.exists() else "none yet"
                raise NonFiniteLossError(
                    f"the loss is {float(loss.detach()):g} at step {state.step + 1}; stopping. "
                    f"The last good checkpoint ({kept}) is kept; lower --lr or add --grad-clip"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            if ema is None:
                ema = EMA(model, settings.ema_decay)
            else:
                ema.update(model)
            state.step += 1
            state.seconds += time.perf_counter() - started
            row = {
                "step": state.step,
                "seconds": round(state.seconds, 3),
                "loss": float(loss.detach()),
                **metrics,
            }
            if state.step % settings.log_every == 0 or state.step == 1:
                log.write(row)
                state.history.append(row)
                if bar is not None:
                    bar.set_postfix({k: _short(v) for k, v in row.items() if k != "step"})
            if bar is not None:
                bar.update(1)
            if state.step % settings.ckpt_every == 0:
                save()
    finally:
        if bar is not None:
            bar.close()
        log.close()
    save()

    eval_model = ema.shadow if ema is not None else model
    eval_model.eval()
    metrics = {
        "task": task.name,
        "iterations": state.step,
        "seconds": round(state.seconds, 3),
        **task.evaluate(eval_model),
    }
    metrics["figures"] = [str(p) for p in task.figures(eval_model, out)]
    metrics["settings"] = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def _progress(settings: TrainSettings, initial: int):
    if not settings.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=settings.steps, initial=initial, dynamic_ncols=True)


class _Log:
    """log.csv (appended on resume), and TensorBoard scalars when asked for."""

    def __init__(self, out: Path, settings: TrainSettings, resume: bool):
        self.path = out / "log.csv"
        self.file = open(self.path, "a" if resume else "w", newline="")
        self.writer = None
        self.tb = None
        if settings.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from err
            self.tb = SummaryWriter(str(out / "tensorboard"))

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
