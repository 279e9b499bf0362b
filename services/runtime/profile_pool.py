"""Cold analytic profiles computed by worker processes.

An analytic profile is an exact simulation in Python (``services.core.perf``): one process
computes one at a time, and a cold plan of a large cluster needs a hundred or more. A
``ProfilePool`` is a process pool started on first use and kept, with the ``forkserver`` start
method (safe in threaded services; the server imports the profile code once, so workers start
in milliseconds). A pool whose worker died (killed, out of memory) is dropped and started again
at its next use; the work in hand is done in the calling process. The planner and ``scepsy
plan`` map ``SpecProfiles.prefetch`` over it (``prefetch_cold``); the Profiler service computes
each analytic profile in it (``ProfilePool.run``), so concurrent Profile calls run in parallel.

A process has one pool per setting (``shared_pool``), closed at exit: services built several
times in one process (tests, ``scepsy up`` in-process) share it.

A planner whose profiles come from the Profiler service fetches them with concurrent calls
instead (``prefetch_remote``).
"""

from __future__ import annotations

import asyncio
import atexit
import math
import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from services.core.planning.profiles import (
    PARALLEL_MIN_COLD,
    SpecProfiles,
    available_cpus,
    spec_configs,
)
from services.core.workload.spec import Spec
from services.runtime.logging import get_logger

log = get_logger(__name__)

T = TypeVar("T")
MAX_WORKERS = 16
CHUNK = 4  # profiles handed to a worker at a time (fewer round trips)
PRELOAD = ["services.core.planning.profiles"]
CPU_MAX = "/sys/fs/cgroup/cpu.max"


def quota_cpus(path: str = CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (a container's CPU limit, ``quota period`` rounded
    up), None without one."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def pool_workers(workers: int) -> int:
    """Worker processes for a ``workers`` setting: 0 is one per CPU this process may use (its
    affinity, within its container's CPU limit; at most ``MAX_WORKERS``); 1 or less is none
    (compute in the calling process)."""
    if workers == 0:
        workers = min(available_cpus(), quota_cpus() or MAX_WORKERS, MAX_WORKERS)
    return workers if workers > 1 else 0


class ProfilePool:
    """A lazily started process pool for analytic profiles (module docstring)."""

    def __init__(self, workers: int, method: str = "forkserver") -> None:
        if workers < 2:
            raise ValueError(f"workers: a pool needs at least 2, got {workers}")
        self.workers = workers
        self.method = method
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        """Whether work went to the pool since it was made (or closed)."""
        return self._executor is not None

    def executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                context = multiprocessing.get_context(self.method)
                if self.method == "forkserver":
                    context.set_forkserver_preload(PRELOAD)
                self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
            return self._executor

    def map(self, fn: Callable[[Any], T], items: Iterable[Any]) -> Iterator[T]:
        return self.executor().map(fn, items, chunksize=CHUNK)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker, awaited; in a thread of this process when the pool broke
        (it starts again at the next call)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.executor(), partial(fn, *args))
        except BrokenExecutor:
            self.broke()
            return await asyncio.to_thread(fn, *args)

    def broke(self) -> None:
        """Drop a pool whose worker died (the next use starts a new one)."""
        log.warning("profile_pool_broken", workers=self.workers)
        self.close(wait=False)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=True)


_SHARED: dict[tuple[int, str], ProfilePool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int, method: str = "forkserver") -> ProfilePool | None:
    """This process's pool for a ``workers`` setting (``pool_workers``; None for none)."""
    count = pool_workers(workers)
    if not count:
        return None
    with _SHARED_LOCK:
        pool = _SHARED.get((count, method))
        if pool is None:
            pool = _SHARED[(count, method)] = ProfilePool(count, method)
        return pool


@atexit.register
def _close_shared() -> None:
    with _SHARED_LOCK:
        pools = list(_SHARED.values())
        _SHARED.clear()
    for pool in pools:
        pool.close()


def prefetch_cold(
    profiles: SpecProfiles, pool: ProfilePool | None, spec: Spec | None = None
) -> int:
    """The cold profiles (``SpecProfiles.cold``) of every configuration the search may ask for
    on ``spec`` (default the profile source's) computed in ``pool``, when there are at least
    ``PARALLEL_MIN_COLD``; the number sent there (0: the search computes them as it goes)."""
    if pool is None:
        return 0
    configs = spec_configs(spec or profiles.spec)
    cold = profiles.cold(configs)
    if len(cold) < PARALLEL_MIN_COLD:
        return 0
    try:
        profiles.prefetch(configs, pool.map)
    except BrokenExecutor:
        pool.broke()
        return 0
    return len(cold)


def prefetch_remote(profiles: SpecProfiles, calls: int, spec: Spec | None = None) -> int:
    """Every profile the search may ask for on ``spec`` (default the profile source's), fetched
    from the provider (the Profiler service) with ``calls`` calls in flight at once; the number
    fetched."""
    configs = spec_configs(spec or profiles.spec)
    if calls < 2 or not configs:
        return 0
    with ThreadPoolExecutor(calls, thread_name_prefix="profile-fetch") as threads:
        profiles.prefetch(configs, threads.map)
    return len(configs)
