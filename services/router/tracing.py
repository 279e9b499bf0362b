"""Trace recording: every call becomes a ``TraceCall`` appended to the capped Redis stream.

``record`` only appends to an in-memory buffer, so the request path never waits on Redis. A
background task writes the buffer in batches of up to ``batch`` records, a record at most
``flush_s`` after it was buffered (it sleeps while nothing is buffered: no timer ticks in an idle
router). A batch is written with one script (``Store.append_trace``), on the first tick of
``flush_s`` after its first record (``ticks``: with the defaults the same wake-up as the health
checks').

A batch that cannot be written (Redis down or slow) is dropped and counted, as is a record arriving
while the buffer holds ``buffer`` records; writing resumes by itself when Redis answers again. A
failed write is tried once more at once, because every pooled connection fails once after a Redis
restart; so a record may be stored twice (``scepsy trace export`` keeps one). ``stop`` writes what
is left (within its deadline). Records already written that vanish with Redis (restarted without
its data) are counted as lost (``scepsy_router_trace_lost``), from the stream's length after each
write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import orjson
from redis.exceptions import RedisError

from services.core.errors import UnavailableError
from services.core.workload.trace import TraceCall, record_dict
from services.router.metrics import RouterMetrics
from services.router.ticks import next_tick
from services.runtime.logging import get_logger
from services.runtime.store import Store

log = get_logger(__name__)


class TraceRecorder:
    def __init__(
        self,
        store: Store,
        metrics: RouterMetrics,
        *,
        max_len: int,
        batch: int,
        flush_s: float,
        buffer: int,
        enabled: bool = True,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._max_len = max_len
        self._batch = batch
        self._flush_s = flush_s
        self._buffer_max = buffer
        self._enabled = enabled
        self._buffer: deque[TraceCall] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline = 0.0  # loop time by which the oldest buffered record is written
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._store_down = False
        self._last_length: int | None = None  # of the stream after the last write
        self.recorded = 0
        self.dropped = 0
        self.lost = 0

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def record(self, call: TraceCall) -> None:
        """Queue one record for writing; never blocks and never raises."""
        if not self._enabled:
            return
        if len(self._buffer) >= self._buffer_max:
            self._drop(1)
            return
        buffer = self._buffer
        buffer.append(call)
        if len(buffer) == 1:
            if self._loop is not None:
                self._deadline = next_tick(self._loop.time(), self._flush_s)
            self._wake.set()  # the writer sleeps while nothing is buffered
        elif len(buffer) >= self._batch:
            self._wake.set()

    async def start(self) -> None:
        if self._enabled:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._run(), name="router-trace-writer")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the writer, then write what is buffered, giving up after ``timeout_s``.

        The writer is asked to stop rather than cancelled: a cancellation racing with a
        timeout inside it could be lost (Python 3.11), leaving the task running."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout_s)
            self._task = None
        try:
            async with asyncio.timeout(timeout_s):
                while self._buffer and await self.flush():
                    pass
        except TimeoutError:
            pass
        if self._buffer:
            self._drop(len(self._buffer))
            self._buffer.clear()

    async def flush(self) -> bool:
        """Write one batch; False when it could not be written (it is dropped and counted)."""
        batch = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
        if not batch:
            return True
        lines = [orjson.dumps(record_dict(c)) for c in batch]  # as ``dumps``, faster
        try:
            try:
                length = await self._store.append_trace(lines, self._max_len)
            except (UnavailableError, RedisError, OSError):
                # Once more at once: after a Redis restart each pooled connection fails once.
                length = await self._store.append_trace(lines, self._max_len)
        except (UnavailableError, RedisError, OSError) as exc:
            self._drop(len(batch))
            if not self._store_down:
                self._store_down = True
                log.warning("trace_store_down", error=str(exc), dropped=len(batch))
            return False
        if self._store_down:
            self._store_down = False
            log.info("trace_store_up", dropped_total=self.dropped)
        self._note_length(length, len(batch))
        self.recorded += len(batch)
        self._metrics.trace_recorded.inc(len(batch))
        return True

    def _note_length(self, length: int, added: int) -> None:
        """Count records that vanished: the stream only grows (other routers write too) until
        its cap, which approximate trimming never undercuts, so a stream shorter than the
        length last seen plus this batch (up to the cap) lost records since."""
        if self._last_length is not None:
            expected = min(self._last_length + added, self._max_len)
            if length < expected:
                lost = expected - length
                self.lost += lost
                self._metrics.trace_lost.inc(lost)
                log.warning("trace_records_lost", lost=lost, stream_length=length)
        self._last_length = length

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._metrics.trace_dropped.inc(count)

    async def _run(self) -> None:
        """Write batches: on the first tick of ``flush_s`` after its first record, or at once
        when ``batch`` records wait. With nothing buffered the writer sleeps until a record
        comes (no timer ticks while the router is idle)."""
        while not self._stopping.is_set():
            if not self._buffer:
                self._wake.clear()
                await self._wake.wait()  # ``record`` sets it for the first record
                continue
            self._wake.clear()
            if len(self._buffer) < self._batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(self._deadline):
                        await self._wake.wait()  # set when the write is due, or to stop
            self._wake.clear()
            while self._buffer and not self._stopping.is_set():
                if not await self.flush():
                    # Redis is down: wait for the next period rather than spin
                    now = asyncio.get_running_loop().time()
                    self._deadline = next_tick(now, self._flush_s)
                    break
