"""Benchmark: memory held between forward and backward, and time, of the Neumann log-det
gradient with and without backward-in-forward, side by side on the same network and draw.

Held bytes: the storages the autograd graph keeps alive once the forward returns (saved
tensors, plus what backward-in-forward stores on purpose: per-sample x gradient, parameter
gradients, probes, Neumann vectors, buffer copies), not counting x and the parameters. On CUDA
also the allocator's view (allocated after the forward minus before) and the peak.

Losses: ``sum`` (backward-in-forward scales its stored gradients) and ``weighted``
(``Σ_b c_b logdet_b`` with unequal ``c_b``: it re-evaluates g and one product in backward).

    python benchmarks/logdet_memory.py            # CPU, and CUDA when present
    python benchmarks/logdet_memory.py --quick
"""

import argparse
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow.logdet as L  # noqa: E402
import impflow.nn as inn  # noqa: E402
from _timing import (
    add_run_arguments,
    apply_quick,
    exit_if_disagreeing,
    interleaved_medians,
    machine_facts,
    positive_int,
    synchronize,
    write_json,
)  # noqa: E402


def _storage_bytes(tensors, exclude):
    seen, total = set(exclude), 0
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _forward(g, x, bif, seed=0):
    return L.roulette_logdet(
        g,
        x,
        n_exact_terms=4,
        neumann_grad=True,
        backward_in_forward=bif,
        generator=torch.Generator(device=x.device).manual_seed(seed),
    )


def held_bytes(g, x, bif):
    """Bytes of storages kept alive by the graph after the forward (x and θ excluded)."""
    refs = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: refs.append(weakref.ref(t)) or t, lambda t: t
    ):
        out = _forward(g, x, bif)
    alive = [r() for r in refs if r() is not None]
    saved = getattr(out.grad_fn, "saved", None)  # backward-in-forward's own store
    if saved is not None:
        alive += [t for t in (saved.grad_x, *saved.grad_params) if t is not None]
        alive += [t for pair in saved.pairs for t in pair]
        alive += [b for _, _, b in saved.snapshot._buffers]
    exclude = {t.untyped_storage().data_ptr() for t in (x, *g.parameters())}
    return _storage_bytes(alive, exclude)


def cuda_bytes(g, x, bif, weights):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = _forward(g, x, bif)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    (weights * out).sum().backward()
    torch.cuda.synchronize()
    return held, torch.cuda.max_memory_allocated() - before


def bench(device, batch, width, depth, min_seconds):
    torch.manual_seed(0)
    d = 16
    g = inn.LipschitzMLP([d] + [width] * depth + [d], activation="lipswish", coeff=0.9)
    g = g.to(device).eval()  # eval: fixed spectral norms, so both modes see the same g
    x = torch.randn(batch, d, device=device, requires_grad=True)
    rows = []
    for loss in ("sum", "weighted"):
        if loss == "sum":
            weights = torch.ones(batch, device=device)
        else:
            weights = torch.rand(batch, device=device) + 0.5
        row = {"device": device, "batch": batch, "width": width, "depth": depth, "loss": loss}
        grads, steps = {}, {}
        for bif in (False, True):
            name = "bif" if bif else "plain"

            def step(bif=bif):
                g.zero_grad(set_to_none=True)
                x.grad = None
                (weights * _forward(g, x, bif)).sum().backward()

            steps[name] = step
            step()
            grads[name] = torch.cat(
                [x.grad.flatten()]
                + [p.grad.flatten() for p in g.parameters() if p.grad is not None]
            )
            row[f"{name}_held_MB"] = held_bytes(g, x, bif) / 2**20
            if device == "cuda":
                held, peak = cuda_bytes(g, x, bif, weights)
                row[f"{name}_cuda_held_MB"], row[f"{name}_cuda_peak_MB"] = (
                    held / 2**20,
                    peak / 2**20,
                )
            synchronize(device)
        # In turns, so that drifting load hits both sides of the ratio alike.
        seconds, _ = interleaved_medians(list(steps.values()), device, min_seconds)
        for name, sec in zip(steps, seconds):
            row[f"{name}_ms"] = sec * 1e3
        row["held_ratio"] = row["plain_held_MB"] / max(row["bif_held_MB"], 1e-12)
        row["time_ratio"] = row["bif_ms"] / row["plain_ms"]
        row["max_grad_difference"] = float((grads["plain"] - grads["bif"]).abs().max())
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batch", type=positive_int, default=512)
    parser.add_argument("--width", type=positive_int, default=256)
    parser.add_argument("--depth", type=positive_int, default=3)
    add_run_arguments(parser, "logdet_memory", "small network, short timing")
    args = parser.parse_args(argv)
    apply_quick(parser, args, batch=64, width=64, min_seconds=0.1)
    has_gpu = torch.cuda.is_available()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows = [
        r
        for dev in devices
        for r in bench(dev, args.batch, args.width, args.depth, args.min_seconds)
    ]
    print(
        f"{'device':6} {'loss':8} | {'plain MB':>9} {'bif MB':>8} {'x less':>7} | "
        f"{'plain ms':>9} {'bif ms':>8} {'bif/plain':>9} | {'max |dgrad|':>11}"
    )
    for r in rows:
        print(
            f"{r['device']:6} {r['loss']:8} | {r['plain_held_MB']:>9.2f} {r['bif_held_MB']:>8.2f} "
            f"{r['held_ratio']:>7.1f} | {r['plain_ms']:>9.2f} {r['bif_ms']:>8.2f} "
            f"{r['time_ratio']:>9.2f} | {r['max_grad_difference']:>11.1e}"
        )
        if "plain_cuda_held_MB" in r:
            print(
                f"{'':6} {'':8} | cuda held {r['plain_cuda_held_MB']:.2f} -> "
                f"{r['bif_cuda_held_MB']:.2f} MB, peak {r['plain_cuda_peak_MB']:.2f} -> "
                f"{r['bif_cuda_peak_MB']:.2f} MB"
            )
    write_json(
        args.out,
        {
            "benchmark": "logdet_memory",
            "machine": {d: machine_facts(d) for d in devices},
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    # float32 rounding leaves these near 1e-7; a wrong path leaves far more.
    exit_if_disagreeing(
        rows, "max_grad_difference", 1e-4, "the plain and backward-in-forward gradients"
    )


if __name__ == "__main__":
    main()
