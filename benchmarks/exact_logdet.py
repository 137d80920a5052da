"""Benchmark: the exact log-det ``log det(I + J_g(x))`` of a LipschitzMLP with the forward-mode
Jacobian (``impflow.logdet.mlp_jacobian``) against autograd Jacobians, side by side in one run.

g = LipschitzMLP([d, hidden, hidden, d], "sin", coeff 0.99), B samples, per-sample dimension
d = 2, 3, 5, 10. Three ways to the same number, each timed with and without a graph:

  forward    impflow.logdet.exact_logdet: one forward-mode pass for g(x) and J, log det(I + J)
             in closed form for d ≤ 2, slogdet otherwise; training differentiates it once
  autograd   the same inside impflow.logdet.autograd_products(): g(x) once, then d reverse-mode
             products with create_graph (training differentiates them twice)
  previous   what the blocks' exact log-det ran before: autograd Jacobian, slogdet, and the
             contractivity check torch.linalg.matrix_norm(J, 2) (an SVD per sample)

Modes: ``train`` (the estimate with graph, then backward of a weighted sum, x requiring grad as
a re-attached root does) and ``eval`` (under no_grad). Calls of the three are interleaved, so
that load on a shared machine hits them alike; the figure is the median.

    python benchmarks/exact_logdet.py --threads 1     # one CPU thread (steadier, shared machine)
    python benchmarks/exact_logdet.py --quick         # small sizes, a smoke run
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow  # noqa: E402
import impflow.logdet as L  # noqa: E402
import impflow.nn as inn  # noqa: E402
from _timing import (
    add_run_arguments,
    apply_quick,
    exit_if_disagreeing,
    interleaved_medians,
    machine_facts,
    positive_int,
    write_json,
)  # noqa: E402

DIMS = [2, 3, 5, 10]
QUICK_DIMS = [2, 5]
IMPLS = ("forward", "autograd", "previous")
MODES = ("train", "eval")


def previous_logdet(g, x):
    """The blocks' exact log-det term before the forward-mode Jacobian."""
    with L.autograd_products():
        jac = L.batch_jacobian(g, x)
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    sign, logdet = torch.linalg.slogdet(eye + jac)
    with torch.no_grad():
        norm = torch.linalg.matrix_norm(jac.detach(), ord=2)
        assert bool((sign > 0).all()) and bool((norm < 1).all())
    return logdet


def forward_logdet(g, x):
    return L.exact_logdet(g, x)


def autograd_logdet(g, x):
    with L.autograd_products():
        return L.exact_logdet(g, x)


ESTIMATES = {"forward": forward_logdet, "autograd": autograd_logdet, "previous": previous_logdet}


def make_call(impl, mode, g, x, weights):
    estimate = ESTIMATES[impl]
    if mode == "eval":

        def call():
            with torch.no_grad():
                return estimate(g, x)

        return call

    def call():
        x_in = x.detach().requires_grad_(True)
        g.zero_grad(set_to_none=True)
        value = estimate(g, x_in)
        (value * weights).sum().backward()
        return value.detach()

    return call


def bench(device, d, mode, batch, hidden, min_seconds, seed=0):
    torch.manual_seed(seed)
    g = inn.LipschitzMLP([d, hidden, hidden, d], activation="sin", coeff=0.99).to(device).eval()
    x = torch.randn(batch, d, device=device) * 0.5
    weights = torch.linspace(0.5, 1.5, batch, device=device)
    calls = [make_call(impl, mode, g, x, weights) for impl in IMPLS]
    values, grads = [], []
    for call in calls:
        values.append(call())
        if mode == "train":  # each call leaves its parameter gradients
            grads.append(
                torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
            )
    agree = max(float((v - values[-1]).abs().max()) for v in values)
    seconds, repeats = interleaved_medians(calls, device, min_seconds, min_repeats=7)
    ms = dict(zip(IMPLS, [s * 1e3 for s in seconds]))
    return {
        "device": device,
        "d": d,
        "mode": mode,
        "B": batch,
        "repeats": repeats,
        **{f"{impl}_ms": ms[impl] for impl in IMPLS},
        "speedup_vs_autograd": ms["autograd"] / ms["forward"],
        "speedup_vs_previous": ms["previous"] / ms["forward"],
        "max_abs_difference": agree,
        **(
            {
                "max_rel_grad_difference": max(
                    float((t - grads[-1]).abs().max() / grads[-1].abs().max().clamp_min(1e-30))
                    for t in grads
                )
            }
            if grads
            else {}
        ),
    }


def print_table(rows):
    header = (
        f"{'device':6} {'d':>3} {'mode':5} | {'forward ms':>10} {'autograd ms':>11} "
        f"{'previous ms':>11} | {'x autograd':>10} {'x previous':>10} | {'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['device']:6} {r['d']:>3} {r['mode']:5} | {r['forward_ms']:>10.2f} "
            f"{r['autograd_ms']:>11.2f} {r['previous_ms']:>11.2f} | "
            f"{r['speedup_vs_autograd']:>10.2f} {r['speedup_vs_previous']:>10.2f} | "
            f"{r['max_abs_difference']:>9.1e}"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batch", type=positive_int, default=5000)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--dims", type=positive_int, nargs="+", default=None)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (torch default)"
    )
    add_run_arguments(parser, "exact_logdet", "small sizes, a smoke run")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_quick(parser, args, dims=QUICK_DIMS, batch=300, hidden=32, min_seconds=0.05)
    dims = args.dims or DIMS
    has_gpu = torch.cuda.is_available()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows = [
        bench(device, d, mode, args.batch, args.hidden, args.min_seconds)
        for device in devices
        for d in dims
        for mode in MODES
    ]
    print_table(rows)
    print(
        f"B = {args.batch}, g: LipschitzMLP [d, {args.hidden}, {args.hidden}, d] sin, coeff 0.99, "
        f"float32; CPU threads: {torch.get_num_threads()}; x = other / forward; max|diff|: "
        f"largest difference of the three log-dets (float32)"
    )
    write_json(
        args.out,
        {
            "benchmark": "exact_logdet",
            "machine": {d: machine_facts(d) for d in devices},
            "config": {
                "batch": args.batch,
                "hidden": args.hidden,
                "threads": torch.get_num_threads(),
                "impflow": impflow.__version__ if hasattr(impflow, "__version__") else None,
            },
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    # float32 rounding leaves these near 1e-7; a wrong path leaves far more.
    exit_if_disagreeing(rows, "max_abs_difference", 1e-4, "the three log-dets")
    with_grads = [r for r in rows if "max_rel_grad_difference" in r]
    exit_if_disagreeing(with_grads, "max_rel_grad_difference", 1e-4, "their gradients")


if __name__ == "__main__":
    main()
