"""The benchmarks check that both sides of a ratio compute the same before their timings count:
a wrong fused path must fail the run, not show as a speed-up."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import _timing  # noqa: E402
import power_iteration as power_benchmark  # noqa: E402
import solver_speed  # noqa: E402


def test_solver_speed_agrees_on_a_small_configuration():
    row = solver_speed.bench_config(40, 3, 5, "cpu", torch.float32, min_seconds=0.01)
    assert row["problems"] == []
    assert row["step_fused_error"] < 1e-5 and row["solve_max_difference"] < 1e-4


def test_solver_speed_fails_a_wrong_fused_step(monkeypatch):
    # A step that ignores the history (-F): before, the run reported it as a 178x speed-up.
    def wrong(U, V, dz, dF, F, active, slot, n_valid):
        return -F

    monkeypatch.setattr(solver_speed, "broyden_step", wrong)
    row = solver_speed.bench_config(40, 3, 5, "cpu", torch.float32, min_seconds=0.01)
    assert any("step error" in p for p in row["problems"])


def test_solver_speed_fails_a_wrong_fused_solve(monkeypatch):
    real = solver_speed.broyden

    def drifting(fn, z0, **options):
        z, stats = real(fn, z0, **options)
        return (z + 1e-3 if options.get("impl") == "fused" else z), stats

    monkeypatch.setattr(solver_speed, "broyden", drifting)
    row = solver_speed.bench_config(40, 3, 5, "cpu", torch.float32, min_seconds=0.01)
    assert any("solves differ" in p for p in row["problems"])


def test_solver_speed_refuses_a_bad_time_budget():
    for bad in ("nan", "-1", "0", "inf"):
        with pytest.raises(SystemExit):
            solver_speed.main(["--min-seconds", bad, "--out", os.devnull])


def test_power_iteration_benchmark_agrees_and_fails_a_wrong_step_count(monkeypatch):
    row = power_benchmark.bench("cpu", 1, 20, min_seconds=0.01)
    assert row["agree"] and row["speedup"] > 0
    # One step instead of 20 on the fused side: before, a 50x "speed-up" with a 1e-4 difference
    # that nothing checked.
    update = power_benchmark.inn.update_lipschitz
    monkeypatch.setattr(power_benchmark.inn, "update_lipschitz", lambda m, n: update(m, 1))
    assert not power_benchmark.bench("cpu", 1, 20, min_seconds=0.01)["agree"]


def test_the_log_det_benchmarks_fail_on_disagreement():
    # logdet.py, exact_logdet.py and logdet_memory.py recorded their differences and never
    # failed on them.
    _timing.exit_if_disagreeing([{"diff": 3e-7}], "diff", 1e-4, "paths")  # passes
    for bad in (2e-4, float("nan")):
        with pytest.raises(SystemExit) as err:
            _timing.exit_if_disagreeing([{"diff": 3e-7}, {"diff": bad}], "diff", 1e-4, "paths")
        assert err.value.code == 1


def test_quick_keeps_the_options_given_on_the_command_line():
    # --quick --batch 0 ran with B = 100, silently: --quick replaced every size.
    parser = _timing.argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(["--quick", "--batch", "7"])
    _timing.apply_quick(parser, args, batch=100, width=16)
    assert (args.batch, args.width) == (7, 16)
    args = parser.parse_args(["--batch", "7"])
    _timing.apply_quick(parser, args, batch=100, width=16)
    assert (args.batch, args.width) == (7, 128)
