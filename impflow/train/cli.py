"""``python -m impflow.train <task> [options]`` (also the ``impflow-train`` command); in several
processes with ``torchrun --nproc_per_node N -m impflow.train <task> [options]``, where
``--batch-size`` is the global batch (see :mod:`impflow.train.loop`)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from impflow.data.images import CIFAR10_FILES, IMAGE_DATASETS
from impflow.data.tabular import TABULAR_DATASETS
from impflow.data.toy import TOY_DATASETS
from impflow.train.distributed import BACKENDS, torchrun_environment
from impflow.train.checkpoint import CheckpointError
from impflow.train.loop import (
    LR_SCHEDULES,
    SEED_LIMIT,
    ExistingRunError,
    NonFiniteLossError,
    OutputFolderError,
    OutputWriteError,
    TrainSettings,
    check_settings,
    train,
)
from impflow.train.models import MODEL_KINDS

__all__ = ["main"]


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _nonnegative_float(text):
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _decay(text):
    value = float(text)
    if not 0 <= value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _seed(text):
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text}")
    return value


def _dims(text):
    try:
        dims = tuple(int(d) for d in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128-128, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 128-128, got {text!r}")
    return dims


def _nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _evaluation_options(p, *, eval_batch_size):
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=None,
        help="evaluate the first N rows/images of each split (default: all)",
    )
    p.add_argument("--eval-batch-size", type=_positive_int, default=eval_batch_size)


def _common(p: argparse.ArgumentParser, *, steps, batch_size, lr=1e-3, lr_schedule="constant"):
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--steps", type=_positive_int, default=steps, help="optimisation steps")
    p.add_argument(
        "--time-budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="stop cleanly once this much training time is spent",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=batch_size,
        help="global batch: under torchrun, split evenly over the processes",
    )
    p.add_argument("--lr", type=_positive_float, default=lr)
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=lr_schedule,
        help="cosine: decay to 0 over --steps or --time-budget, whichever ends first",
    )
    p.add_argument("--weight-decay", type=_nonnegative_float, default=0.0)
    p.add_argument("--ema-decay", type=_decay, default=0.99)
    p.add_argument("--grad-clip", type=_positive_float, default=None)
    p.add_argument("--log-every", type=_positive_int, default=10)
    p.add_argument("--ckpt-every", type=_positive_int, default=200)
    p.add_argument("--seed", type=_seed, default=0)
    rerun = p.add_mutually_exclusive_group()
    rerun.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    rerun.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in OUT (its checkpoint, log, metrics and figures; "
        "other files are kept); without it, or --resume, such a folder is refused",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda (torchrun: cuda:LOCAL_RANK), ...")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="process group backend under torchrun (default: gloo on cpu, nccl on cuda)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")


def _model_options(p, *, hidden, activation="sin", coeff=0.99, n_power_iterations=5):
    p.add_argument("--hidden", type=_dims, default=hidden, help="hidden widths, e.g. 128-128")
    p.add_argument("--activation", default=activation)
    p.add_argument("--coeff", type=float, default=coeff)
    p.add_argument("--n-power-iterations", type=_positive_int, default=n_power_iterations)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m impflow.train", description=__doc__)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")

    toy = tasks.add_parser("toy", help="2-D densities (checkerboard, 8gaussians, ...)")
    toy.add_argument("--data", choices=TOY_DATASETS, default="checkerboard")
    toy.add_argument("--model", choices=MODEL_KINDS, default="implicit")
    toy.add_argument("--blocks", type=_positive_int, default=4)
    toy.add_argument("--actnorm", action="store_true", help="ActNorm before every block")
    # Measured on a 2-core CPU: at equal wall-clock, 64-wide networks take twice the steps of
    # 128-wide ones and end lower (README, Reproductions).
    _model_options(toy, hidden=(64, 64))
    _common(toy, steps=5000, batch_size=500, lr=3e-3, lr_schedule="cosine")

    fit1d = tasks.add_parser("fit1d", help="1-D function fitting: ImpFlow vs ResFlow block")
    _model_options(fit1d, hidden=(32,), activation="elu", coeff=0.97)
    _common(fit1d, steps=500, batch_size=256, lr=3e-2)

    tabular = tasks.add_parser(
        "tabular", help="POWER, GAS, HEPMASS, MINIBOONE, BSDS300 (the MAF release's files)"
    )
    tabular.add_argument("--data", choices=TABULAR_DATASETS, required=True)
    tabular.add_argument(
        "--root", type=Path, required=True, help="the MAF release's datasets folder"
    )
    tabular.add_argument("--model", choices=MODEL_KINDS, default="implicit")
    tabular.add_argument(
        "--blocks",
        type=_positive_int,
        default=None,
        help="default: 5 (implicit) or 10 (residual): the same number of networks",
    )
    tabular.add_argument("--no-actnorm", action="store_true", help="no ActNorm between blocks")
    tabular.add_argument("--logdet", choices=("series", "exact", "auto"), default="series")
    _model_options(tabular, hidden=(128, 128, 128, 128))
    _evaluation_options(tabular, eval_batch_size=1000)
    _common(tabular, steps=10000, batch_size=1000)

    image = tasks.add_parser("image", help="multi-scale image flow: 8x8 digits or CIFAR-10")
    image.add_argument("--data", choices=IMAGE_DATASETS, default="digits")
    image.add_argument("--root", type=Path, default=None, help="CIFAR-10's folder (python version)")
    image.add_argument("--model", choices=MODEL_KINDS, default="implicit")
    image.add_argument(
        "--blocks",
        type=_dims,
        default=None,
        help="blocks per level, e.g. 2-2 (default: digits 2-2, cifar10 2-2-2; twice as many "
        "for residual: the same number of networks)",
    )
    image.add_argument("--hidden-channels", type=_positive_int, default=None)
    image.add_argument("--kernels", type=_dims, default=(3, 1, 3), help="e.g. 3-1-3")
    image.add_argument("--activation", default="lipswish")
    image.add_argument("--coeff", type=float, default=0.9)
    image.add_argument("--n-power-iterations", type=_positive_int, default=5)
    image.add_argument("--alpha", type=float, default=0.05, help="logit transform's alpha")
    image.add_argument(
        "--n-exact-terms", type=_nonnegative_int, default=2, help="log-det series, training"
    )
    image.add_argument("--figure-samples", type=_positive_int, default=64)
    _evaluation_options(image, eval_batch_size=256)
    _common(image, steps=2000, batch_size=64)
    return parser


def _network_options(args) -> dict:
    """The options of ``_model_options``, as the tasks' keyword arguments."""
    return {
        "hidden": args.hidden,
        "activation": args.activation,
        "coeff": args.coeff,
        "n_power_iterations": args.n_power_iterations,
    }


