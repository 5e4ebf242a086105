"""Many small CPU work items on single-threaded workers instead of each op's own threads.

torch runs an op on all its threads (OpenMP) and joins them at its end. For ops of a fraction of
a millisecond that join is a large part of the op, and on a shared virtual machine it can
become most of it: in stretches of minutes each 2-thread op took ~0.5 ms longer, as if the host
ran the second thread late (measured: a 96 x 20 x 6780 GEMM 0.25-0.33 ms on 2 threads, 0.78-1.0
ms in such a stretch, 0.35-0.41 ms on one thread at any time, a 1024² GEMM the same in both;
BENCHMARKS.md, 2D classification in the hard regime, sixteenth session). :func:`map_work` gives
each of ``n`` workers one thread and the work items one by one, so a slow thread only means
fewer items for it.

The items must not write to tensors that another item reads or writes; the caller reduces the
results in item order, so the sums do not depend on which worker took which item. An item that
maps work of its own runs it itself (its thread count is one).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["map_work", "worker_count"]

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # by (process, threads)
_lock = threading.Lock()


def _single_threaded_pool(n: int) -> ThreadPoolExecutor:
    """A pool of ``n`` threads whose torch ops each run on one thread (made once per ``n`` and
    process).

    torch's thread count is per thread (OpenMP, MKL), but ``torch.set_num_threads`` also sets
    the default that a thread takes at its first op: each worker sets 1 for itself after its
    first op, and the caller's count is set again afterwards for threads started later."""
    key = (os.getpid(), n)  # a forked child has none of its parent's threads
    with _lock:
        pool = _pools.get(key)
        if pool is not None:
            return pool
        caller = torch.get_num_threads()
        ready = threading.Barrier(n + 1)

        def start() -> None:
            # torch sets a thread's count from the default at its first op; that first, so
            # that the default set again below does not replace this thread's 1
            torch.get_num_threads()
            torch.set_num_threads(1)
            ready.wait()

        pool = ThreadPoolExecutor(n, thread_name_prefix="tamis-work")
        for _ in range(n):  # one start per thread: each waits at the barrier for the others
            pool.submit(start)
        ready.wait()
        torch.set_num_threads(caller)
        _pools[key] = pool
        return pool


def worker_count(device: torch.device | str) -> int:
    """How many items :func:`map_work` runs at once on ``device``: the torch threads on the CPU,
    one elsewhere."""
    return torch.get_num_threads() if torch.device(device).type == "cpu" else 1


def map_work(fn: Callable[[T], R], items: Iterable[T], device: torch.device | str) -> Iterator[R]:
    """``fn(x)`` for each of ``items``, in item order: on the CPU by ``torch.get_num_threads()``
    single-threaded workers taking the items one at a time; on another device, or with one
    thread, in this thread when the next result is asked for. A result that has been taken is
    not kept here (the caller reduces them one by one).

    Until the last result is taken this thread's own torch ops run on one thread too: its
    threads' join would wake the machine's other torch threads, which then spin for a while
    (libgomp's wait policy) on the cores that the workers need."""
    items = list(items)
    n = worker_count(device)
    if n <= 1 or len(items) <= 1:
        yield from (fn(x) for x in items)
        return
    results = _single_threaded_pool(n).map(fn, items)
    torch.set_num_threads(1)
    try:
        yield from results
    finally:
        torch.set_num_threads(n)
