"""A coroutine run every ``interval_s`` seconds until stopped, never interrupted mid-run.

Cancelling a task inside a Redis call (redis-py asyncio) can leave its connection half-used, and
the next call on the same client (a deregistration at shutdown, say) then waits forever. So
``stop`` sets an event that the loop checks between runs and waits for the run in progress to
finish; each run is bounded by its own deadlines (every Redis call has one).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Periodic:
    def __init__(self, run: Callable[[], Awaitable[None]], interval_s: float, name: str) -> None:
        self._run = run
        self._interval_s = interval_s
        self._name = name
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run every ``interval_s`` from now (the first run one interval away)."""
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Let the run in progress finish, then stop; nothing runs after this returns."""
        if self._task is None:
            return
        self._stopping.set()
        await self._task
        self._task = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if self._stopping.is_set():
                return
            await self._run()
