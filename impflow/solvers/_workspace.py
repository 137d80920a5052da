"""Buffers that CPU solves reuse instead of allocating them anew.

A Broyden history of a few megabytes that is freed at the end of a solve goes back to the
operating system (glibc trims the top of its heap), and the next solve page-faults it in again.
At (B, n, m) = (1000, 64, 30) on the development machine that was half of a fused solve: 10.4 ms
with fresh buffers, 5.2 ms with the heap kept (same code, MALLOC_TRIM_THRESHOLD_ raised). A
solve checks its buffers out here and returns them when it ends; the next solve with the same
key takes them. CUDA needs none of this: torch's caching allocator already keeps the memory.
"""

import threading
from contextlib import contextmanager

_MAX_SETS = 8  # buffer sets kept for later solves, least recently returned dropped first
_MAX_BYTES = 512 << 20  # and at most this much memory kept in all
_lock = threading.Lock()
_kept = {}  # key -> tuple of tensors; insertion order is the order of return


@contextmanager
def reused(key, allocate):
    """Yields the tensors of ``allocate()``, taken from an earlier solve with the same ``key``
    when one returned them, with arbitrary contents. A solve that runs while another holds the
    set (nested in its ``fn``, or in another thread) allocates its own."""
    with _lock:
        buffers = _kept.pop(key, None)
    if buffers is None:
        buffers = allocate()
    try:
        yield buffers
    finally:
        with _lock:
            _kept.pop(key, None)  # a set returned meanwhile by another solve is replaced
            _kept[key] = buffers
            while len(_kept) > _MAX_SETS or (len(_kept) > 1 and _kept_bytes() > _MAX_BYTES):
                del _kept[next(iter(_kept))]


def _kept_bytes():
    return sum(t.untyped_storage().nbytes() for buffers in _kept.values() for t in buffers)


def clear():
    """Drops every history kept for later CPU solves (``impflow.solvers.clear_history_cache``);
    their memory is freed once no running solve uses it."""
    with _lock:
        _kept.clear()
