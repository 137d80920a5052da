"""The training loop every task shares: steps under a step and time budget, EMA weights,
atomic checkpoints with exact resume, a NaN guard, logs, a progress bar, and the final
evaluation with its metrics and figures; in one process or in several under ``torchrun``
(DistributedDataParallel).

**Multi-process runs.** Under ``torchrun --nproc_per_node N`` (or in a process group the caller
has initialised) the model is wrapped in DistributedDataParallel and:

- ``--batch-size`` is the *global* batch: every rank draws the same global batch from the
  shared, seeded data generator and trains on its own contiguous slice of ``batch_size / N``
  rows (so the batch must divide evenly). The loss is each rank's mean over its slice, and
  DDP averages the gradients over ranks: the gradient of the mean over the global batch, as in
  one process. With deterministic layers (exact log-determinants) N processes therefore
  follow the single-process run up to floating-point rounding.
- The model is initialised identically on every rank and DDP broadcasts rank 0's parameters
  and buffers. Data-dependent initialisation (ActNorm) and lazily created buffers (spectral
  convolutions) are settled before wrapping, by one pass over the first global batch on every
  rank (see :func:`_first_batch_pass`); every other buffer is put back as it was.
- Every rank other than 0 reseeds torch's global generator (:func:`rank_seed`), so random
  draws inside the model (Hutchinson probes, Russian-roulette lengths) are independent across
  ranks; rank 0 keeps the single-process stream.
- Rank 0 alone writes checkpoints, log.csv, metrics.json and figures, shows the progress bar
  and evaluates (the EMA model); the others receive its metrics. Logged losses and metrics are
  averages over ranks.
- Rank 0 decides when the time budget is spent and tells the others, so every rank stops
  after the same step; a NaN or Inf loss on any rank stops every rank at that step with a
  :class:`NonFiniteLossError` naming the step and the ranks.
- The output folder is looked at and prepared by rank 0 alone (an earlier run there, a folder
  that cannot be written); every rank then raises what it found, so none waits on the others.
- ``--resume``: every rank reads the checkpoint (the output folder must be visible to all
  ranks); each rank's random state is saved and restored when the number of processes is
  unchanged (otherwise the data stream still continues exactly, the ranks' own streams
  restart).

**The output folder.** A folder that holds a run already (its ``checkpoint.pt``, ``log.csv``,
``metrics.json`` or TensorBoard events) is refused unless the run resumes it (``resume``) or
replaces it (``overwrite``, which removes that run's files and the figures its metrics.json
lists, and keeps every other file). An empty, new or otherwise unrelated folder is used as it
is. A folder that cannot be created or written is refused before training; a file that cannot
be written later (a full disk) stops the run with :class:`OutputWriteError`, naming the file,
the reason and the step the checkpoint keeps.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from impflow._warnings import caller_stacklevel
from impflow.train.blowup import blown_up, model_failure
from impflow.train.checkpoint import (
    CheckpointWriteError,
    NonFiniteStateError,
    capture_rng_state,
    load_checkpoint,
    load_module_state,
    os_reason,
    restore_rng_state,
    save_checkpoint,
)
from impflow.train.distributed import ProcessGroup, rank_seed, setup_process_group
from impflow.train.ema import EMA, check_decay
from impflow.train.output_folder import (
    CHECKPOINT_NAME,
    ExistingRunError,
    OutputFolderError,
    OutputWriteError,
    prepare_output,
    write_atomically,
)
from impflow.train.resume_checks import check_resumable, load_optimizer_state
from impflow.train.run_log import RunLog, summary_writer_class
from impflow.train.settings_checks import check_count, check_number, is_int

__all__ = [
    "ExistingRunError",
    "NonFiniteLossError",
    "OutputFolderError",
    "OutputWriteError",
    "ResumeWarning",
    "Task",
    "TrainSettings",
    "train",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, progress: float) -> float:
    """The learning rate's multiplier at ``progress`` in [0, 1] of the run: 1 (``constant``) or
    ``(1 + cos(π·progress)) / 2`` (``cosine``, from 1 down to 0)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def _progress_of(step: int, seconds: float, settings) -> float:
    """How far the run is: the larger of the step and time fractions (a time-budgeted run's
    schedule therefore follows the clock, and is not bit-reproducible across machines)."""
    progress = step / settings.steps
    if settings.time_budget:
        progress = max(progress, seconds / settings.time_budget)
    return progress


class ResumeWarning(UserWarning):
    """A resumed run will not continue as the run that wrote the checkpoint would have."""


def _schedule_of(settings) -> dict:
    return {
        "lr_schedule": settings.lr_schedule,
        "steps": settings.steps,
        "time_budget": settings.time_budget,
    }


