"""Dispatch: admit a call, pick a replica, call it, record the call.

``Dispatcher.call(spec)`` is an async context manager yielding an open ``Upstream``:

1. **Admission.** A replica takes a call while it is healthy and below ``max_in_flight``; the
   routing policy (``services.core.routing``) chooses among those. When none is free the call
   waits in the model's FIFO queue (at most ``queue_size`` waiting, each at most
   ``queue_timeout_s``); beyond that ``OverloadedError`` (HTTP 429 / RESOURCE_EXHAUSTED).
2. **Failover.** A call that fails before the engine's first byte (cannot connect, connection
   dropped before the headers), or is answered with a 5xx status before any body, is retried
   once on another replica; a replica that refuses connections is ejected
   (``ReplicaRegistry.report_failure``).
3. **Deadline.** The whole call, answer included, runs under ``upstream_timeout_s`` (or the
   caller's shorter deadline): ``UpstreamTimeoutError``.
4. **Cancellation.** When the caller goes away, the task running the call is cancelled; leaving
   the context closes the engine connection, which aborts the generation there.
4b. **Nothing hangs.** The router ends a call itself when its replica is ejected (the
   registry's ``on_eject``: failed health checks, refused connections), and a stream that
   sends nothing for ``stream_idle_timeout_s`` (a watchdog task wakes when the first stream
   in flight could have been quiet that long). A call still waiting for the engine's answer
   goes to another replica; one whose answer was being read gets ``UpstreamAbortedError``
   naming the reason (``fetch``, for non-streamed calls, which have sent the client nothing
   yet, tries another replica once first).
5. **Trace.** On exit the call becomes one ``TraceCall`` (ok, error or cancelled) handed to the
   recorder, which never blocks; metrics are updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from services.core.routing import CallInfo, ReplicaLoad, RoutingPolicy
from services.core.workload.trace import UNTAGGED_WORKFLOW, Status, TraceCall
from services.router.config import RouterConfig
from services.router.errors import (
    DrainingError,
    ModelNotFoundError,
    NoHealthyReplicaError,
    OverloadedError,
    UpstreamAbortedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from services.router.http1 import Http1ConnectError, Http1Error, Http1Pool
from services.router.metrics import RouterMetrics
from services.router.registry import Replica, ReplicaRegistry
from services.router.schema import Identity
from services.router.tracing import TraceRecorder
from services.router.upstream import Upstream
from services.runtime.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call to dispatch: the engine API path, the JSON body to send, and its context."""

    model: str
    path: str  # "/v1/chat/completions" or "/v1/completions"
    body: Mapping[str, Any]
    stream: bool
    identity: Identity
    api: str  # front end, a metrics label: "http" or "grpc"
    timeout_s: float | None = None  # the caller's own deadline, if shorter


class _Flight:
    """One call on one replica, from taking the replica to releasing it: what the router needs
    to end it from outside."""

    __slots__ = ("reason", "replica", "stream", "task", "upstream")

    def __init__(self, replica: Replica, task: asyncio.Task[Any] | None, stream: bool) -> None:
        self.replica = replica
        self.task = task
        self.stream = stream
        self.upstream: Upstream | None = None
        self.reason: str | None = None


