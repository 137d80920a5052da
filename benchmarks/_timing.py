"""Timing helpers shared by the benchmarks: synchronised medians and machine facts."""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, *, min_repeats=5, min_seconds=0.5, warmup=2, max_repeats=1000):
    """Median wall time of ``fn()`` over at least ``min_repeats`` calls and ``min_seconds``,
    after ``warmup`` untimed calls; the device is synchronised around every call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
        len(times) < min_repeats or time.perf_counter() - start < min_seconds
    ):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def interleaved_medians(calls, device, min_seconds, *, min_repeats=5, warmup=2, block_seconds=0.0):
    """Median seconds of each call of ``calls`` and the repeats of the first: the calls take
    turns in rounds until every call has ``min_repeats`` and ``min_seconds`` have passed, so
    that drifting load on a shared machine affects all of them alike (side-by-side ratios).

    ``block_seconds = 0``: one call of each per round, so each call starts from the caches
    the other left. ``block_seconds > 0``: per round, each call runs once untimed, then is
    timed repeatedly for about ``block_seconds``: every call is measured warm, as a loop of
    the same work runs, and the drift still hits all of them alike.
    """
    for _ in range(warmup):
        for call in calls:
            call()
    synchronize(device)
    times = [[] for _ in calls]
    start = time.perf_counter()
    while min(map(len, times)) < min_repeats or time.perf_counter() - start < min_seconds:
        for call, record in zip(calls, times):
            if block_seconds > 0:
                call()
                synchronize(device)
            block_end = time.perf_counter() + block_seconds
            while True:
                t0 = time.perf_counter()
                call()
                synchronize(device)
                t1 = time.perf_counter()
                record.append(t1 - t0)
                if t1 >= block_end:
                    break
    return [statistics.median(t) for t in times], len(times[0])


def copy_bandwidth(device, dtype=torch.float32, megabytes=256):
    """Achieved copy bandwidth in GB/s (bytes read + bytes written) of one large buffer."""
    n = megabytes * 2**20 // torch.finfo(dtype).bits * 8
    src = torch.randn(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    seconds, _ = median_seconds(lambda: dst.copy_(src), device, min_repeats=10, min_seconds=0.5)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def machine_facts(device):
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as info:
            names = [
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            ]
        if names:
            facts["cpu"] = names[0]
    except OSError:
        pass
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def write_json(path, payload):
    """Writes ``payload`` to ``path`` atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def exit_if_disagreeing(rows, key, limit, what):
    """Exits with code 1 (after the table and the JSON are out) when a row's ``key``, a
    difference between the two sides of its ratios, exceeds ``limit``: timings of two paths
    that compute different things are not a speed-up."""
    bad = [r for r in rows if not r[key] <= limit]  # NaN fails too
    for r in bad:
        print(f"error: {what} differ by {r[key]:.2e} > {limit:g} in {r}", file=sys.stderr)
    if bad:
        sys.exit(1)


def positive_int(text):
    """argparse type: an integer >= 1 (a batch, a width, a count of threads or steps)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_seconds(text):
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def apply_quick(parser, args, **smaller):
    """``--quick``: the options left at their defaults take the ``smaller`` values (a smoke
    run); an option given on the command line keeps its value."""
    if args.quick:
        for name, value in smaller.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)


def add_run_arguments(parser, name, quick_help, *, min_seconds=1.0):
    """The options every benchmark shares: ``--quick`` (see :func:`apply_quick`),
    ``--min-seconds`` (the timing budget per measurement) and ``--out`` (the JSON path)."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{quick_help} (options given on the command line are kept)",
    )
    parser.add_argument("--min-seconds", type=positive_seconds, default=min_seconds)
    parser.add_argument("--out", default=f"results/{name}.json")
