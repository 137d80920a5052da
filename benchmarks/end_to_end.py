"""End-to-end benchmark: training iterations per second and samples per second of the models
``python -m impflow.train`` trains, ImpFlow against a ResFlow of the same size, side by side.

Models (the tasks' own builders and data, so the numbers are those of the CLI's runs):

  toy      checkerboard, ImpFlow 4 blocks vs ResFlow 8 blocks (the paper's comparison), Sin MLPs
           2-64-64-2 (the toy task's default width), exact log-det; training batch 500, 500 samples
  digits   8×8 digits multi-scale flow, ImpFlow 2-2 blocks vs ResFlow 4-4 (the same number of
           3-1-3 LipSwish convnets, 32 channels), series log-det; training batch 64, 64 samples

Measured per model and device:

  train    one optimisation step: draw the batch, -log p (ImpFlow: forward root solves), backward
           (ImpFlow: adjoint solves), Adam step; reported as iterations per second
  sample   flow.sample((n,)) in eval mode after update_lipschitz: every block inverted by a root
           solve; reported as samples per second

The two models' calls alternate (so load on a shared machine hits both alike); each figure is a
median, and "x" is ImpFlow's time over ResFlow's from the same run.

    python benchmarks/end_to_end.py                  # CPU, and CUDA when present
    python benchmarks/end_to_end.py --quick          # smaller batches, a smoke run
    python benchmarks/end_to_end.py --threads 1      # one CPU thread (steadier when shared)
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow  # noqa: E402
from _timing import interleaved_medians, machine_facts, positive_int, write_json  # noqa: E402
from impflow.nn import update_lipschitz  # noqa: E402
from impflow.train.evaluation import count_parameters  # noqa: E402
from impflow.train.image import ImageTask  # noqa: E402
from impflow.train.solver_metrics import mean_forward_iterations  # noqa: E402
from impflow.train.toy import ToyTask  # noqa: E402

KINDS = ("implicit", "residual")
# model -> (batch, samples) in full and in quick mode
SIZES = {"toy": (500, 500), "digits": (64, 64)}
QUICK_SIZES = {"toy": (100, 100), "digits": (16, 16)}


def make_task(name, kind, batch):
    if name == "toy":
        return ToyTask("checkerboard", kind, 4 if kind == "implicit" else 8, batch_size=batch)
    return ImageTask("digits", model=kind, batch_size=batch)


class Setup:
    """A model of one kind on ``device``, with its optimizer and data stream."""

    def __init__(self, name, kind, batch, n_samples, device):
        torch.manual_seed(0)
        self.task = make_task(name, kind, batch)
        self.model = self.task.build_model().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(1)
        self.device, self.n_samples = device, n_samples
        self.solver_iters = []

    def train_step(self):
        self.model.train()
        batch = self.task.sample_batch(self.generator).to(self.device)
        loss, metrics = self.task.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if "solver_iters" in metrics:
            self.solver_iters.append(metrics["solver_iters"])

    def prepare_sampling(self):
        self.model.eval()
        update_lipschitz(self.model, 200)

    def sample(self):
        with torch.no_grad():
            self.model.sample((self.n_samples,))


def alternating_medians(fns, device, *, min_repeats, min_seconds, warmup=2):
    """``name -> (median seconds, repeats)`` of each function of ``fns``, called in turn."""
    seconds, repeats = interleaved_medians(
        list(fns.values()), device, min_seconds, min_repeats=min_repeats, warmup=warmup
    )
    return {name: (s, repeats) for name, s in zip(fns, seconds)}


def bench_model(name, device, sizes, min_repeats, min_seconds):
    batch, n_samples = sizes[name]
    setups = {kind: Setup(name, kind, batch, n_samples, device) for kind in KINDS}
    train = alternating_medians(
        {k: s.train_step for k, s in setups.items()},
        device,
        min_repeats=min_repeats,
        min_seconds=min_seconds,
    )
    for s in setups.values():
        s.prepare_sampling()
    sample = alternating_medians(
        {k: s.sample for k, s in setups.items()},
        device,
        min_repeats=min_repeats,
        min_seconds=min_seconds,
        warmup=1,
    )
    rows = []
    for kind, s in setups.items():
        row = {
            "model": name,
            "kind": kind,
            "device": str(device),
            "blocks": list(s.task.blocks) if name == "digits" else s.task.blocks,
            "parameters": count_parameters(s.model),
            "batch": batch,
            "n_samples": n_samples,
            "train_step_ms": train[kind][0] * 1e3,
            "train_repeats": train[kind][1],
            "train_it_per_s": 1.0 / train[kind][0],
            "sample_ms": sample[kind][0] * 1e3,
            "sample_repeats": sample[kind][1],
            "samples_per_s": n_samples / sample[kind][0],
            "train_solver_iters": (statistics.mean(s.solver_iters) if s.solver_iters else None),
        }
        if kind == "implicit":
            row["last_forward_iters"] = mean_forward_iterations(s.model).get("solver_iters")
        rows.append(row)
    implicit, residual = rows
    implicit["train_time_ratio"] = implicit["train_step_ms"] / residual["train_step_ms"]
    implicit["sample_time_ratio"] = implicit["sample_ms"] / residual["sample_ms"]
    return rows


def print_table(rows):
    header = (
        f"{'device':6} {'model':6} {'kind':8} {'blocks':>7} {'params':>7} {'batch':>5} | "
        f"{'train it/s':>10} {'t/t':>5} {'iters':>5} | {'samples/s':>10} {'t/t':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        blocks = r["blocks"] if isinstance(r["blocks"], int) else "-".join(map(str, r["blocks"]))
        ratio_t = f"{r['train_time_ratio']:.2f}" if "train_time_ratio" in r else ""
        ratio_s = f"{r['sample_time_ratio']:.2f}" if "sample_time_ratio" in r else ""
        iters = f"{r['train_solver_iters']:.1f}" if r["train_solver_iters"] is not None else ""
        print(
            f"{r['device']:6} {r['model']:6} {r['kind']:8} {blocks:>7} {r['parameters']:>7} "
            f"{r['batch']:>5} | {r['train_it_per_s']:>10.2f} {ratio_t:>5} {iters:>5} | "
            f"{r['samples_per_s']:>10.1f} {ratio_s:>5}"
        )
    print(
        "t/t: ImpFlow's time per step (or per sampling call) over ResFlow's, same run (not a "
        "speed-up: above 1, ImpFlow is slower); "
        "iters: mean forward solver iterations per ImpFlow block in training"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["all", "cpu", "cuda"],
        default="all",
        help="'all': CPU, plus CUDA when a GPU and CUDA kernels are present",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SIZES), default=["toy", "digits"])
    parser.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    parser.add_argument(
        "--min-seconds", type=float, default=None, help="timing budget per measurement"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch)")
    parser.add_argument("--out", default="results/end_to_end.json", help="JSON output path")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    devices = ["cpu"] if args.device in ("all", "cpu") else []
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    if args.device in ("all", "cuda") and has_gpu:
        devices.append("cuda")
    sizes = QUICK_SIZES if args.quick else SIZES
    min_repeats = 3 if args.quick else 10
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.5 if args.quick else 5)

    rows, facts = [], {}
    for device in devices:
        facts[device] = machine_facts(device)
        for name in args.models:
            rows.extend(bench_model(name, torch.device(device), sizes, min_repeats, min_seconds))
            print(f"  done {device} {name}", file=sys.stderr, flush=True)
    print_table(rows)
    write_json(
        args.out,
        {"benchmark": "end_to_end", "quick": args.quick, "machine": facts, "rows": rows},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