class _Deadline:
    """The deadline of one call, as ``asyncio.timeout`` keeps it but without its cost per call
    (objects, a look-up of the running loop and task, each a system call on Python 3.11): at
    ``when`` the call's task is cancelled; ``end`` stops the timer and tells whether that
    cancellation was the deadline's (and no other is pending), as ``asyncio.timeout`` does
    before it turns it into ``TimeoutError``."""

    __slots__ = ("expired", "handle", "task")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None, when: float
    ) -> None:
        if task is None:
            raise RuntimeError("a call's deadline needs a task")
        self.task = task
        self.expired = False
        self.handle: asyncio.TimerHandle | None = loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.handle = None
        self.task.cancel()

    def end(self) -> bool:
        """Stop the timer (once); True when the deadline passed and its cancellation is the
        only one (then the caller raises ``TimeoutError`` in place of ``CancelledError``)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.cancel()
            return False
        if self.expired:
            self.expired = False
            return self.task.uncancel() == 0
        return False


class _Call:
    """``Dispatcher.call``: one call from its admission to its record, as an async context
    manager written out (a generator-based one costs several objects and steps per call).

    Entering admits the call (``DrainingError`` and ``ModelNotFoundError`` before it counts as
    a call), starts its deadline and opens it on a replica; leaving releases the replica and
    records the outcome. The deadline's cancellation becomes ``UpstreamTimeoutError``."""

    __slots__ = (
        "call_id",
        "deadline",
        "dispatcher",
        "flight",
        "info",
        "outcome",
        "spec",
        "started",
        "started_wall",
        "timeout",
        "upstream",
    )

    def __init__(self, dispatcher: Dispatcher, spec: CallSpec) -> None:
        self.dispatcher = dispatcher
        self.spec = spec
        self.upstream: Upstream | None = None
        self.flight: _Flight | None = None
        self.deadline: _Deadline | None = None

    async def __aenter__(self) -> Upstream:
        d, spec = self.dispatcher, self.spec
        if d.draining:
            raise DrainingError("router is shutting down", d._config.retry_after_s)
        d.check_model(spec.model)
        seq = next(d._seq)
        # unique across routers (a random prefix per router) without a syscall per call
        self.call_id = f"{d._id_prefix}{seq:08x}"
        self.info = CallInfo(seq, spec.identity.affinity)
        self.started_wall, self.started = d._clock(), time.monotonic()
        self.outcome = _Outcome()
        d._enter()
        try:
            limit = d._config.upstream_timeout_s
            self.timeout = min(spec.timeout_s, limit) if spec.timeout_s is not None else limit
            loop = d._loop
            assert loop is not None, "dispatcher not started"
            self.deadline = _Deadline(loop, asyncio.current_task(loop), loop.time() + self.timeout)
            self.upstream, self.flight = await d._open(spec, self.info, self.started, self.call_id)
        except BaseException as exc:
            replacement = self._close(exc)
            if replacement is not None:
                raise replacement from replacement.__cause__
            raise
        return self.upstream

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        upstream, flight, d = self.upstream, self.flight, self.dispatcher
        assert upstream is not None and flight is not None
        upstream.release()
        d._land(flight)
        d._release(upstream.replica)
        replacement = self._close(exc)
        if replacement is not None:
            raise replacement from replacement.__cause__
        return False

    def _close(self, exc: BaseException | None) -> BaseException | None:
        """Stop the deadline, note the outcome, record the call; the exception to raise in
        place of ``exc`` (None: ``exc`` itself, or nothing)."""
        outcome, deadline, d = self.outcome, self.deadline, self.dispatcher
        replacement: BaseException | None = None
        try:
            expired = deadline.end() if deadline is not None else False
            if exc is None:
                ok = self.upstream is not None and self.upstream.ok
                outcome.status = "ok" if ok else "error"
                outcome.kind = None if ok else "status"
                return None
            if isinstance(exc, TimeoutError) or (
                expired and isinstance(exc, asyncio.CancelledError)
            ):
                outcome.kind = "timeout"
                replacement = UpstreamTimeoutError(
                    f"model {self.spec.model}: no complete answer within {self.timeout:g} s"
                )
                replacement.__cause__ = exc if isinstance(exc, TimeoutError) else TimeoutError()
            if isinstance(exc, (asyncio.CancelledError, ConnectionResetError, GeneratorExit)):
                if replacement is None:
                    outcome.status, outcome.kind = "cancelled", "cancelled"
            elif isinstance(exc, OverloadedError):
                outcome.status, outcome.kind = "rejected", "overloaded"
            elif isinstance(exc, NoHealthyReplicaError):
                outcome.kind = "no_healthy_replica"
            elif isinstance(exc, UpstreamError) or replacement is not None:
                outcome.kind = outcome.kind or "broken"
            return replacement
        finally:
            d._leave()
            d._finish(
                self.spec, self.call_id, self.started_wall, self.started, self.upstream, outcome
            )


@dataclass(slots=True)
class _Outcome:
    status: str = "error"  # ok | error | cancelled | rejected
    kind: str | None = None  # error kind for metrics and logs


