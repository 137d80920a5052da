"""Benchmark: the log-det series of a LipschitzMLP with the fused Hutchinson op
(``impflow.ops.mlp_vjp_series``) against autograd products, side by side in one run.

g = LipschitzMLP([d, 128, 128, d], "sin"), B = 1000 samples, 10 series terms, one Rademacher
probe, per-sample dimension d = 2, 16, 64. Modes (each timed for both product paths):

  series    the products vᵀJ^k, their traces and the weighted sum alone (no estimator around
            them, no graph): what the fused op replaces. Timed with it, side by side, the
            matrix-product floor: the weight GEMMs that any implementation must run, with no
            activation, trace or overhead: ``n_terms`` chained products ``u @ W`` through
            every layer (step by step), or the per-sample Jacobian's ``d`` columns pushed
            through the layers after the first (Jacobian first); the floor is the cheaper of
            the two, and ``autograd / floor`` bounds the speed-up any kernel can reach
  eval      roulette_logdet under no_grad (evaluation)
  graph     roulette_logdet with a graph through all products, then backward (training
            without memory savings)
  neumann   roulette_logdet(neumann_grad=True), then backward: products without graph, one
            product with graph (the Neumann-series gradient)
  bif       roulette_logdet(neumann_grad=True, backward_in_forward=True), then backward of the
            sum: the Neumann gradient taken inside the forward, the graph freed before it
            returns (a loss with unequal per-sample weights re-evaluates g and one product in
            backward instead: benchmarks/logdet_memory.py measures that case)

For every row: median wall time (calls of the two paths interleaved, so that load on a
shared machine hits both alike), peak memory of the call, and the memory the estimate
holds between forward and backward (its graph). Memory: torch.cuda.max_memory_allocated on
CUDA; on CPU the allocations recorded by the torch profiler (tracemalloc cannot see tensor
memory, which torch allocates outside Python's allocator). The series always uses 10 terms:
the roulette draws a Poisson(1e-9) number of extra terms, i.e. none (checked).

    python benchmarks/logdet.py                 # CPU, and CUDA when present
    python benchmarks/logdet.py --quick         # small sizes, a smoke run
    python benchmarks/logdet.py --threads 1     # one CPU thread (steadier on a shared machine)
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
    synchronize,
    write_json,
)  # noqa: E402

DIMS = [2, 16, 64]
QUICK_DIMS = [2, 16]
MODES = ["series", "eval", "graph", "neumann", "bif"]
N_TERMS = 10
IMPLS = ("fused", "autograd")


def make_case(d, batch, hidden, layers, device, seed=0):
    torch.manual_seed(seed)
    g = inn.LipschitzMLP([d] + [hidden] * layers + [d], activation="sin", coeff=0.9)
    g = g.to(device).eval()  # eval: no power iterations, the same weights for every call
    x = torch.randn(batch, d, device=device)
    return g, x


def estimator_kwargs(mode):
    return {
        "n_exact_terms": N_TERMS,
        "distribution": "poisson",
        "lam": 1e-9,
        "neumann_grad": mode in ("neumann", "bif"),
        "backward_in_forward": mode == "bif",
        "return_stats": True,
    }


def make_call(mode, impl, g, x, v):
    """``(forward, backward)``: forward returns what backward needs (or None); ``v`` is the
    probe of the series mode."""
    force = L.autograd_products if impl == "autograd" else None

    def within(fn):
        if force is None:
            return fn()
        with force():
            return fn()

    if mode == "series":
        coeffs = torch.tensor([(-1) ** (k + 1) / k for k in range(1, N_TERMS + 1)], device=x.device)

        def forward():
            def run():
                with torch.enable_grad(), L.forward_recording(g):
                    x_in = x.detach().requires_grad_(True)
                    gx = g(x_in)
                    return L.get_vjp_series(g)(
                        g, x_in, gx, v, N_TERMS, coeffs, create_graph=False
                    ).series

            return within(run)

        return forward, None

    def forward():
        def run():
            if mode == "eval":
                with torch.no_grad():
                    out, stats = L.roulette_logdet(g, x, **estimator_kwargs(mode))
            else:
                out, stats = L.roulette_logdet(g, x, create_graph=True, **estimator_kwargs(mode))
            assert stats.n_terms == N_TERMS, stats.n_terms
            return out

        return within(run)

    def backward(out):
        out.sum().backward()
        g.zero_grad(set_to_none=True)

    return forward, (None if mode == "eval" else backward)


def gemm_floor_calls(g, x, v):
    """The two GEMM-only lower bounds of the series (see the module docstring): chained
    ``u @ W`` for every term and layer, and the Jacobian's ``d`` columns per sample through
    every layer but the first (whose product with the identity is free)."""
    weights = [m.weight.detach() for m in g.modules() if isinstance(m, inn.SpectralLinear)]
    d = x.shape[1]
    columns = torch.randn(x.shape[0] * d, weights[0].shape[0], device=x.device, dtype=x.dtype)

    def steps():
        u = v
        for _ in range(N_TERMS):
            for w in reversed(weights):
                u = u @ w
        return u

    def jacobian():
        t = columns
        for w in weights[1:]:
            t = t @ w.T
        return t

    return steps, jacobian


def run_once(forward, backward):
    out = forward()
    if backward is not None:
        backward(out)


def cpu_allocations(fn):
    """Signed sizes (bytes) of the CPU allocations and frees during ``fn()``, in order, from
    the torch profiler; ``None`` where this torch does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        allocation = torch._C._profiler._EventType.Allocation
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
    except (AttributeError, RuntimeError):
        return None
    return [size for _, size in sorted(events)]


