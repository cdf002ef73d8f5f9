"""OpenMP teams: a thread that ran a parallel region gives its workers back (`autoglm.engine.openmp`)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from autoglm.engine import openmp


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _threads_settled(expected: int, timeout: float = 5.0) -> int:
    """The thread count once it reached `expected` (released workers exit on their own, detached), or at timeout."""
    deadline = time.monotonic() + timeout
    n = _threads()
    while n != expected and time.monotonic() < deadline:
        time.sleep(0.01)
        n = _threads()
    return n


def _parallel_work() -> None:
    x = torch.ones(1 << 22)
    for _ in range(4):
        (x * 2).sum()  # an elementwise op and a reduction: both run at::parallel_for over 4M elements


@pytest.fixture
def two_threads():
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux /proc to count OS threads")
    if openmp._libgomp_pause() is None:
        pytest.skip("torch here does not use libgomp (the runtime this module manages)")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _in_thread(fn) -> object:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(60)
    assert not t.is_alive(), "the worker thread did not finish in 60 s"
    return out[0]


def test_release_frees_the_calling_threads_team(two_threads) -> None:
    def work() -> tuple[int, int, bool, int]:
        start = _threads()
        _parallel_work()
        with_team = _threads()
        released = openmp.release_thread_pool()
        return start, with_team, released, _threads_settled(start)

    start, with_team, released, after = _in_thread(work)
    assert with_team > start, "a parallel region with 2 threads should have started an OpenMP worker"
    assert released
    assert after == start, f"{after - start} OpenMP worker thread(s) left after release"


def test_release_without_a_team_is_a_no_op(two_threads) -> None:
    def work() -> tuple[bool, int, int]:
        start = _threads()
        return openmp.release_thread_pool(), start, _threads()

    released, start, after = _in_thread(work)
    assert released and after == start


def test_releasing_executor_leaves_no_team_behind(two_threads) -> None:
    with openmp.ReleasingExecutor(max_workers=1) as pool:
        pool.submit(lambda: None).result(60)  # the worker thread exists now
        idle = _threads()
        value = pool.submit(lambda: (_parallel_work(), 42)[1]).result(60)
        assert value == 42
        assert _threads_settled(idle) == idle, "the executor's worker kept its OpenMP team"

        def boom() -> None:
            _parallel_work()
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            pool.submit(boom).result(60)
        assert _threads_settled(idle) == idle, "a failing job kept its OpenMP team"