class Dispatcher:
    def __init__(
        self,
        config: RouterConfig,
        registry: ReplicaRegistry,
        recorder: TraceRecorder,
        metrics: RouterMetrics,
        policy: RoutingPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._registry = registry
        self._recorder = recorder
        self._metrics = metrics
        self._policy = policy
        self._clock = clock
        self._seq = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:12]
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self._pool: Http1Pool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the running loop, from ``start``
        self._log_calls = True
        self._active = 0
        self._idle = asyncio.Event()  # set when no call is active, while ``wait_idle`` waits
        self._idle_wanted = False
        self.draining = False
        self._flights: dict[Replica, set[_Flight]] = {}
        self._streaming = asyncio.Event()  # set while a stream may be in flight
        self._watchdog: asyncio.Task[None] | None = None
        registry.on_change = self._wake_all
        registry.on_eject = self.abort_replica

    def start(self, pool: Http1Pool) -> None:
        """Start with the connection pool for engine calls (``services.router.http1``)."""
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        # a debug line per call only when debug lines are written (asked once: the call costs)
        is_enabled_for = getattr(log, "is_enabled_for", None)
        self._log_calls = is_enabled_for is None or bool(is_enabled_for(logging.DEBUG))
        self._watchdog = asyncio.create_task(self._watch_streams(), name="router-idle-streams")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    # ------------------------------------------------------------- ending calls
    def abort_replica(self, replica: Replica, reason: str) -> None:
        """End every call in flight on ``replica`` (ejected) now."""
        for flight in list(self._flights.get(replica, ())):
            self._abort(flight, f"replica ejected ({reason})", "ejected")

    def _abort(self, flight: _Flight, reason: str, kind: str) -> None:
        if flight.reason is not None:
            return
        flight.reason = reason
        self._metrics.aborted.labels(flight.replica.model, kind).inc()
        log.warning(
            "call_aborted", model=flight.replica.model, replica=flight.replica.id, reason=reason
        )
        if flight.upstream is not None:
            flight.upstream.abort(reason)
        elif flight.task is not None:
            flight.task.cancel()  # waiting for the engine's answer: _open takes another replica

    async def _watch_streams(self) -> None:
        """End streams that sent nothing for ``stream_idle_timeout_s``. Each network read of a
        stream notes its time (``Upstream.read_at``), so the watchdog sleeps until the earliest
        moment one of the streams in flight could have been quiet that long (no periodic
        look), and while no stream is in flight until one is."""
        idle = self._config.stream_idle_timeout_s
        streaming = self._streaming
        while True:
            now = time.monotonic()
            first = math.inf
            for flights in list(self._flights.values()):
                for flight in list(flights):
                    upstream = flight.upstream
                    if upstream is None or not flight.stream or flight.reason is not None:
                        continue
                    expires = upstream.read_at + idle
                    if expires <= now:
                        self._abort(flight, f"stream sent nothing for {idle:g} s", "idle")
                    elif expires < first:
                        first = expires
            if first == math.inf:
                streaming.clear()
                await streaming.wait()  # ``_open`` sets it when a stream's answer begins
            else:
                await asyncio.sleep(first - now)

    def _board(self, replica: Replica, stream: bool) -> _Flight:
        flight = _Flight(replica, asyncio.current_task(self._loop), stream)
        self._flights.setdefault(replica, set()).add(flight)
        return flight

    def _land(self, flight: _Flight) -> None:
        flights = self._flights.get(flight.replica)
        if flights is not None:
            flights.discard(flight)
            if not flights:
                del self._flights[flight.replica]

    @property
    def active(self) -> int:
        """Calls admitted and not yet finished (queued ones included)."""
        return self._active

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is active; False when ``timeout_s`` passed first."""
        self._idle_wanted = True
        try:
            async with asyncio.timeout(timeout_s):
                while self._active:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            return False
        finally:
            self._idle_wanted = False
        return True

    def check_model(self, model: str) -> None:
        """``ModelNotFoundError`` unless ``model`` has a registered replica."""
        if not self._registry.replicas(model):
            raise ModelNotFoundError(f"The model `{model}` does not exist.")

    # --------------------------------------------------------------------- a call
    def call(self, spec: CallSpec) -> _Call:
        """Admit, route and open one upstream call (``async with``: the open ``Upstream``);
        record it on exit (see the module doc)."""
        return _Call(self, spec)

    async def fetch(self, spec: CallSpec) -> tuple[Upstream, bytes]:
        """A non-streamed call read whole. Its client has been sent nothing yet, so a call
        ended by the router (``UpstreamAbortedError``: replica ejected) is made once more."""
        for attempt in (1, 2):
            try:
                async with self.call(spec) as upstream:
                    return upstream, await upstream.read()
            except UpstreamAbortedError:
                if attempt == 2 or not self._has_candidate(spec.model, set()):
                    raise
                self._metrics.retries.labels(spec.model).inc()
        raise AssertionError("unreachable")

    async def _open(
        self, spec: CallSpec, info: CallInfo, started: float, call_id: str
    ) -> tuple[Upstream, _Flight]:
        pool = self._pool
        assert pool is not None, "dispatcher not started"
        excluded: set[str] = set()
        body = orjson.dumps(spec.body)
        while True:
            replica = await self._acquire(spec.model, info, excluded)
            flight = self._board(replica, spec.stream)
            try:
                response = await pool.post(replica.url, spec.path, body)
            except asyncio.CancelledError:
                self._land(flight)
                self._release(replica)
                task = asyncio.current_task()
                if flight.reason is None or task is None or task.uncancel() > 0:
                    raise  # the caller went away (or its deadline passed)
                # ended by the router (replica ejected) before any answer: another replica
                excluded.add(replica.id)
                if self._has_candidate(spec.model, excluded):
                    self._metrics.retries.labels(spec.model).inc()
                    continue
                raise UpstreamAbortedError(
                    f"model {spec.model}: replica {replica.id}: {flight.reason}"
                ) from None
            except Http1Error as exc:
                self._land(flight)
                self._release(replica)
                self._note_connect_failure(replica, exc)
                excluded.add(replica.id)
                if len(excluded) == 1 and self._has_candidate(spec.model, excluded):
                    self._metrics.retries.labels(spec.model).inc()
                    continue
                raise UpstreamError(
                    f"model {spec.model}: replica {replica.id} failed before answering: "
                    f"{type(exc).__name__}"
                ) from exc
            except BaseException:
                self._land(flight)
                self._release(replica)
                raise
            retry = len(excluded) == 0 and self._has_candidate(spec.model, {replica.id})
            if response.status >= 500 and retry:
                # A server error before any answer (an engine shutting down, or crashed on
                # this call): try another replica once. Generation has no side effects. The
                # replica is not ejected here, since a request can cause its own 500; the
                # health check decides.
                response.close()
                self._land(flight)
                self._release(replica)
                self._metrics.errors.labels(replica.model, "server_error").inc()
                self._metrics.replica_failures.labels(replica.model, replica.id).inc()
                self._metrics.retries.labels(spec.model).inc()
                excluded.add(replica.id)
                continue
            upstream = Upstream(replica, response, started, call_id)
            flight.upstream = upstream
            if spec.stream and not self._streaming.is_set():
                self._streaming.set()  # the idle watchdog watches it from now on
            if flight.reason is not None:  # ejected while the headers came in
                upstream.abort(flight.reason)
            return upstream, flight

    def _note_connect_failure(self, replica: Replica, exc: Exception) -> None:
        self._metrics.errors.labels(replica.model, "connect").inc()
        if isinstance(exc, Http1ConnectError):
            self._registry.report_failure(replica, str(exc))
        else:
            # A dropped connection may be a stale keep-alive one: count it, let the health
            # check decide whether the replica is gone.
            self._metrics.replica_failures.labels(replica.model, replica.id).inc()
        log.warning(
            "upstream_connect_failed",
            model=replica.model,
            replica=replica.id,
            error=type(exc).__name__,
        )

    # ------------------------------------------------------------------ admission
    def _candidates(self, model: str, excluded: set[str]) -> list[Replica]:
        replicas = self._registry.replicas(model)
        if not replicas:
            raise ModelNotFoundError(f"The model `{model}` does not exist.")
        healthy = [r for r in replicas if r.healthy and r.id not in excluded]
        if not healthy:
            raise NoHealthyReplicaError(f"model {model}: no healthy replica")
        return healthy

    def _has_candidate(self, model: str, excluded: set[str]) -> bool:
        return any(r.healthy and r.id not in excluded for r in self._registry.replicas(model))

    async def _acquire(self, model: str, info: CallInfo, excluded: set[str]) -> Replica:
        queue = self._queues.setdefault(model, deque())
        loop = self._loop
        assert loop is not None, "dispatcher not started"
        deadline = math.inf
        woken = False
        while True:
            limit = self._config.max_in_flight
            free = [r for r in self._candidates(model, excluded) if r.in_flight < limit]
            if free and (woken or not queue):
                replica = self._take(free, info)
                if queue and len(free) > 1:
                    self._wake(model)  # more than one slot was free: let the next one try
                return replica
            if not woken and len(queue) >= self._config.queue_size:
                raise OverloadedError(
                    f"model {model}: all replicas busy and {len(queue)} calls queued",
                    self._config.retry_after_s,
                )
            waiter: asyncio.Future[None] = loop.create_future()
            if woken:
                queue.appendleft(waiter)
            else:
                queue.append(waiter)
            self._metrics.queue_length.labels(model).set(len(queue))
            if deadline == math.inf:
                deadline = loop.time() + self._config.queue_timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                self._pass_turn(model, waiter)
                raise OverloadedError(
                    f"model {model}: no replica free within {self._config.queue_timeout_s:g} s",
                    self._config.retry_after_s,
                ) from None
            except asyncio.CancelledError:
                self._pass_turn(model, waiter)
                raise
            finally:
                if waiter in queue:
                    queue.remove(waiter)
                self._metrics.queue_length.labels(model).set(len(queue))
            woken = True

    def _pass_turn(self, model: str, waiter: asyncio.Future[None]) -> None:
        """A waiter leaves the queue: if it had been woken, wake the next one instead."""
        if waiter.done() and not waiter.cancelled():
            self._wake(model)

    def _take(self, free: list[Replica], info: CallInfo) -> Replica:
        if len(free) == 1:
            replica = free[0]  # what every policy chooses: it picks one of the candidates
        else:
            by_id = {r.id: r for r in free}
            loads = [ReplicaLoad(r.id, r.in_flight, r.endpoint.weight) for r in free]
            replica = by_id[self._policy.choose(loads, info)]
        replica.in_flight += 1
        return replica

    def _release(self, replica: Replica) -> None:
        replica.in_flight -= 1
        replica.activity += 1
        self._wake(replica.model)

    def _wake(self, model: str) -> None:
        """Wake the first waiter of ``model``'s queue (it re-checks for a free replica)."""
        queue = self._queues.get(model)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self, model: str) -> None:
        queue = self._queues.get(model)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _enter(self) -> None:
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        if self._active == 0 and self._idle_wanted:
            self._idle.set()

    # -------------------------------------------------------------------- record
    def _finish(
        self,
        spec: CallSpec,
        call_id: str,
        started_wall: float,
        started: float,
        upstream: Upstream | None,
        outcome: _Outcome,
    ) -> None:
        elapsed = time.monotonic() - started
        model = spec.model
        metrics = self._metrics
        metrics.requests.inc((model, spec.api, outcome.status))
        if outcome.kind is not None and outcome.status != "cancelled":
            metrics.errors.labels(model, outcome.kind).inc()
        if outcome.status != "rejected":
            metrics.latency.observe((model,), elapsed)
        ttft = upstream.ttft if upstream is not None and spec.stream else None
        if ttft is not None:
            ttft = min(ttft, elapsed)
            metrics.ttft.observe((model,), ttft)
        identity = spec.identity
        status: Status = (
            "ok"
            if outcome.status == "ok"
            else ("cancelled" if outcome.status == "cancelled" else "error")
        )
        self._recorder.record(
            TraceCall(
                workflow=identity.workflow or UNTAGGED_WORKFLOW,
                request_id=identity.request_id or call_id,
                call_id=call_id,
                model=model,
                start=started_wall,
                end=started_wall + elapsed,
                prompt_tokens=upstream.prompt_tokens if upstream else 0,
                completion_tokens=upstream.completion_tokens if upstream else 0,
                ttft=ttft,
                status=status,
                replica=upstream.replica.id if upstream else None,
            )
        )
        if outcome.status == "ok":
            if not self._log_calls:
                return
            log.debug(
                "call",
                model=model,
                workflow=identity.workflow,
                request_id=identity.request_id,
                call_id=call_id,
                replica=upstream.replica.id if upstream else None,
                seconds=round(elapsed, 6),
            )
        else:
            log.info(
                "call_failed",
                model=model,
                status=outcome.status,
                kind=outcome.kind,
                workflow=identity.workflow,
                request_id=identity.request_id,
                call_id=call_id,
                replica=upstream.replica.id if upstream else None,
            )
