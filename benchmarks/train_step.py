"""Benchmark: one training step and sampling of impflow's ImplicitBlock and ResidualBlock against
the original ImpFlow algorithm (benchmarks/_original_impflow.py), side by side in one run.

The checkerboard configuration of the paper's toy experiment: B = 5000 points from
``impflow.data.toy.sample_toy("checkerboard")``, ``g_x``, ``g_z`` (and the residual block's
``g``) ``LipschitzMLP([2, 128, 128, 2], "sin", coeff=0.99, n_power_iterations=5)``, exact
log-determinant. Both sides share the networks (the same weights and power-iteration vectors).

  step      training step: forward (root solve), exact log-det, loss = -log_prob.mean() with a
            standard normal base, backward (adjoint solve); impflow defaults (Broyden with a
            per-sample stop at ‖F‖₂ ≤ 1e-6, exact adjoint for d ≤ 10) against the original
            (whole-batch Broyden to 1e-6·√(B·d) in at most 30 iterations, adjoint Broyden on
            autograd products with eps 1e-10, autograd Jacobian + slogdet)
  logdet    the exact log-det part of the step alone (both log-det terms, forward and
            backward, at the step's x and root), for the breakdown: step - logdet is the
            solve, the re-attachment and the adjoint
  floor     what any implementation of the step must run, without the log-det: the forward
            solve's evaluations of g_z (as many as impflow's solve made, no graph) and one
            forward and backward of every network; ``original / floor`` bounds the speed-up
            of any step at impflow's solver accuracy
  sample    inverse of B standard normal points in evaluation mode under no_grad, the root
            only on both sides (equal work, what sampling needs): impflow's
            ``inverse(z, logdet=False)`` (what ``Flow.sample`` runs: Broyden with a per-sample
            stop at ‖F‖₂ ≤ 1e-6, no log-det) against the original's sampling (ImplicitBlock:
            whole-batch Broyden to 1e-5·√(B·d) in at most 30 iterations; ResidualBlock:
            fixed-point iteration with its loose entrywise test). The sampling table also gives
            both sides with the log-det (impflow's ``inverse(z)``, exact Jacobian; the original's
            autograd Jacobian) and impflow with its inverse tolerance loosened to the original's
            worst per-sample residual ‖F‖₂ (equal accuracy: what the tighter stop costs)

Accuracy, from one more call of each from the same state: the residual max|F| per sample of
the returned root (the forward's z; the sample's x as the timed call returns it, so without
the log-det), evaluated in float64 with the weights of the call; for impflow's samples also
their largest difference from the x of ``inverse(z)`` with the log-det (at most 1e-6); the
relative error ‖∇ - ∇_ref‖ / ‖∇_ref‖ over all parameters, against impflow in float64 with
tight tolerances (forward to the float64 floor, exact adjoint). Every figure is
given for two states of the networks: ``fresh`` (as initialised) and ``trained`` (after
``--train-steps`` Adam steps of impflow's blocks on the checkerboard, so that the Jacobians and
the solves are those of training rather than of initialisation).

    python benchmarks/train_step.py                  # CPU, and CUDA when present
    python benchmarks/train_step.py --threads 1      # one CPU thread (steadier, shared machine)
    python benchmarks/train_step.py --quick          # small sizes, a smoke run
"""

import argparse
import copy
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import impflow  # noqa: E402
import impflow.nn as inn  # noqa: E402
from _original_impflow import (  # noqa: E402
    OriginalImplicitBlock,
    OriginalResidualBlock,
    stored_vectors,
)
from _timing import (
    add_run_arguments,
    apply_quick,
    interleaved_medians,
    machine_facts,
    positive_int,
    write_json,
)  # noqa: E402
from impflow.data.toy import sample_toy  # noqa: E402
from impflow.logdet import exact_logdet  # noqa: E402
from impflow.nn._frozen import power_iteration_paused  # noqa: E402

COEFF = 0.99
POWER_ITERATIONS = 5
# float64 reference: the forward to the float64 floor (a smaller tol is raised to it).
REFERENCE_SOLVER = {"tol": 1e-14, "max_iter": 500}


# --------------------------------------------------------------------------------------------
# Setup


