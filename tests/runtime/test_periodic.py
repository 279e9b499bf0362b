"""Periodic: runs every interval, and stop lets the run in progress finish instead of cancelling
it (a Redis call cancelled half-way can wedge the client)."""

from __future__ import annotations

import asyncio

from services.runtime.periodic import Periodic


async def test_runs_every_interval_and_stops_between_runs() -> None:
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def run() -> None:
        runs.append(loop.time())

    periodic = Periodic(run, 0.02, "test")
    periodic.start()
    await asyncio.sleep(0.15)
    await periodic.stop()
    count = len(runs)
    assert count >= 3
    await asyncio.sleep(0.06)
    assert len(runs) == count  # nothing runs after stop returned


async def test_stop_waits_for_the_run_in_progress() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[bool] = []

    async def run() -> None:
        started.set()
        await release.wait()  # a slow call, e.g. a Redis round trip
        finished.append(True)

    periodic = Periodic(run, 0.01, "test")
    periodic.start()
    await started.wait()
    stopping = asyncio.create_task(periodic.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # not cancelled: it waits for the run
    release.set()
    await asyncio.wait_for(stopping, 1)
    assert finished == [True]
