"""CPU solves reuse their Broyden histories (impflow/solvers/_workspace.py): a set is handed
to one solve at a time, comes back after errors too, stays bounded, and a solve that starts
from another solve's leftover history gets the same answer as one from fresh memory."""

import threading

import pytest
import torch

from impflow.solvers import _workspace, broyden, clear_history_cache
from test_solvers import contraction_problem


@pytest.fixture(autouse=True)
def _empty_cache():
    clear_history_cache()
    yield
    clear_history_cache()


def allocations():
    made = []

    def allocate():
        made.append((torch.empty(3), torch.empty(3)))
        return made[-1]

    return made, allocate


def test_a_returned_set_is_handed_to_the_next_solve():
    made, allocate = allocations()
    with _workspace.reused("k", allocate) as first:
        pass
    with _workspace.reused("k", allocate) as second:
        assert second is first
    assert len(made) == 1


def test_a_set_in_use_is_not_shared():
    made, allocate = allocations()
    with _workspace.reused("k", allocate) as outer:
        with _workspace.reused("k", allocate) as inner:  # e.g. a solve inside fn
            assert inner is not outer
    assert len(made) == 2
    assert len(_workspace._kept) == 1  # one set per key is kept


def test_a_set_comes_back_after_an_error():
    made, allocate = allocations()
    with pytest.raises(RuntimeError):
        with _workspace.reused("k", allocate):
            raise RuntimeError("fn failed")
    with _workspace.reused("k", allocate):
        pass
    assert len(made) == 1


def test_kept_sets_are_bounded_and_the_oldest_goes_first():
    made, allocate = allocations()
    for key in range(_workspace._MAX_SETS + 2):
        with _workspace.reused(key, allocate):
            pass
    assert list(_workspace._kept) == list(range(2, _workspace._MAX_SETS + 2))


def test_kept_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(_workspace, "_MAX_BYTES", 100)
    for key in range(3):
        with _workspace.reused(key, lambda: (torch.empty(20),)):  # 80 bytes each
            pass
    assert list(_workspace._kept) == [2]


def test_clear_history_cache_drops_every_set():
    with _workspace.reused("k", lambda: (torch.empty(3),)):
        pass
    clear_history_cache()
    assert not _workspace._kept


@pytest.mark.parametrize("shape", [(64, 2), (16, 40)])  # batch-minor and per-sample layouts
def test_leftover_history_gives_the_same_solve(shape):
    B, event = shape[0], shape[1:]
    fn_a, _, _ = contraction_problem(B, event, 0.9, seed=3)
    fn_b, z_b, _ = contraction_problem(B, event, 0.95, seed=4)
    z0 = torch.zeros(shape, dtype=torch.float64)
    options = {"tol": 1e-10, "max_iter": 200, "history": 5}
    fresh_z, fresh_stats = broyden(fn_b, z0, **options)
    clear_history_cache()
    broyden(fn_a, z0, warn=False, **options)  # leaves its history to the next solve
    assert len(_workspace._kept) == 1
    reused_z, reused_stats = broyden(fn_b, z0, **options)
    assert torch.equal(reused_z, fresh_z)
    assert torch.equal(reused_stats.nstep, fresh_stats.nstep)
    assert reused_stats.all_converged
    torch.testing.assert_close(reused_z, z_b, atol=1e-8, rtol=0)


def test_concurrent_solves_in_threads_are_correct():
    problems = [contraction_problem(32, (3,), 0.9, seed=s) for s in range(4)]
    errors = []

    def work(fn, z_star):
        try:
            for _ in range(5):
                z, stats = broyden(fn, torch.zeros(32, 3, dtype=torch.float64), tol=1e-10)
                assert stats.all_converged
                torch.testing.assert_close(z, z_star, atol=1e-8, rtol=0)
        except Exception as err:  # reported below: pytest does not see other threads
            errors.append(err)

    threads = [threading.Thread(target=work, args=(fn, z)) for fn, z, _ in problems]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_histories_pass_between_inference_mode_and_normal_solves():
    # Sampling often runs under inference_mode; its histories are inference tensors, which the
    # next (training) solve updates in place.
    fn, z_star, _ = contraction_problem(64, (2,), 0.9, seed=5)
    z0 = torch.zeros(64, 2, dtype=torch.float64)
    with torch.inference_mode():
        z_inference, _ = broyden(fn, z0, tol=1e-10)
    assert len(_workspace._kept) == 1
    z_normal, stats = broyden(fn, z0, tol=1e-10)
    assert stats.all_converged
    assert torch.equal(z_normal, z_inference)
    with torch.inference_mode():
        z_again, _ = broyden(fn, z0, tol=1e-10)
    assert torch.equal(z_again, z_normal)