def make_networks(hidden, device, seed):
    torch.manual_seed(seed)

    def mlp():
        return inn.LipschitzMLP(
            [2, hidden, hidden, 2],
            activation="sin",
            coeff=COEFF,
            n_power_iterations=POWER_ITERATIONS,
        ).to(device)

    return {"g_x": mlp(), "g_z": mlp(), "g": mlp()}


def impflow_blocks(nets, **options):
    return {
        "implicit": inn.ImplicitBlock(nets["g_x"], nets["g_z"], **options),
        "residual": inn.ResidualBlock(
            nets["g"], **{k: v for k, v in options.items() if k != "forward_solver"}
        ),
    }


def original_blocks(nets):
    return {
        "implicit": OriginalImplicitBlock(nets["g_x"], nets["g_z"]),
        "residual": OriginalResidualBlock(nets["g"]),
    }


def block_networks(nets, kind):
    return [nets["g_x"], nets["g_z"]] if kind == "implicit" else [nets["g"]]


def nll(z, logdet):
    """-log_prob(x).mean() with a standard normal base."""
    log_base = -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)
    return -(log_base + logdet).mean()


def train_step(block, nets, x):
    for g in nets:
        g.zero_grad(set_to_none=True)
    z, logdet = block(x)
    loss = nll(z, logdet)
    loss.backward()
    return z, loss


def pretrain(nets, steps, batch, lr, device, seed):
    """``steps`` Adam steps of impflow's blocks on checkerboard batches (the ``trained`` state);
    returns the last losses."""
    blocks = impflow_blocks(nets)
    params = [p for g in nets.values() for p in g.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            x = sample_toy("checkerboard", batch, generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for kind, block in blocks.items():
                loss = nll(*block(x))
                loss.backward()
                losses[kind] = float(loss)
                total += float(loss)
            opt.step()
    return losses


# --------------------------------------------------------------------------------------------
# Timing


def floor_part(kind, nets, x, n_solve_evaluations):
    """The floor of a step (module docstring): ``n_solve_evaluations`` of ``g_z`` without a
    graph, then one forward and backward of every network of the block at ``x``."""

    def call():
        with stored_vectors(*nets, refresh=True):
            if kind == "implicit":
                with torch.no_grad():
                    for _ in range(n_solve_evaluations):
                        nets[1](x)
            leaf = x.detach().requires_grad_(True)
            sum(g(leaf).sum() for g in nets).backward()
        for g in nets:
            g.zero_grad(set_to_none=True)

    return call


def logdet_part(kind, side, block, nets, x, root):
    """The exact log-det terms of one step alone (forward and backward), at ``x`` and the
    step's ``root`` (a leaf): what each side's step spends on the log-determinant."""
    root = root.detach().requires_grad_(True)

    def impflow_call():
        with stored_vectors(*nets, refresh=True):
            value = impflow_value()
        value.mean().backward()

    def impflow_value():
        if kind == "implicit":
            return exact_logdet(nets[0], x) - exact_logdet(nets[1], root)
        return exact_logdet(nets[0], x)

    def original_call():
        with stored_vectors(*nets, refresh=True):
            if kind == "implicit":
                value = block.logdet(x, root)
            else:
                value = block.logdet_of(x)[1]
        value.mean().backward()

    return impflow_call if side == "impflow" else original_call


# --------------------------------------------------------------------------------------------
# Accuracy


def flat_grads(nets):
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
            for g in nets
            for p in g.parameters()
        ]
    )


def float64_copies(nets):
    """float64 copies of ``nets`` in training mode; :func:`residual_of` evaluates them at their
    stored power-iteration vectors as they are (the weights of the call they were copied
    after), with no step and no refresh."""
    copies = [copy.deepcopy(g).double() for g in nets]
    for g in copies:
        g.train(True)
    return copies


def residual_of(kind, nets64, u, y, forward):
    """``F`` ``(B, d)``, in float64, of the root ``y`` of input ``u`` (``forward``: ``u`` = x,
    ``y`` = z; else ``u`` = z, ``y`` = x); ``nets64`` hold the weights of the call."""
    u, y = u.detach().double(), y.detach().double()
    with torch.no_grad(), power_iteration_paused(*nets64):
        if kind == "residual":
            (g,) = nets64
            x, z = (u, y) if forward else (y, u)
            return x + g(x) - z
        g_x, g_z = nets64
        x, z = (u, y) if forward else (y, u)
        return g_x(x) + x - g_z(z) - z