def _warn_about_resumed_schedule(saved: dict | None, settings, step: int) -> None:
    """Warns when resuming changes where the learning-rate schedule stands (a cosine schedule
    follows --steps and --time-budget), or when the checkpoint is past --steps already."""
    if step >= settings.steps:
        warnings.warn(
            f"the checkpoint is at step {step}, not before --steps {settings.steps}: there is "
            "nothing left to train (raise --steps to train on)",
            ResumeWarning,
            stacklevel=caller_stacklevel(),
        )
    if saved is None:
        return
    now = _schedule_of(settings)
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if saved.get("lr_schedule") == now["lr_schedule"] == "constant":
        changed = {}  # a constant rate does not follow --steps or --time-budget
    if changed:
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        warnings.warn(
            f"resuming with another schedule ({what}): the {settings.lr_schedule} learning "
            "rate follows --steps and --time-budget, so it jumps here and the run will not "
            "match one that ran straight through",
            ResumeWarning,
            stacklevel=caller_stacklevel(),
        )


class NonFiniteLossError(RuntimeError):
    """The loss, the weights or a value inside the model became NaN or Inf (or the weights so
    large that their norms overflow); the run stopped and the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """What every task's run shares (the CLI's common options).

    Attributes:
        out: output directory (metrics.json, log.csv, figures, checkpoint.pt).
        steps: optimisation steps in all (a resumed run continues up to it).
        time_budget: seconds of training in all (resumed runs count the time already spent);
            ``None`` for no limit. The run stops cleanly before a step that would start after it.
        lr, weight_decay: Adam's.
        lr_schedule: ``"constant"`` or ``"cosine"`` (to 0 at the end of ``steps`` or of
            ``time_budget``, whichever comes first; see :func:`lr_factor`).
        ema_decay: decay of the evaluation weights' moving average.
        grad_clip: clip the gradient norm to this (``None``: no clipping).
        log_every: steps between log rows (and progress-bar updates).
        ckpt_every: steps between checkpoints (one is always written at the end).
        seed: seeds the model's initialisation, the data stream and every random draw.
        resume: continue from ``out/checkpoint.pt`` (an error if it is missing).
        overwrite: replace a run already in ``out`` (without it, or ``resume``, such a folder is
            refused with :class:`ExistingRunError`).
        progress: show a tqdm progress bar.
        tensorboard: also log to TensorBoard (``out/tensorboard``).
        device: ``cpu``, ``cuda`` (under torchrun: ``cuda:LOCAL_RANK`` on each rank), ...
        dtype: ``"float32"`` or ``"float64"``, of the model and the batches.
        distributed: ``None`` detects torchrun (more than one process) or an initialised
            process group; ``True`` requires one; ``False`` always runs as one process.
        backend: the process group's backend, ``gloo`` or ``nccl`` (default: gloo on the CPU,
            NCCL on CUDA).
    """

    out: Path
    steps: int = 1000
    time_budget: float | None = None
    lr: float = 1e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    ema_decay: float = 0.99
    grad_clip: float | None = None
    log_every: int = 10
    ckpt_every: int = 200
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    distributed: bool | None = None
    backend: str | None = None


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
        """The next global batch ``(batch_size, ...)``; under DDP each rank trains on its slice
        of rows, so draw everything from ``generator`` (the same on every rank)."""
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


def _adam(params, **options) -> torch.optim.Adam:
    """Adam with the fused single-kernel update where this torch and device have it (CPU since
    torch 2.4, CUDA): a toy step's update is otherwise ~10 small ops per parameter tensor."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **options)


SEED_LIMIT = 2**63  # seeds are in [0, 2**63): torch's generators take seed + 1 and per-rank seeds


def check_settings(settings: TrainSettings) -> None:
    """Raises ``ValueError`` (``ImportError`` for a missing TensorBoard) for settings that would
    otherwise fail only once the run has started: after its folder, the model and the first
    step."""
    for name in ("steps", "log_every", "ckpt_every"):
        check_count(getattr(settings, name), name)
    check_number(settings.time_budget, "time_budget", low=0, low_allowed=False, optional=True)
    check_number(settings.lr, "lr", low=0, low_allowed=False)
    check_number(settings.weight_decay, "weight_decay", low=0, low_allowed=True)
    check_number(settings.grad_clip, "grad_clip", low=0, low_allowed=False, optional=True)
    if not (is_int(settings.seed) and 0 <= settings.seed < SEED_LIMIT):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {settings.seed!r}")
    if settings.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {settings.lr_schedule!r}")
    if settings.resume and settings.overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
    check_decay(settings.ema_decay, "ema_decay")
    try:
        torch.device(settings.device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda:0' ({err})"
        ) from err
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {settings.dtype!r}")
    if settings.tensorboard:
        summary_writer_class()


