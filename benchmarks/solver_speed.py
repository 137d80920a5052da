"""The main benchmark: the fused Broyden op and solver against the plain-PyTorch reference path.

For each (B, d, m) and device it times, side by side in one run:
  * one Broyden step (rank-one update + history write + next step) with a full history:
    ``impflow.ops.broyden_step`` vs ``impflow.ops.reference.broyden_step_reference``
    (the original ImpFlow/DEQ algorithm: einsums over the history for every product);
  * a 20-iteration solve of a cheap coupled contraction: ``broyden(impl="fused")`` vs
    ``broyden(impl="reference")`` (the same solver loop; the step and the per-sample
    bookkeeping are the fused ops or their plain-PyTorch references);
and reports the bytes one step must move (each history read once, the vectors read, the new
pair and the step written), the achieved GB/s and the copy bandwidth measured in the same run.
Before its figures count, each configuration checks that both sides compute the same: the
step's error against float64, and the two solves' iterates and step counts; the script exits
with code 1 when they disagree.
Fused and reference are timed in turns, in blocks of about 50 ms: each is measured warm, as in
a loop, and load drifting on a shared machine hits both alike, which keeps the ratio steady.

    python benchmarks/solver_speed.py                  # CPU, and CUDA when present
    python benchmarks/solver_speed.py --quick          # small sizes, a smoke run
    python benchmarks/solver_speed.py --out results/solver_speed.json
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow  # noqa: E402
from _timing import copy_bandwidth, interleaved_medians, machine_facts, positive_seconds, write_json  # noqa: E402
from impflow.ops import broyden_step  # noqa: E402
from impflow.ops.reference import broyden_step_reference  # noqa: E402
from impflow.solvers import broyden  # noqa: E402
from impflow.solvers.broyden import broyden_history  # noqa: E402

SIZES = [(5000, 2, 30), (1000, 64, 30), (256, 3072, 30)]
QUICK_SIZES = [(500, 2, 30), (100, 64, 30), (16, 3072, 30)]
SOLVE_ITERATIONS = 20
# Fused and reference take turns in blocks of this many seconds, each measured warm (as in a
# loop of solves) while drifting load on a shared machine hits both alike.
BLOCKS = {"block_seconds": 0.05}


def step_state(B, d, m, dtype, device, impl, seed=0):
    """A full history (n_valid = m), in the layout the solver uses with ``impl``, and vectors
    shaped like those of a real solve."""
    gen = torch.Generator().manual_seed(seed)
    U, V = broyden_history(B, d, m, dtype, device, impl)
    U.copy_(0.3 / d**0.5 * torch.randn(B, m, d, generator=gen, dtype=dtype))
    V.copy_(0.3 / d**0.5 * torch.randn(B, m, d, generator=gen, dtype=dtype))
    dz = torch.randn(B, d, generator=gen, dtype=dtype)
    dF = -dz + 0.3 * torch.randn(B, d, generator=gen, dtype=dtype)
    F = torch.randn(B, d, generator=gen, dtype=dtype)
    active = torch.ones(B, dtype=torch.bool)
    return [U, V] + [t.to(device) for t in (dz, dF, F, active)]


def step_bytes(B, d, m, itemsize):
    """Fewest bytes one step moves: U and V read once, dz, dF, F read, u, v, step written."""
    return (2 * B * m * d + 6 * B * d) * itemsize + B


def coupled_contraction(B, d, dtype, device, seed=1):
    """fn(z) = 0.9 tanh((z + roll(z)) / 2) + c - z: Lipschitz 0.9 map, neighbours coupled."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(B, d, generator=gen, dtype=dtype).to(device)

    def fn(z):
        return 0.9 * torch.tanh(0.5 * (z + torch.roll(z, 1, dims=1))) + c - z

    return fn


def _relative_error(out, truth):
    return float((out.double() - truth).norm() / truth.norm().clamp_min(1e-300))


def step_errors(B, d, m, dtype, device):
    """Relative errors of the fused and the reference step (the step and the new pair) against
    the reference run in float64 on the same values."""
    slot, outputs = m // 2, {}
    for name, op in (("fused", broyden_step), ("reference", broyden_step_reference)):
        state = step_state(B, d, m, dtype, device, name)
        outputs[name] = (op(*state, slot, m), state[0][:, slot], state[1][:, slot])
    state = step_state(B, d, m, dtype, device, "reference")
    state = [t.double() if t.is_floating_point() else t for t in state]
    truth = (broyden_step_reference(*state, slot, m), state[0][:, slot], state[1][:, slot])
    return {
        name: max(_relative_error(o, t) for o, t in zip(outputs[name], truth)) for name in outputs
    }


def check_agreement(row, dtype):
    """What makes the timings comparable: the fused step is as accurate as the reference
    (against float64; a d = 2 history is ill-conditioned, so both err there), and both solves
    end at the same iterates after the same mean number of steps."""
    eps = torch.finfo(dtype).eps
    problems = []
    if row["step_fused_error"] > 4 * row["step_reference_error"] + 32 * eps:
        fused, reference = row["step_fused_error"], row["step_reference_error"]
        problems.append(f"step error {fused:.2e} (reference {reference:.2e})")
    if row["solve_max_difference"] > 1e3 * eps * max(1.0, row["solve_max_abs_z"]):
        problems.append(f"solves differ by {row['solve_max_difference']:.2e}")
    if abs(row["solve_fused_mean_steps"] - row["solve_reference_mean_steps"]) > 0.05:
        problems.append("solves took different numbers of steps")
    return problems