def residual_max(kind, nets64, u, y, forward):
    """max|F| per sample (see :func:`residual_of`)."""
    return residual_of(kind, nets64, u, y, forward).abs().amax(1)


def reference_step(kind, nets, snapshot, x):
    """Loss and gradient of impflow's block in float64 with tight tolerances, from the same
    state (weights and power-iteration vectors) as the timed steps."""
    nets64 = float64_copies(nets)
    for g, state in zip(nets64, snapshot):
        g.load_state_dict(state)
    options = {
        "forward_solver": REFERENCE_SOLVER,
        "inverse_solver": REFERENCE_SOLVER,
        "adjoint_solver": {"method": "exact"},
        "on_failure": "raise",
    }
    named = dict(zip(["g_x", "g_z"] if kind == "implicit" else ["g"], nets64))
    if kind == "implicit":
        block = inn.ImplicitBlock(named["g_x"], named["g_z"], **options)
    else:
        options.pop("forward_solver")
        block = inn.ResidualBlock(named["g"], **options)
    _, loss = train_step(block, nets64, x.double())
    return loss.item(), flat_grads(nets64)


def solver_summary(side, kind, block, task):
    """Iteration counts of the last call, as ``{name: value}``."""
    out = {}
    if side == "impflow":
        stats = block.last_stats
        for name in ("forward", "adjoint") if task == "step" else ("inverse",):
            s = getattr(stats, name)
            if s is None:
                continue
            out[f"{name}_steps_mean"] = float(s.nstep.float().mean())
            out[f"{name}_steps_max"] = int(s.nstep.max())
            out[f"{name}_converged"] = f"{int(s.converged.sum())}/{s.converged.numel()}"
            out[f"{name}_method"] = s.method
    elif kind == "implicit":
        for name in ("forward", "adjoint") if task == "step" else ("inverse",):
            info = block.last_info.get(name)
            if info is not None:
                out[f"{name}_steps"] = info["nstep"]
                out[f"{name}_batch_norm"] = info["diff"]
                out[f"{name}_batch_eps"] = info["eps"]
                out[f"{name}_nan_stop"] = info["nan_stop"]
    return out