def train(task: Task, settings: TrainSettings) -> dict:
    """Runs ``task`` under ``settings``; returns the metrics also written to metrics.json (in a
    multi-process run, rank 0's metrics on every rank)."""
    check_settings(settings)
    group, device = setup_process_group(
        torch.device(settings.device), settings.distributed, settings.backend
    )
    try:
        return _train(task, settings, group, device)
    finally:
        if group.distributed:
            # DistributedDataParallel sits in reference cycles: collect it while its process
            # group exists (freed at interpreter exit instead, it can abort the process).
            gc.collect()
        group.close()


def _train(task: Task, settings: TrainSettings, group: ProcessGroup, device) -> dict:
    out = Path(settings.out)
    ckpt_path = out / CHECKPOINT_NAME
    dtype = DTYPES[settings.dtype]
    config = {"task": task.name, **task.config(), "dtype": settings.dtype}
    _check_batch_size(getattr(task, "batch_size", None), group)
    if settings.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    # Only rank 0 looks and writes; every rank raises what it found (a run there, a folder that
    # cannot be written), so no rank waits on another.
    group.run_on_main(
        lambda: prepare_output(out, resume=settings.resume, overwrite=settings.overwrite),
        "preparing the output folder",
    )

    torch.manual_seed(settings.seed)
    model = task.build_model().to(device=device, dtype=dtype)

    def placed(batch: torch.Tensor) -> torch.Tensor:
        return batch.to(device=device, dtype=dtype if batch.is_floating_point() else None)

    optimizer = _adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    data_gen = torch.Generator().manual_seed(settings.seed + 1)
    ema = None  # created after the first step, once data-dependent layers are initialised
    state = _RunState()
    saved_step = None  # the step the checkpoint on disk holds (None: none of this run)

    if settings.resume:
        # A checkpoint of another model or data is refused with every difference listed.
        # Checkpoints of float32 runs before the --dtype option did not record it.
        ckpt = load_checkpoint(
            ckpt_path, expected={"config": config}, assumed={"config": {"dtype": "float32"}}
        )
        check_resumable(ckpt, ckpt_path)
        load_module_state(model, ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], ckpt_path)
        if ckpt.get("ema") is not None and group.is_main:
            ema = EMA(model, settings.ema_decay)
            load_module_state(ema, ckpt["ema"], what="EMA")
        state = _RunState(ckpt["step"], float(ckpt["seconds"]), list(ckpt.get("history") or []))
        saved_step = state.step
        if group.is_main:
            _warn_about_resumed_schedule(ckpt.get("schedule"), settings, state.step)
        _restore_rng(ckpt, group, settings.seed, state.step, data_gen)
    elif group.rank > 0:
        torch.manual_seed(rank_seed(settings.seed, group.rank))

    model.train()
    wrapped = None  # the DistributedDataParallel module of a multi-process run
    if group.distributed:
        if _has_lazy_state(model):
            _first_batch_pass(task, model, data_gen, placed)
        wrapped = DistributedDataParallel(
            _LossOf(task, model), device_ids=[device.index] if device.type == "cuda" else None
        )

    def loss_of(batch):
        return task.loss(model, batch) if wrapped is None else wrapped(batch)

    def kept() -> str:
        if saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint ({ckpt_path}, step {saved_step}) is kept"

    def _stopped(what: str) -> NonFiniteLossError:
        return NonFiniteLossError(f"{what}; stopped, {kept()}; lower --lr or add --grad-clip")

    def write_failed(path, reason: str) -> OutputWriteError:
        return OutputWriteError(
            f"cannot write {path}: {reason}; stopped at step {state.step}, {kept()}"
        )

    def save():
        nonlocal saved_step
        rng = group.gather(capture_rng_state({"data": data_gen}))  # every rank's

        def write():
            blown = blown_up(model.state_dict(), "parameter")
            if blown is None and ema is not None:
                blown = blown_up(ema.state_dict(), "EMA weight")
            if blown is not None:  # never written over the last good checkpoint
                raise _stopped(f"the weights blew up at step {state.step}: {blown}")
            payload = {
                "config": config,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": None if ema is None else ema.state_dict(),
                "rng": rng[0],
                "step": state.step,
                "seconds": state.seconds,
                "history": state.history,
                "world_size": group.world_size,
                "schedule": _schedule_of(settings),
            }
            if group.distributed:
                payload["rng_per_rank"] = rng
            try:
                # NaN weights never replace the last good checkpoint
                save_checkpoint(ckpt_path, payload, require_finite=True)
            except NonFiniteStateError as err:
                raise _stopped(f"{err.where} holds NaN or Inf at step {state.step}") from err
            except CheckpointWriteError as err:
                raise write_failed(err.path, err.reason) from err

        group.run_on_main(write, "writing the checkpoint")
        saved_step = state.step

    resume_step = state.step if settings.resume else None
    log = None

    def open_log():
        nonlocal log
        log = RunLog(out, tensorboard=settings.tensorboard, resume_step=resume_step)

    group.run_on_main(open_log, "opening log.csv")
    bar = _progress(settings, state.step) if group.is_main else None
    log_error = None  # rank 0's failed log write: every rank stops at the next reduction
    try:
        while state.step < settings.steps:
            # rank 0's clock decides for all: the stop, and the progress the schedule follows
            seconds = group.main_value(state.seconds) if settings.time_budget else 0.0
            if settings.time_budget is not None and seconds >= settings.time_budget:
                break
            for param_group in optimizer.param_groups:
                param_group["lr"] = settings.lr * lr_factor(
                    settings.lr_schedule, _progress_of(state.step, seconds, settings)
                )
            started = time.perf_counter()
            batch = placed(_shard(task.sample_batch(data_gen), group))
            try:
                loss, metrics = loss_of(batch)
            except Exception as err:
                # Weights blown up far enough that a layer's output is Inf stop a flow layer
                # before the loss, or fail its checks (contractivity): the same failure as a
                # non-finite loss, reported alike. (In a multi-process run only this rank
                # knows: the others stop when its process group goes.)
                failure = model_failure(err, model, state.step + 1, group)
                if failure is None:
                    raise
                raise _stopped(failure) from err
            loss_value, metrics, bad_ranks, stop = _reduce_step(
                loss, metrics, group, stop=log_error is not None
            )
            if stop:
                raise log_error or OutputWriteError(
                    "rank 0 could not write log.csv (its error is in rank 0's output)"
                )
            if bad_ranks:
                where = ""
                if group.distributed:
                    where = f" (non-finite on rank {', '.join(map(str, bad_ranks))} of "
                    where += f"{group.world_size})"
                raise _stopped(f"the loss is {loss_value:g} at step {state.step + 1}{where}")
            try:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
            except Exception as err:
                failure = model_failure(err, model, state.step + 1, group)
                if failure is None:
                    raise
                raise _stopped(failure) from err
            if group.is_main:  # only rank 0 evaluates and saves the EMA weights
                if ema is None:
                    ema = EMA(model, settings.ema_decay)
                else:
                    ema.update(model)
            state.step += 1
            state.seconds += time.perf_counter() - started
            row = {
                "step": state.step,
                "seconds": round(state.seconds, 3),
                "loss": loss_value,
                **metrics,
            }
            if state.step % settings.log_every == 0 or state.step == 1:
                state.history.append(row)
                if log is not None and log_error is None:
                    try:
                        log.write(row)
                    except OSError as err:
                        log_error = write_failed(log.path, os_reason(err))
                        if not group.distributed:
                            raise log_error from err
                if bar is not None:
                    bar.set_postfix({k: _short(v) for k, v in row.items() if k != "step"})
            if bar is not None:
                bar.update(1)
            if state.step % settings.ckpt_every == 0:
                save()
    finally:
        wrapped = None  # unreachable now, also from a traceback (see train)
        if bar is not None:
            bar.close()
        if log is not None:
            with contextlib.suppress(OSError):  # rows were flushed; keep the first error
                log.close()
    if group.from_main(log_error is not None):  # a failed write of the last rows
        raise log_error or OutputWriteError(
            "rank 0 could not write log.csv (its error is in rank 0's output)"
        )
    save()

    def evaluate():
        eval_model = ema.shadow if ema is not None else model
        eval_model.eval()
        metrics = {
            "task": task.name,
            "iterations": state.step,
            "seconds": round(state.seconds, 3),
            "world_size": group.world_size,
            **task.evaluate(eval_model),
        }
        try:
            metrics["figures"] = [str(p) for p in task.figures(eval_model, out)]
        except OSError as err:
            raise finished_but(err.filename or f"a figure in {out}", err) from err
        metrics["settings"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
        }
        try:
            text = json.dumps(metrics, indent=2) + "\n"
            write_atomically(out / "metrics.json", lambda f: f.write(text))
        except OSError as err:
            raise finished_but(out / "metrics.json", err) from err
        return metrics

    def finished_but(path, err: OSError) -> OutputWriteError:
        return OutputWriteError(
            f"cannot write {path}: {os_reason(err)}; the training finished at step "
            f"{state.step}, which {ckpt_path} holds"
        )

    return group.run_on_main(evaluate, "the final evaluation")


