"""Benchmark: `update_lipschitz` (one fused power-iteration call for every dense spectral
layer) against the per-layer PyTorch loop of the original ResFlow/ImpFlow code, timed side by
side (in turns), after checking that both give the same vectors and σ from the same fresh start
(the run fails otherwise).

The model is the paper's 20-block tabular ImpFlow: 40 LipschitzMLPs of dims
6-128-128-128-128-6 (each block has g_x and g_z), 200 spectral layers, 20 iterations each.

    python benchmarks/power_iteration.py                # CPU, and CUDA when present
    python benchmarks/power_iteration.py --quick        # fewer networks, a smoke run
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow  # noqa: E402
import impflow.nn as inn  # noqa: E402
from _timing import (
    add_run_arguments,
    apply_quick,
    interleaved_medians,
    machine_facts,
    positive_int,
    write_json,
)  # noqa: E402

DIMS = [6, 128, 128, 128, 128, 6]


def original_loop(layers, n_iterations):
    """The original code's update: per layer, per step, mv + normalize twice in PyTorch, each
    written into the vector in place (``F.normalize(..., out=v)``, as the original does)."""
    with torch.no_grad():
        for layer in layers:
            W, u, v = layer.weight, layer.u, layer.v
            for _ in range(n_iterations):
                torch.nn.functional.normalize(torch.mv(W.t(), u), dim=0, eps=1e-12, out=v)
                torch.nn.functional.normalize(torch.mv(W, v), dim=0, eps=1e-12, out=u)


def vector_differences(model, layers, n_iterations):
    """Largest differences of ``u``, ``v`` and ``σ = uᵀWv`` between the two paths, run from
    the same fresh random vectors (far from converged, so a wrong step count shows)."""
    gen = torch.Generator().manual_seed(1)
    start = [
        (torch.randn(m.u.shape, generator=gen), torch.randn(m.v.shape, generator=gen))
        for m in layers
    ]
    results = []
    for run in (
        lambda: inn.update_lipschitz(model, n_iterations),
        lambda: original_loop(layers, n_iterations),
    ):
        for m, (u, v) in zip(layers, start):
            m.u.copy_(u / u.norm())
            m.v.copy_(v / v.norm())
        run()
        results.append(
            [(m.u.clone(), m.v.clone(), float(m.u @ m.weight.detach() @ m.v)) for m in layers]
        )
    fused, loop = results
    return {
        "max_u_difference": max(float((a[0] - b[0]).abs().max()) for a, b in zip(fused, loop)),
        "max_v_difference": max(float((a[1] - b[1]).abs().max()) for a, b in zip(fused, loop)),
        "max_sigma_difference": max(abs(a[2] - b[2]) for a, b in zip(fused, loop)),
    }


# Both paths in float32 from the same vectors: rounding alone stays orders of magnitude below.
TOLERANCE = 1e-4


def bench(device, n_networks, n_iterations, min_seconds):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        inn.LipschitzMLP(DIMS, activation="sin", coeff=0.98) for _ in range(n_networks)
    ).to(device)
    layers = [m for m in model.modules() if isinstance(m, inn.SpectralLinear)]
    (fused, loop), _ = interleaved_medians(
        [
            lambda: inn.update_lipschitz(model, n_iterations),
            lambda: original_loop(layers, n_iterations),
        ],
        device,
        min_seconds,
    )
    differences = vector_differences(model, layers, n_iterations)
    flops = sum(4 * m.weight.numel() for m in layers) * n_iterations
    return {
        "device": device,
        "networks": n_networks,
        "layers": len(layers),
        "iterations": n_iterations,
        "fused_ms": fused * 1e3,
        "loop_ms": loop * 1e3,
        "speedup": loop / fused,
        "fused_GFLOPs": flops / fused / 1e9,
        **differences,
        "agree": max(differences.values()) <= TOLERANCE,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--networks", type=positive_int, default=40)
    parser.add_argument("--iterations", type=positive_int, default=20)
    add_run_arguments(parser, "power_iteration", "4 networks, short timing")
    args = parser.parse_args(argv)
    apply_quick(parser, args, networks=4, min_seconds=0.1)
    networks, min_seconds = args.networks, args.min_seconds
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows = [bench(d, networks, args.iterations, min_seconds) for d in devices]
    print(
        f"{'device':6} {'layers':>6} {'iters':>5} | {'fused ms':>9} {'loop ms':>9} {'x':>6} "
        f"{'GFLOP/s':>8} {'max |du|':>9} {'max |dv|':>9}"
    )
    for r in rows:
        print(
            f"{r['device']:6} {r['layers']:>6} {r['iterations']:>5} | {r['fused_ms']:>9.2f} "
            f"{r['loop_ms']:>9.2f} {r['speedup']:>6.1f} {r['fused_GFLOPs']:>8.2f} "
            f"{r['max_u_difference']:>9.1e} {r['max_v_difference']:>9.1e}"
        )
    settings = {"networks": networks, "iterations": args.iterations, "min_seconds": min_seconds}
    write_json(
        args.out,
        {
            "benchmark": "power_iteration",
            "machine": {d: machine_facts(d) for d in devices},
            "settings": {**settings, "quick": args.quick},
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    if not all(r["agree"] for r in rows):
        print(
            f"error: the fused and the loop's vectors differ by more than {TOLERANCE}",
            file=sys.stderr,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
