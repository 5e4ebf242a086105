"""Work items on single-threaded workers (tamis._threads.map_work)."""

from __future__ import annotations

import threading

import pytest
import torch

from tamis._threads import map_work


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_results_in_item_order_from_single_threaded_workers(two_threads):
    def work(i: int) -> tuple[int, int, str]:
        torch.ones(64) @ torch.ones(64)  # a torch op first: the thread count it runs with
        return i * i, torch.get_num_threads(), threading.current_thread().name

    caller_counts = []
    out = []
    for r in map_work(work, range(40), "cpu"):
        caller_counts.append(torch.get_num_threads())
        out.append(r)
    assert [r[0] for r in out] == [i * i for i in range(40)]
    assert {r[1] for r in out} == {1}
    assert all(r[2].startswith("tamis-work") for r in out)
    # this thread's ops ran on one thread while the workers ran, and on two again after
    assert set(caller_counts) == {1}
    assert torch.get_num_threads() == 2
    # a thread started afterwards takes the caller's count, not the workers'
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2]


def test_one_thread_or_one_item_runs_here(two_threads):
    here = threading.current_thread().name
    assert list(map_work(lambda i: threading.current_thread().name, [0], "cpu")) == [here]
    torch.set_num_threads(1)
    got = list(map_work(lambda i: (i, threading.current_thread().name), range(3), "cpu"))
    assert got == [(0, here), (1, here), (2, here)]


def test_an_error_in_an_item_reaches_the_caller_and_restores_the_threads(two_threads):
    def work(i: int) -> int:
        if i == 3:
            raise ValueError("item 3")
        return i

    with pytest.raises(ValueError, match="item 3"):
        for _ in map_work(work, range(6), "cpu"):
            pass
    assert torch.get_num_threads() == 2