class _LossOf(nn.Module):
    """``forward(batch) = task.loss(model, batch)``. DDP synchronises only what runs inside
    its module's ``forward``, and tasks call other methods (``log_prob``, submodules)."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.model = model
        self.task = task  # not a module: a plain attribute

    def forward(self, batch):
        return self.task.loss(self.model, batch)


def _check_batch_size(batch_size, group: ProcessGroup) -> None:
    if group.distributed and isinstance(batch_size, int) and batch_size % group.world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch, split evenly over the "
            f"{group.world_size} processes: it must be divisible by {group.world_size}"
        )


def _shard(batch: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """This rank's contiguous slice of the global batch (the whole batch in one process)."""
    if not group.distributed:
        return batch
    _check_batch_size(batch.shape[0], group)
    size = batch.shape[0] // group.world_size
    return batch.narrow(0, group.rank * size, size)


def _reduce_step(loss: torch.Tensor, metrics: dict, group: ProcessGroup, stop: bool = False):
    """``(loss, metrics, ranks with a non-finite loss, whether a rank asked to stop)`` with the
    loss and numeric metrics averaged over ranks (equal shards: the global-batch means), in one
    collective. ``stop``: this rank cannot go on (rank 0 could not write its log)."""
    value = float(loss.detach())
    if not group.distributed:
        return value, metrics, ([] if math.isfinite(value) else [0]), stop
    numeric = [
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    n = group.world_size
    packed = torch.zeros(n + 2 + len(numeric), dtype=torch.float64)
    packed[group.rank] = 0.0 if math.isfinite(value) else 1.0
    packed[n] = float(stop)
    packed[n + 1] = value
    for i, k in enumerate(numeric):
        packed[n + 2 + i] = float(metrics[k])
    total = group.sum(packed)
    bad = [r for r in range(n) if total[r] > 0]
    means = (total[n + 1 :] / n).tolist()
    averaged = dict(metrics)
    for k, v in zip(numeric, means[1:]):
        averaged[k] = v
    return means[0], averaged, bad, bool(total[n] > 0)


def _restore_rng(ckpt: dict, group: ProcessGroup, seed: int, step: int, data_gen) -> None:
    """Each rank's own saved random state when the number of processes is unchanged;
    otherwise rank 0's (the data stream, the same on every rank) and, on other ranks, a fresh
    stream of their own."""
    per_rank = ckpt.get("rng_per_rank")
    if group.distributed and per_rank is not None and len(per_rank) == group.world_size:
        restore_rng_state(per_rank[group.rank], {"data": data_gen})
        return
    restore_rng_state(ckpt["rng"], {"data": data_gen})
    if group.rank > 0:
        torch.manual_seed(rank_seed(seed, group.rank, step))


def _has_lazy_state(model: nn.Module) -> bool:
    """Whether a layer still waits for data: an ``initialized`` flag that is False (ActNorm)
    or an empty placeholder buffer (a spectral convolution's vectors before the first
    forward)."""
    for name, buf in model.named_buffers():
        if buf.numel() == 0:
            return True
        if name.rsplit(".", 1)[-1] == "initialized" and not bool(buf.all()):
            return True
    return False


def _first_batch_pass(task: Task, model: nn.Module, data_gen, placed) -> None:
    """Settles data-dependent initialisation and lazily created buffers before DDP wraps the
    model (DDP broadcasts rank 0's state when it wraps, and afterwards only the buffers it
    found then), by one loss evaluation on the first global batch on every rank.

    ActNorm then initialises from the statistics of the global batch, exactly as the first
    step of a single process would. The data generator and the random state are left as they
    were, and so are the buffers of every layer that did not initialise or create buffers in
    this pass (power-iteration vectors: the first step runs its iterations as usual).
    """
    before = {
        id(m): {n: b.detach().clone() for n, b in m.named_buffers(recurse=False)}
        for m in model.modules()
    }
    data_state = data_gen.get_state()
    batch = placed(task.sample_batch(data_gen))
    data_gen.set_state(data_state)
    with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []):
        task.loss(model, batch)
    with torch.no_grad():
        for m in model.modules():
            old, now = before[id(m)], dict(m.named_buffers(recurse=False))
            settled = "initialized" in now or any(
                name not in old or old[name].shape != buf.shape for name, buf in now.items()
            )
            if not settled:
                for name, buf in now.items():
                    buf.copy_(old[name])


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