def memory(forward, backward, device):
    """``(peak, held)`` in bytes: the most memory allocated at once during forward + backward
    (over what was allocated before), and what the forward's result holds until backward."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = forward()
        held = torch.cuda.memory_allocated(device) - base
        if backward is not None:
            backward(out)
        del out
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, held
    box = {}

    def forward_only():
        box["out"] = forward()

    sizes = cpu_allocations(forward_only)
    rest = cpu_allocations(lambda: backward(box.pop("out")) if backward else box.pop("out"))
    if sizes is None or rest is None:
        return float("nan"), float("nan")
    held, peak, level = sum(sizes), 0, 0
    for size in sizes + rest:
        level += size
        peak = max(peak, level)
    return peak, held


def bench(device, d, mode, batch, hidden, layers, min_seconds):
    g, x = make_case(d, batch, hidden, layers, device)
    v = torch.randint(0, 2, x.shape, device=device).to(x.dtype) * 2 - 1  # Rademacher
    calls = {impl: make_call(mode, impl, g, x, v) for impl in IMPLS}
    # Both paths compute the same estimate (same probes: same generator state in series mode).
    outs = {}
    for impl, (forward, _) in calls.items():
        torch.manual_seed(1)
        out = forward()
        outs[impl] = out.detach().double()
    difference = float((outs["fused"] - outs["autograd"]).abs().max())
    scale = float(outs["autograd"].abs().max())
    grads = {}
    for impl, (forward, backward) in calls.items():
        if backward is None:  # the series and eval modes take no gradient
            break
        torch.manual_seed(1)
        g.zero_grad(set_to_none=True)
        forward().sum().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in g.parameters() if p.grad is not None])
        g.zero_grad(set_to_none=True)
    timed = [lambda f=f, b=b: run_once(f, b) for f, b in calls.values()]
    if mode == "series":
        timed += gemm_floor_calls(g, x, v)
    seconds, repeats = interleaved_medians(timed, device, min_seconds)
    row = {
        "device": device,
        "d": d,
        "mode": mode,
        "B": batch,
        "hidden": [hidden] * layers,
        "n_terms": N_TERMS,
        "repeats": repeats,
        "max_rel_difference": difference / max(scale, 1e-30),
    }
    if grads:  # what the custom backward paths produce (graph, Neumann, backward-in-forward)
        grad_difference = float((grads["fused"] - grads["autograd"]).abs().max())
        grad_scale = float(grads["autograd"].abs().max())
        row["max_rel_grad_difference"] = grad_difference / max(grad_scale, 1e-30)
    for impl, s in zip(IMPLS, seconds):
        peak, held = memory(*calls[impl], device)
        row[f"{impl}_ms"] = s * 1e3
        row[f"{impl}_peak_MB"] = peak / 2**20
        row[f"{impl}_held_MB"] = held / 2**20
    row["speedup"] = row["autograd_ms"] / row["fused_ms"]
    if mode == "series":
        row["floor_steps_ms"], row["floor_jacobian_ms"] = (s * 1e3 for s in seconds[2:])
        row["floor_ms"] = min(row["floor_steps_ms"], row["floor_jacobian_ms"])
        row["max_speedup"] = row["autograd_ms"] / row["floor_ms"]
    row["peak_ratio"] = row["autograd_peak_MB"] / max(row["fused_peak_MB"], 1e-9)
    return row


def print_table(rows):
    header = (
        f"{'device':6} {'d':>3} {'mode':8} | {'fused ms':>9} {'autograd ms':>11} {'x':>5} | "
        f"{'peak MB fused':>13} {'autograd':>9} {'x':>5} | {'held MB fused':>13} "
        f"{'autograd':>9} | {'rel diff':>8} | {'floor ms':>8} {'max x':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['device']:6} {r['d']:>3} {r['mode']:8} | {r['fused_ms']:>9.2f} "
            f"{r['autograd_ms']:>11.2f} {r['speedup']:>5.2f} | {r['fused_peak_MB']:>13.2f} "
            f"{r['autograd_peak_MB']:>9.2f} {r['peak_ratio']:>5.2f} | "
            f"{r['fused_held_MB']:>13.2f} {r['autograd_held_MB']:>9.2f} | "
            f"{r['max_rel_difference']:>8.1e} | "
            + (f"{r['floor_ms']:>8.2f} {r['max_speedup']:>5.2f}" if "floor_ms" in r else "")
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batch", type=positive_int, default=1000)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--layers", type=positive_int, default=2, help="hidden layers")
    parser.add_argument("--dims", type=positive_int, nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (torch default)"
    )
    add_run_arguments(parser, "logdet", "small sizes, a smoke run")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_quick(parser, args, batch=100, dims=QUICK_DIMS, min_seconds=0.05)
    batch, dims, min_seconds = args.batch, args.dims or DIMS, args.min_seconds
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows = [
        bench(device, d, mode, batch, args.hidden, args.layers, min_seconds)
        for device in devices
        for d in dims
        for mode in args.modes
    ]
    print_table(rows)
    print(
        f"B = {batch}, hidden {[args.hidden] * args.layers}, {N_TERMS} terms, float32; "
        f"CPU threads: {torch.get_num_threads()}; x = autograd / fused (time and peak memory)"
    )
    print(
        "floor (series rows): the weight GEMMs alone, step by step or Jacobian first, whichever "
        "is cheaper; max x = autograd / floor, the most any series kernel could gain"
    )
    write_json(
        args.out,
        {
            "benchmark": "logdet",
            "machine": {d: machine_facts(d) for d in devices},
            "config": {"batch": batch, "hidden": args.hidden, "layers": args.layers},
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    # float32 rounding leaves these near 1e-7; a wrong path leaves far more.
    exit_if_disagreeing(rows, "max_rel_difference", 1e-4, "the fused and autograd estimates")
    with_grads = [r for r in rows if "max_rel_grad_difference" in r]
    exit_if_disagreeing(
        with_grads, "max_rel_grad_difference", 1e-4, "the fused and autograd gradients"
    )


if __name__ == "__main__":
    main()