def bench_config(B, d, m, device, dtype, min_seconds):
    itemsize = torch.finfo(dtype).bits // 8
    row = {"B": B, "d": d, "m": m, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    slot = m // 2
    steps = {}
    for name, op in (("fused", broyden_step), ("reference", broyden_step_reference)):
        state = step_state(B, d, m, dtype, device, name)
        steps[name] = lambda op=op, state=state: op(*state, slot, m)
    seconds, n = interleaved_medians(list(steps.values()), device, min_seconds, **BLOCKS)
    for name, sec in zip(steps, seconds):
        row[f"step_{name}_ms"] = sec * 1e3
    row["step_fused_repeats"] = n  # the reference, slower, ran fewer in the same time
    row["step_bytes"] = step_bytes(B, d, m, itemsize)
    row["step_fused_GBps"] = row["step_bytes"] / (row["step_fused_ms"] / 1e3) / 1e9
    row["step_reference_GBps"] = row["step_bytes"] / (row["step_reference_ms"] / 1e3) / 1e9
    row["step_speedup"] = row["step_reference_ms"] / row["step_fused_ms"]
    errors = step_errors(B, d, m, dtype, device)
    row["step_fused_error"], row["step_reference_error"] = errors["fused"], errors["reference"]

    fn = coupled_contraction(B, d, dtype, device)
    z0 = torch.zeros(B, d, dtype=dtype, device=device)
    solves = {
        name: lambda name=name: broyden(
            fn, z0, max_iter=SOLVE_ITERATIONS, tol=1e-6, history=m, impl=name, warn=False
        )
        for name in ("fused", "reference")
    }
    seconds, n = interleaved_medians(
        list(solves.values()), device, min_seconds, min_repeats=3, **BLOCKS
    )
    row["solve_fused_repeats"] = n
    roots = {}
    for (name, solve), sec in zip(solves.items(), seconds):
        roots[name], stats = solve()
        row[f"solve_{name}_ms"] = sec * 1e3
        row[f"solve_{name}_mean_steps"] = float(stats.nstep.float().mean())
        row[f"solve_{name}_max_residual"] = float(stats.residual.max())
    row["solve_speedup"] = row["solve_reference_ms"] / row["solve_fused_ms"]
    row["solve_max_difference"] = float((roots["fused"] - roots["reference"]).abs().max())
    row["solve_max_abs_z"] = float(roots["reference"].abs().max())
    row["problems"] = check_agreement(row, dtype)
    return row


def print_table(rows, bandwidths):
    header = (
        f"{'device':6} {'B':>5} {'d':>5} {'m':>3} | {'step fused ms':>13} {'ref ms':>9} {'x':>6} "
        f"{'GB/s':>7} {'%copy':>6} | {'solve fused ms':>14} {'ref ms':>9} {'x':>6} {'steps':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        share = 100 * r["step_fused_GBps"] / bandwidths[r["device"]]
        print(
            f"{r['device']:6} {r['B']:>5} {r['d']:>5} {r['m']:>3} | "
            f"{r['step_fused_ms']:>13.3f} {r['step_reference_ms']:>9.3f} "
            f"{r['step_speedup']:>6.1f} {r['step_fused_GBps']:>7.2f} "
            f"{share:>6.1f} | {r['solve_fused_ms']:>14.2f} {r['solve_reference_ms']:>9.2f} "
            f"{r['solve_speedup']:>6.1f} {r['solve_fused_mean_steps']:>5.1f}"
        )
    for device, bw in bandwidths.items():
        print(f"copy bandwidth on {device}: {bw:.1f} GB/s (read + write, measured in this run)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--device",
        choices=["all", "cpu", "cuda"],
        default="all",
        help="'all': CPU, plus CUDA when a GPU and CUDA kernels are present",
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--min-seconds", type=positive_seconds, default=1.0, help="timing budget per measurement"
    )
    parser.add_argument("--out", default="results/solver_speed.json", help="JSON output path")
    args = parser.parse_args(argv)

    devices = ["cpu"] if args.device in ("all", "cpu") else []
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    if args.device in ("all", "cuda") and has_gpu:
        devices.append("cuda")
    dtype = getattr(torch, args.dtype)
    sizes = QUICK_SIZES if args.quick else SIZES

    rows, bandwidths, facts = [], {}, {}
    for device in devices:
        bandwidths[device] = copy_bandwidth(device)
        facts[device] = machine_facts(device)
        for B, d, m in sizes:
            rows.append(bench_config(B, d, m, device, dtype, args.min_seconds))
            print(f"  done {device} B={B} d={d} m={m}", file=sys.stderr, flush=True)
    print_table(rows, bandwidths)
    write_json(
        args.out,
        {
            "benchmark": "solver_speed",
            "machine": facts,
            "copy_bandwidth_GBps": bandwidths,
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    failed = [r for r in rows if r["problems"]]
    for r in failed:
        print(
            f"error: fused and reference disagree at {r['device']} B={r['B']} d={r['d']} "
            f"m={r['m']}: {'; '.join(r['problems'])}",
            file=sys.stderr,
        )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
