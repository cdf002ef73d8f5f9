"""OpenMP worker teams: one compute thread owns the process's only team while serving.

libgomp (the OpenMP runtime of torch's Linux wheels) keeps a worker team per OS thread that ever ran a parallel
region, for that thread's lifetime, and counts every team's workers. Once that count exceeds the CPUs, it switches
every team to "throttled" waiting (~100 spins, then a futex sleep), so the engine thread's team pays a futex wake-up
at each of the few hundred parallel regions of a decode step. Model loading, weight packing and health probes run in
the event loop's executor threads and would each leave a team behind: on 2 cores one stream decoded at ~0.55x the
speed of the same engine in the loading thread (issue 15). `release_thread_pool` frees the calling thread's team;
`ReleasingExecutor` does it after every job, so the engine thread keeps the only team and its workers spin-wait.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import torch

log = logging.getLogger("autoglm.engine")

P = ParamSpec("P")
T = TypeVar("T")

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: omp_pause_soft
_lock = threading.Lock()
_pause: Callable[[int], int] | None = None
_looked_up = False


def _libgomp_pause() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of torch's libgomp, or None (torch uses another OpenMP runtime, or none).

    Only libgomp: its pause frees the calling thread's team alone (LLVM's libomp pauses the whole runtime, which
    would stop the engine's team mid-region)."""
    global _pause, _looked_up
    with _lock:
        if _looked_up:
            return _pause
        _looked_up = True
        # torch's own copy: other wheels vendor theirs (sentencepiece's libgomp-<hash>.so), and pausing one of
        # those would free nothing of the engine's
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib") + os.sep
        path = None
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    name = line.rsplit(" ", 1)[-1].strip()
                    if name.startswith(torch_lib) and os.path.basename(name).startswith("libgomp"):
                        path = name
                        break
        except OSError:  # not Linux
            return None
        if path is None:
            log.debug("torch uses no libgomp of its own: OpenMP teams are left as they are")
            return None
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError) as e:  # a libgomp older than OpenMP 5.0 (GCC 10)
            log.debug("%s has no omp_pause_resource_all (%s): OpenMP teams are left as they are", path, e)
            return None
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        _pause = fn
        return fn


def release_thread_pool() -> bool:
    """Free the OpenMP worker team the calling thread owns (a no-op when it has none); -> True when released.

    Call it from a thread that is done computing (the next parallel region in it builds a new team). Never from
    inside a parallel region: libgomp refuses then (-1) and this returns False."""
    pause = _libgomp_pause()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


def releasing(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn`, then `release_thread_pool()` in the same thread (also when `fn` raises)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        finally:
            release_thread_pool()

    return run


class ReleasingExecutor(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose workers free their OpenMP team after every job (the event loop's default
    executor while serving: `asyncio.to_thread` jobs such as loading, packing and encoder probes)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(releasing(fn), *args, **kwargs)
