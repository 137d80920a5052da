"""Benchmark: `update_lipschitz` (one fused power-iteration call for every dense spectral
layer) against the per-layer PyTorch loop of the original ResFlow/ImpFlow code, side by side.

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
from _timing import machine_facts, median_seconds, write_json  # noqa: E402

DIMS = [6, 128, 128, 128, 128, 6]


def original_loop(layers, n_iterations):
    """The original code's update: per layer, per step, mv + normalize twice in PyTorch."""
    with torch.no_grad():
        for layer in layers:
            W, u, v = layer.weight, layer.u, layer.v
            for _ in range(n_iterations):
                v.copy_(torch.nn.functional.normalize(torch.mv(W.t(), u), dim=0, eps=1e-12))
                u.copy_(torch.nn.functional.normalize(torch.mv(W, v), dim=0, eps=1e-12))


def bench(device, n_networks, n_iterations, min_seconds):
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        inn.LipschitzMLP(DIMS, activation="sin", coeff=0.98) for _ in range(n_networks)
    ).to(device)
    layers = [m for m in model.modules() if isinstance(m, inn.SpectralLinear)]
    fused, _ = median_seconds(
        lambda: inn.update_lipschitz(model, n_iterations), device, min_seconds=min_seconds
    )
    loop, _ = median_seconds(
        lambda: original_loop(layers, n_iterations), device, min_seconds=min_seconds
    )
    # Both paths compute the same thing: compare the vectors after the same number of steps.
    state = [(m.u.clone(), m.v.clone()) for m in layers]
    inn.update_lipschitz(model, n_iterations)
    fused_u = torch.cat([m.u for m in layers])
    for m, (u, v) in zip(layers, state):
        m.u.copy_(u), m.v.copy_(v)
    original_loop(layers, n_iterations)
    loop_u = torch.cat([m.u for m in layers])
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
        "max_vector_difference": float((fused_u - loop_u).abs().max()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--networks", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 networks, short timing")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--out", default="results/power_iteration.json")
    args = parser.parse_args(argv)
    networks = 4 if args.quick else args.networks
    min_seconds = 0.1 if args.quick else args.min_seconds
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows = [bench(d, networks, args.iterations, min_seconds) for d in devices]
    print(
        f"{'device':6} {'layers':>6} {'iters':>5} | {'fused ms':>9} {'loop ms':>9} {'x':>6} "
        f"{'GFLOP/s':>8} {'max |du|':>9}"
    )
    for r in rows:
        print(
            f"{r['device']:6} {r['layers']:>6} {r['iterations']:>5} | {r['fused_ms']:>9.2f} "
            f"{r['loop_ms']:>9.2f} {r['speedup']:>6.1f} {r['fused_GFLOPs']:>8.2f} "
            f"{r['max_vector_difference']:>9.1e}"
        )
    write_json(
        args.out,
        {
            "benchmark": "power_iteration",
            "machine": {d: machine_facts(d) for d in devices},
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