def make_task(args):
    if args.task == "toy":
        from impflow.train.toy import ToyTask

        return ToyTask(
            args.data,
            args.model,
            args.blocks,
            **_network_options(args),
            actnorm=args.actnorm,
            batch_size=args.batch_size,
        )
    if args.task == "fit1d":
        from impflow.train.fit1d import Fit1dTask

        return Fit1dTask(
            **_network_options(args),
            batch_size=args.batch_size,
        )
    if args.task == "tabular":
        from impflow.train.tabular import TabularTask

        return TabularTask(
            args.data,
            args.root,
            args.model,
            args.blocks,
            **_network_options(args),
            actnorm=not args.no_actnorm,
            logdet=args.logdet,
            batch_size=args.batch_size,
            eval_samples=args.eval_samples,
            eval_batch_size=args.eval_batch_size,
        )
    if args.task == "image":
        from impflow.train.image import ImageTask

        return ImageTask(
            args.data,
            args.root,
            args.model,
            args.blocks,
            hidden_channels=args.hidden_channels,
            kernel_sizes=args.kernels,
            activation=args.activation,
            coeff=args.coeff,
            n_power_iterations=args.n_power_iterations,
            alpha=args.alpha,
            n_exact_terms=args.n_exact_terms,
            batch_size=args.batch_size,
            eval_samples=args.eval_samples,
            eval_batch_size=args.eval_batch_size,
            figure_samples=args.figure_samples,
        )
    raise ValueError(f"unknown task {args.task!r}")  # argparse rejects it first


def settings_from(args) -> TrainSettings:
    return TrainSettings(
        out=args.out,
        steps=args.steps,
        time_budget=args.time_budget,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        ema_decay=args.ema_decay,
        grad_clip=args.grad_clip,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tensorboard=args.tensorboard,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "image" and args.data == "cifar10" and args.root is None:
        parser.error(
            "image --data cifar10 needs --root: the folder of CIFAR-10's python version, "
            f"holding {', '.join(CIFAR10_FILES)}"
        )
    processes = int(os.environ["WORLD_SIZE"]) if torchrun_environment() else 1
    if args.batch_size % processes:
        parser.error(
            f"--batch-size {args.batch_size} is the global batch, split evenly over the "
            f"{processes} processes: it must be divisible by {processes}"
        )
    try:
        task = make_task(args)
        # Settings and model options that would otherwise fail only once the run has started
        # (after its folder and progress bar): building the model once checks them all.
        settings = settings_from(args)
        check_settings(settings)
        task.build_model()
    except (ValueError, FileNotFoundError, ImportError) as err:
        # A bad value, a missing dataset (the message names the files expected), or a missing
        # optional package: a usage error (exit code 2), not a traceback.
        parser.error(str(err))
    main_process = int(os.environ.get("RANK", "0")) == 0  # torchrun: only rank 0 reports
    try:
        metrics = train(task, settings)
    except (NonFiniteLossError, OutputWriteError) as err:
        # The run started and stopped: diverged, or a file could not be written (the last good
        # checkpoint is kept, and the message says which step it holds).
        if main_process:
            print(f"error: {err}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, ExistingRunError, OutputFolderError) as err:
        # --resume without a checkpoint, or with a corrupt one or one of another run; an earlier
        # run in --out; an --out that cannot be written: a usage error, found before training
        # (and nothing in --out was changed).
        if main_process:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    shown = {k: v for k, v in metrics.items() if k not in ("settings", "figures")}
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )
    print(f"wrote {args.out / 'metrics.json'}")
    return 0