def accuracy_step(kind, sides, nets, snapshot, x, reference):
    """Residual, loss and gradient error of one step of each side, each from ``snapshot``."""
    _, grad_ref = reference
    out = {}
    for side, block in sides.items():
        for g, state in zip(nets, snapshot):
            g.load_state_dict(state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            z, _ = train_step(block, nets, x)
        grad = flat_grads(nets)
        row = {
            "grad_rel_error": float((grad - grad_ref).norm() / grad_ref.norm()),
            "warnings": len(caught),
        }
        if kind == "implicit":  # the weights of the call: the state after its power iteration
            res = residual_max(kind, float64_copies(nets), x, z, forward=True)
            row["residual_max"] = float(res.max())
            row["residual_median"] = float(res.median())
        row.update(solver_summary(side, kind, block, "step"))
        out[side] = row
    for g, state in zip(nets, snapshot):
        g.load_state_dict(state)
    return out


def sample_root(side, block, z):
    """The timed sampling call: the root only (impflow without its log-det)."""
    return block.inverse(z, logdet=False)[0] if side == "impflow" else block.inverse(z)


def accuracy_sample(kind, sides, nets, z):
    """Residual of the samples each side's timed call returns; for impflow also their largest
    difference from the x of its inverse with the log-det."""
    out = {}
    nets64 = float64_copies(nets)
    for side, block in sides.items():
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            x = sample_root(side, block, z)
        F = residual_of(kind, nets64, z, x, forward=False)
        res = F.abs().amax(1)
        row = {
            "residual_max": float(res.max()),
            "residual_median": float(res.median()),
            "residual_norm_max": float(F.norm(dim=1).max()),
            "warnings": len(caught),
        }
        row.update(solver_summary(side, kind, block, "sample"))
        if side == "impflow":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                x_full = block.inverse(z)[0]
            row["x_diff_vs_logdet_path"] = float((x - x_full).abs().max())
        out[side] = row
    return out


def matched_accuracy_block(kind, nets, original_residual_norm):
    """impflow's block with its inverse tolerance set to the original's worst per-sample
    ``‖F‖₂`` (float32 cannot go below its floor, so it is at least 1e-6)."""
    tol = max(float(original_residual_norm), 1e-6)
    return impflow_blocks(nets, inverse_solver={"tol": tol})[kind], tol


# --------------------------------------------------------------------------------------------
# One configuration


def bench_state(device, state, nets, batch, min_seconds, seed):
    x = sample_toy("checkerboard", batch, generator=seed + 1).to(device)
    z_base = torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    ours, theirs = impflow_blocks(nets), original_blocks(nets)
    rows = []
    for kind in ("implicit", "residual"):
        group = block_networks(nets, kind)
        sides = {"impflow": ours[kind], "original": theirs[kind]}
        for g in group:
            g.train()
        snapshot = [copy.deepcopy(g.state_dict()) for g in group]
        reference = reference_step(kind, group, snapshot, x)
        accuracy = accuracy_step(kind, sides, group, snapshot, x, reference)
        # The roots for the log-det breakdown: impflow's (both sides' agree to the tolerance).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root, _ = train_step(ours[kind], group, x)
        forward_stats = ours[kind].last_stats.forward
        n_solve = 0 if forward_stats is None else forward_stats.n_fn_evals
        calls = (
            [lambda b=b: train_step(b, group, x) for b in sides.values()]
            + [logdet_part(kind, side, sides[side], group, x, root) for side in sides]
            + [floor_part(kind, group, x, n_solve)]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds, repeats = interleaved_medians(calls, device, min_seconds, min_repeats=7)
        step_ms = dict(zip(sides, [s * 1e3 for s in seconds[:2]]))
        logdet_ms = dict(zip(sides, [s * 1e3 for s in seconds[2:4]]))
        floor_ms = seconds[4] * 1e3
        rows.append(
            {
                "device": device,
                "state": state,
                "block": kind,
                "task": "step",
                "B": batch,
                "repeats": repeats,
                "impflow_ms": step_ms["impflow"],
                "original_ms": step_ms["original"],
                "speedup": step_ms["original"] / step_ms["impflow"],
                "impflow_logdet_ms": logdet_ms["impflow"],
                "original_logdet_ms": logdet_ms["original"],
                "impflow_rest_ms": step_ms["impflow"] - logdet_ms["impflow"],
                "original_rest_ms": step_ms["original"] - logdet_ms["original"],
                "floor_ms": floor_ms,
                "floor_solve_evaluations": n_solve,
                "max_speedup": step_ms["original"] / floor_ms,
                "reference_loss": reference[0],
                "accuracy": accuracy,
            }
        )
        # Sampling, in evaluation mode (no power iteration: the stored vectors).
        for g in group:
            g.eval()
        accuracy = accuracy_sample(kind, sides, group, z_base)
        matched, matched_tol = matched_accuracy_block(
            kind, nets, accuracy["original"]["residual_norm_max"]
        )
        accuracy["impflow_matched"] = accuracy_sample(kind, {"impflow": matched}, group, z_base)[
            "impflow"
        ]
        calls = [
            lambda: sample_root("impflow", sides["impflow"], z_base),
            lambda: sample_root("original", sides["original"], z_base),
            lambda: sides["impflow"].inverse(z_base),
            lambda: sides["original"].inverse(z_base, with_logdet=True),
            lambda: sample_root("impflow", matched, z_base),
        ]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            seconds, repeats = interleaved_medians(calls, device, min_seconds, min_repeats=7)
        for g in group:
            g.train()
        ms = [s * 1e3 for s in seconds]
        rows.append(
            {
                "device": device,
                "state": state,
                "block": kind,
                "task": "sample",
                "B": batch,
                "repeats": repeats,
                # Root only on both sides (impflow: inverse(z, logdet=False)).
                "impflow_ms": ms[0],
                "original_ms": ms[1],
                "speedup": ms[1] / ms[0],
                # Root and exact log-det on both sides.
                "impflow_with_logdet_ms": ms[2],
                "original_with_logdet_ms": ms[3],
                "speedup_with_logdet": ms[3] / ms[2],
                # impflow's root only, its tolerance at the original's worst residual ‖F‖₂.
                "impflow_matched_tol": matched_tol,
                "impflow_matched_ms": ms[4],
                "speedup_matched": ms[1] / ms[4],
                "accuracy": accuracy,
            }
        )
        print(f"  done {device} {state} {kind}", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value, spec):
    return format(value, spec) if value is not None else "-"


def steps_text(acc, task):
    """Iterations of the main solve: impflow mean/max per sample, the original's batch count
    ('+nan': its loop ended on a NaN norm)."""
    name = "forward" if task == "step" else "inverse"
    ours, theirs = acc["impflow"], acc["original"]
    left = (
        f"{ours[f'{name}_steps_mean']:.1f}/{ours[f'{name}_steps_max']}"
        if f"{name}_steps_mean" in ours
        else "-"
    )
    right = str(theirs[f"{name}_steps"]) if f"{name}_steps" in theirs else "-"
    if task == "step" and "adjoint_steps" in theirs:
        right += f", adj {theirs['adjoint_steps']}" + ("+nan" if theirs["adjoint_nan_stop"] else "")
    return left, right


def print_table(rows):
    header = (
        f"{'device':6} {'state':7} {'block':8} {'task':6} | {'impflow ms':>10} "
        f"{'original ms':>11} {'x':>5} | {'logdet ms (ours/orig)':>21} | "
        f"{'iters ours':>10} {'iters orig':>16} | {'max|F| ours':>11} {'orig':>8} | "
        f"{'grad err ours':>13} {'orig':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        acc = r["accuracy"]
        ours, theirs = acc["impflow"], acc["original"]
        logdet = (
            f"{r['impflow_logdet_ms']:.1f}/{r['original_logdet_ms']:.1f}"
            if r["task"] == "step"
            else "-"
        )
        left, right = steps_text(acc, r["task"])
        print(
            f"{r['device']:6} {r['state']:7} {r['block']:8} {r['task']:6} | "
            f"{r['impflow_ms']:>10.1f} {r['original_ms']:>11.1f} {r['speedup']:>5.2f} | "
            f"{logdet:>21} | {left:>10} {right:>16} | "
            f"{_fmt(ours.get('residual_max'), '.1e'):>11} "
            f"{_fmt(theirs.get('residual_max'), '.1e'):>8} | "
            f"{_fmt(ours.get('grad_rel_error'), '.1e'):>13} "
            f"{_fmt(theirs.get('grad_rel_error'), '.1e'):>8}"
        )


def print_floor_table(rows):
    """The step rows against their floor (module docstring): the most any step could gain."""
    header = (
        f"{'device':6} {'state':7} {'block':8} | {'floor ms':>8} {'solve evals':>11} | "
        f"{'original ms':>11} {'max x':>6} | {'impflow x':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["task"] == "step":
            print(
                f"{r['device']:6} {r['state']:7} {r['block']:8} | {r['floor_ms']:>8.1f} "
                f"{r['floor_solve_evaluations']:>11} | {r['original_ms']:>11.1f} "
                f"{r['max_speedup']:>6.2f} | {r['speedup']:>9.2f}"
            )
    print(
        "floor: the forward solve's evaluations of g_z (no graph) and one forward and backward "
        "of every network, no log-det; max x = original / floor"
    )


def print_sampling_table(rows):
    """The sample rows in detail: root only (the main table's ratio), with the log-det, and
    impflow at the original's accuracy."""
    header = (
        f"{'device':6} {'state':7} {'block':8} | {'root only: ours':>15} {'orig':>6} {'x':>5} | "
        f"{'+ logdet: ours':>14} {'orig':>6} {'x':>5} | {'ours at orig tol':>16} {'x':>5} "
        f"{'max|F|':>8} {'orig max|F|':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["task"] != "sample":
            continue
        acc = r["accuracy"]
        print(
            f"{r['device']:6} {r['state']:7} {r['block']:8} | {r['impflow_ms']:>15.1f} "
            f"{r['original_ms']:>6.1f} {r['speedup']:>5.2f} | "
            f"{r['impflow_with_logdet_ms']:>14.1f} {r['original_with_logdet_ms']:>6.1f} "
            f"{r['speedup_with_logdet']:>5.2f} | {r['impflow_matched_ms']:>16.1f} "
            f"{r['speedup_matched']:>5.2f} {acc['impflow_matched']['residual_max']:>8.1e} "
            f"{acc['original']['residual_max']:>11.1e}"
        )


def problems(rows):
    """What would make the figures meaningless: a gradient far from the float64 reference on
    either side, an impflow root that misses its tolerance (max|F| <= 1e-5, DESIGN.md §5), or
    impflow samples without the log-det that differ from those with it (> 1e-6). The original's
    sampling residual is not checked: its loose tolerance is part of the comparison."""
    found = []
    for r in rows:
        where = f"{r['device']} {r['state']} {r['block']} {r['task']}"
        for side, acc in r["accuracy"].items():
            err = acc.get("grad_rel_error")
            if err is not None and not err <= 1e-3:
                found.append(f"{where}: {side} gradient error {err:.2e} > 1e-3")
        res = r["accuracy"]["impflow"].get("residual_max")
        if res is not None and not res <= 1e-5:
            found.append(f"{where}: impflow residual {res:.2e} > 1e-5")
        diff = r["accuracy"]["impflow"].get("x_diff_vs_logdet_path")
        if diff is not None and not diff <= 1e-6:
            found.append(f"{where}: impflow samples without log-det differ by {diff:.2e} > 1e-6")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all")
    parser.add_argument("--batch", type=positive_int, default=5000)
    parser.add_argument("--hidden", type=positive_int, default=128)
    parser.add_argument("--states", nargs="+", choices=["fresh", "trained"], default=None)
    parser.add_argument(
        "--train-steps", type=positive_int, default=300, help="steps of the trained state"
    )
    parser.add_argument("--train-batch", type=positive_int, default=1000)
    parser.add_argument("--train-lr", type=float, default=1e-3)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (torch default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser, "train_step", "small sizes, a smoke run", min_seconds=2.0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_quick(parser, args, batch=500, train_steps=20, train_batch=200, min_seconds=0.05)
    states = args.states or ["fresh", "trained"]
    has_gpu = torch.cuda.is_available() and impflow.has_cuda_kernels()
    if args.device == "cuda" and not has_gpu:
        parser.error("--device cuda needs a CUDA GPU and impflow built with CUDA kernels")
    devices = (["cpu"] if args.device in ("all", "cpu") else []) + (
        ["cuda"] if args.device in ("all", "cuda") and has_gpu else []
    )
    rows, train_losses = [], {}
    for device in devices:
        nets = make_networks(args.hidden, device, args.seed)
        done = 0
        for state in ("fresh", "trained"):
            if state == "trained":
                train_losses[device] = pretrain(
                    nets,
                    args.train_steps - done,
                    args.train_batch,
                    args.train_lr,
                    device,
                    args.seed,
                )
                done = args.train_steps
            if state in states:
                rows += bench_state(device, state, nets, args.batch, args.min_seconds, args.seed)
    print_table(rows)
    print(
        f"B = {args.batch}, g: LipschitzMLP [2, {args.hidden}, {args.hidden}, 2] sin, coeff "
        f"{COEFF}, {POWER_ITERATIONS} power iterations per call; float32; CPU threads: "
        f"{torch.get_num_threads()}; x = original / impflow; trained = {args.train_steps} Adam "
        f"steps (lr {args.train_lr}, batch {args.train_batch}); step: forward, exact log-det, "
        f"backward on both sides; sample: the root only on both sides (impflow "
        f"inverse(z, logdet=False), the original's sampling); iters: forward (sample: "
        f"inverse) solve, ours mean/max per sample, original whole-batch count and adjoint "
        f"count; max|F|: residual of the returned roots (samples); grad err: relative to "
        f"float64 impflow with tight tolerances"
    )
    print()
    print_floor_table(rows)
    print()
    print_sampling_table(rows)
    print(
        "root only: as in the table above; + logdet: impflow inverse(z) (root and exact "
        "log-det) vs the original's root and autograd-Jacobian log-det; ours at orig tol: "
        "impflow's root only with its per-sample stop ‖F‖₂ <= tol set to the original's worst "
        "sample (max|F| columns: its residual and the original's)"
    )
    write_json(
        args.out,
        {
            "benchmark": "train_step",
            "machine": {d: machine_facts(d) for d in devices},
            "config": {
                "batch": args.batch,
                "hidden": args.hidden,
                "coeff": COEFF,
                "power_iterations": POWER_ITERATIONS,
                "train_steps": args.train_steps,
                "train_batch": args.train_batch,
                "train_lr": args.train_lr,
                "train_losses": train_losses,
                "threads": torch.get_num_threads(),
            },
            "rows": rows,
        },
    )
    print(f"wrote {args.out}")
    found = problems(rows)
    for line in found:
        print(f"PROBLEM: {line}", file=sys.stderr)
    if found:
        sys.exit(1)


if __name__ == "__main__":
    main()
