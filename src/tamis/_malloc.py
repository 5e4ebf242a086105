"""Memory that a job frees stays with the process for its next allocation.

glibc's ``malloc`` serves every block over 32 MB with a fresh ``mmap`` and gives it back to the
kernel on ``free``; the next block of that size then costs a page fault for each of its 4 KB
pages. A job that works through a stack of large temporaries per item (a 4096² movie: tens of
GB of fresh pages per movie) spends more time in those faults than in its arithmetic on a
virtual machine whose page faults are slow (measured: 2.7 GB first touched in 2-7 s, rewritten
in 0.14 s; BENCHMARKS.md, motion correction). :func:`keep_freed_memory` turns ``mmap`` off for
``malloc`` and heap trimming off, so freed blocks are reused without faults. The price is that
the process keeps its peak memory until it ends: it is called where a job's work runs (each
movie's motion correction, the 2D/3D engine's runs: a job's own process, a dask worker, a
torchrun rank), and a Python session that calls those functions keeps its peak too. A freed
block serves any later request that fits in it; a request of the very same size with alignment
padding (torch's) can miss a freed block that is not at the heap's top, and then the heap grows
(seen in a fresh interpreter with glibc.malloc.arena_max=1; tests/test_malloc.py). Every thread
allocates from the one main heap (``M_ARENA_MAX`` 1): with an arena per thread each would keep
its own peak (the 2D class-block sums' workers, :mod:`tamis._threads`; BENCHMARKS.md, 2D
classification in the hard regime, sixteenth session). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (process-wide, from now on); True
    when it was applied (now or earlier in this process), False where ``mallopt`` is missing
    (not Linux/glibc)."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):
                return False
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            # -1 for the trim threshold: never give the heap's top back (glibc's documented
            # way to turn trimming off); 0 mmapped blocks: every block from the heap
            # one arena for every thread: a thread's own arena would keep its own peak, which
            # the other threads' requests cannot use (tamis._threads' workers)
            _applied = (
                mallopt(_M_MMAP_MAX, 0) == 1
                and mallopt(_M_TRIM_THRESHOLD, -1) == 1
                and mallopt(_M_ARENA_MAX, 1) == 1
            )
    return _applied
