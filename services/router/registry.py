"""Replicas per model: read from Redis, kept live, health-checked.

The registry mirrors the ``endpoints`` records of the store. It re-reads them when an
``endpoints_changed`` event arrives on the events channel and every ``refresh_s`` anyway (an event
lost while Redis restarts is caught by the next periodic read). While Redis is unreachable the
last known replicas keep serving, and when it comes back without them (restarted empty) they are
written back: see ``refresh``.

Health: a replica starts admitted. A call that cannot connect to it ejects it at once (passive
check, ``report_failure``); every ``health_interval_s`` each replica's ``GET /health`` is probed,
``eject_after`` failed probes in a row eject (one slow answer from a busy engine is not a dead
replica; nor is a probe that timed out while calls on the replica finished or streamed since
the last probe: the check adapts to load) and a passing one re-admits. ``on_change`` is called
whenever a replica becomes usable (added or re-admitted), so that queued calls can take it;
``on_eject`` when one is ejected, so that the calls in flight on it end at once (the
dispatcher's).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Sequence

import orjson
from redis.exceptions import RedisError

from services.core.errors import UnavailableError
from services.core.routing import Endpoint
from services.router.http1 import Http1Error, Http1Pool
from services.router.metrics import RouterMetrics
from services.router.ticks import first_tick, next_tick
from services.runtime.logging import get_logger
from services.runtime.store import Store

log = get_logger(__name__)

ENDPOINTS_EVENT = "endpoints_changed"


class Replica:
    """Runtime state of one registered endpoint; mutated only on the event loop."""

    __slots__ = (
        "activity",
        "endpoint",
        "failed_checks",
        "healthy",
        "id",
        "in_flight",
        "info",
        "model",
        "probed_activity",
        "url",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint  # never changes: a changed endpoint is a new Replica
        self.id = endpoint.replica
        self.model = endpoint.model
        self.url = endpoint.url
        self.in_flight = 0
        self.healthy = True
        self.failed_checks = 0  # consecutive failed health checks
        # calls finished and stream reads on this replica; a busy replica that answers calls
        # is not dead when its /health is slow
        self.activity = 0
        self.probed_activity = 0  # ``activity`` when the last health check ended
        # the engine's own ``/v1/models`` entry for the model (max_model_len, root, ...), read
        # once by a passing health check
        self.info: dict[str, object] | None = None


class ReplicaRegistry:
    def __init__(
        self,
        store: Store,
        metrics: RouterMetrics,
        *,
        refresh_s: float,
        health_interval_s: float,
        health_timeout_s: float,
        eject_after: int,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._refresh_s = refresh_s
        # The pause before watching again after Redis failed.
        self._read_timeout_s = min(refresh_s, 0.5)
        self._health_interval_s = health_interval_s
        self._health_timeout_s = health_timeout_s
        self._eject_after = eject_after
        self._models: dict[str, dict[str, Replica]] = {}
        self._sorted: dict[str, list[Replica]] = {}  # replicas(model), kept until apply
        self._epoch: str | None = None  # of the endpoint table last applied
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._pool: Http1Pool | None = None  # its own connections, kept alive between checks
        self.on_change: Callable[[str], None] = lambda model: None
        # called when a replica is ejected, so that the calls in flight on it end at once
        self.on_eject: Callable[[Replica, str], None] = lambda replica, reason: None
        metrics.in_flight.source = self._in_flight

    def _in_flight(self) -> list[tuple[tuple[str, str], float]]:
        """Calls in flight per registered replica (the ``scepsy_router_in_flight`` gauge)."""
        return [
            ((model, rid), float(replica.in_flight))
            for model, replicas in list(self._models.items())
            for rid, replica in list(replicas.items())
        ]

    # ------------------------------------------------------------------ queries
    def models(self) -> list[str]:
        """Models with at least one registered replica, sorted."""
        return sorted(m for m, replicas in self._models.items() if replicas)

    def replicas(self, model: str) -> list[Replica]:
        """All registered replicas of ``model`` (healthy or not), sorted by id (the same list
        until the registry changes: not to be modified)."""
        replicas = self._sorted.get(model)
        if replicas is None:
            replicas = sorted(self._models.get(model, {}).values(), key=lambda r: r.id)
            self._sorted[model] = replicas
        return replicas

    def is_registered(self, replica: Replica) -> bool:
        """True while ``replica`` (this very object) is in the registry."""
        return self._models.get(replica.model, {}).get(replica.id) is replica

    # ------------------------------------------------------------------ updates
    def apply(self, endpoints: Sequence[Endpoint]) -> None:
        """Make the registry hold exactly ``endpoints``; replicas whose endpoint is unchanged
        keep their state (in-flight count, health)."""
        self._sorted.clear()
        wanted: dict[str, dict[str, Endpoint]] = {}
        for endpoint in endpoints:
            wanted.setdefault(endpoint.model, {})[endpoint.replica] = endpoint
        for model in list(self._models):
            for rid in list(self._models[model]):
                if rid not in wanted.get(model, {}):
                    del self._models[model][rid]
                    self._metrics.forget_replica(model, rid)
                    log.info("replica_removed", model=model, replica=rid)
            if not self._models[model]:
                del self._models[model]
        for model, entries in wanted.items():
            current = self._models.setdefault(model, {})
            added = False
            for rid, endpoint in entries.items():
                old = current.get(rid)
                if old is not None and old.endpoint == endpoint:
                    continue
                current[rid] = Replica(endpoint)
                self._metrics.replica_healthy.labels(model, rid).set(1)
                log.info("replica_added", model=model, replica=rid, url=endpoint.url)
                added = True
            if added:
                self.on_change(model)

    async def refresh(self) -> None:
        """Re-read the endpoints from Redis; ``UnavailableError`` when it is unreachable.

        The store's table carries an epoch that never changes while the table exists. A table
        without an epoch, or with another one than last read, means the store lost its data
        (a Redis restarted empty, perhaps re-filled in part since): then the replicas this
        router knew are written back where their ids have no record (``restore_endpoints``; a
        newer registration wins) before the table is applied. So only an explicit removal
        (``remove_endpoint``) takes a replica away, never a key that is merely absent."""
        table = await self._store.read_endpoints()
        lost = table.epoch is None or (self._epoch is not None and table.epoch != self._epoch)
        known = [r.endpoint for replicas in self._models.values() for r in replicas.values()]
        if lost and known:
            log.warning(
                "endpoint_table_lost",
                epoch_was=self._epoch,
                epoch_now=table.epoch,
                restoring=len(known),
            )
            self._metrics.endpoint_restores.inc()
            await self._store.restore_endpoints(known)
            table = await self._store.read_endpoints()
        self._epoch = table.epoch
        self.apply(table.endpoints)

    def report_failure(self, replica: Replica, reason: str) -> None:
        """A call could not reach ``replica``: eject it until a health check passes."""
        if not self.is_registered(replica):
            return
        self._metrics.replica_failures.labels(replica.model, replica.id).inc()
        self._set_health(replica, False, reason)

    def _set_health(self, replica: Replica, healthy: bool, reason: str) -> None:
        if replica.healthy == healthy:
            return
        replica.healthy = healthy
        self._metrics.replica_healthy.labels(replica.model, replica.id).set(int(healthy))
        if healthy:
            log.info("replica_readmitted", model=replica.model, replica=replica.id)
            self.on_change(replica.model)
        else:
            log.warning("replica_ejected", model=replica.model, replica=replica.id, reason=reason)
            self.on_eject(replica, reason)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Read the replicas once (Redis may be down: then start empty and keep trying), then
        watch for changes and probe health in the background (on the lean HTTP/1.1 client of
        ``services.router.http1``, over connections kept alive between checks)."""
        self._pool = Http1Pool(self._health_timeout_s, keepalive_s=30.0)
        try:
            await self.refresh()
        except UnavailableError as exc:
            log.warning("endpoints_unreadable", error=str(exc))
        self._tasks = [
            asyncio.create_task(self._watch(), name="router-endpoints-watch"),
            asyncio.create_task(self._probe_forever(), name="router-health-checks"),
        ]

    async def stop(self) -> None:
        """Stop watching and probing. The probes sleep on the stop event; the watch, which may
        wait on pub/sub for up to ``refresh_s``, is also cancelled. A cancellation that races
        with a timeout (Python 3.11) can be lost, but the watch checks the stop event after
        each read, so it ends after at most one more wait."""
        self._stopping.set()
        if self._tasks:
            self._tasks[0].cancel()  # the watch
            limit = max(self._refresh_s, self._health_timeout_s) + 2.0
            done, pending = await asyncio.wait(self._tasks, timeout=limit)
            for task in pending:
                task.cancel()
                log.warning("registry_task_stuck", task=task.get_name())
            for task in done:
                if not task.cancelled():
                    task.result()
        self._tasks = []
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def _watch(self) -> None:
        """Refresh on each ``endpoints_changed`` event and on each tick of ``refresh_s``
        (``ticks``): the pub/sub read waits until the next refresh is due (no polling in
        between); ``stop`` cancels it."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                async with self._store.subscribe() as pubsub:
                    await self.refresh()
                    due = next_tick(loop.time(), self._refresh_s)
                    while not self._stopping.is_set():
                        wait = due - loop.time()
                        message = None
                        if wait > 0:
                            message = await pubsub.get_message(
                                ignore_subscribe_messages=True, timeout=wait
                            )
                        now = loop.time()
                        if now >= due or (message and _is_endpoints_event(message.get("data"))):
                            await self.refresh()
                            due = next_tick(loop.time(), self._refresh_s)
            except (UnavailableError, RedisError, OSError) as exc:
                if self._stopping.is_set():
                    return
                log.warning("endpoints_watch_failed", error=str(exc))
                await self._sleep(self._read_timeout_s)

    async def _probe_forever(self) -> None:
        """Probe every replica on each tick of ``health_interval_s`` (``ticks``), the first
        one at least an interval after the start (a tick can be due a moment after it)."""
        loop = asyncio.get_running_loop()
        interval = self._health_interval_s
        due = first_tick(loop.time(), interval)
        while not await self._sleep(due - loop.time()):
            replicas = [r for model in self.models() for r in self.replicas(model)]
            await asyncio.gather(*(self.probe(r) for r in replicas))
            due = next_tick(loop.time(), interval)

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until stopping; True when stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def probe(self, replica: Replica) -> bool:
        """One ``GET {url}/health``: re-admit on success, eject on the ``eject_after``-th failure
        in a row; True when this check passed."""
        assert self._pool is not None, "registry not started"
        timed_out = False
        try:
            async with asyncio.timeout(self._health_timeout_s):
                status, _ = await self._pool.get(replica.url, "/health")
            healthy = status == 200
        except TimeoutError:
            healthy, timed_out = False, True
        except (Http1Error, OSError):
            healthy = False
        busy = replica.activity != replica.probed_activity
        replica.probed_activity = replica.activity
        if healthy:
            replica.failed_checks = 0
            self._set_health(replica, True, "health check passed")
            if replica.info is None:
                await self._read_info(replica)
            return True
        if timed_out and busy and replica.healthy:
            # Slow, but calls on it finished or streamed since the last check: a loaded
            # replica (or a loaded router), not a dead one. Not a miss.
            return False
        replica.failed_checks += 1
        if replica.healthy and replica.failed_checks >= self._eject_after:
            self._metrics.replica_failures.labels(replica.model, replica.id).inc()
            self._set_health(
                replica, False, f"{replica.failed_checks} health checks failed in a row"
            )
        return False

    def model_info(self, model: str) -> dict[str, object] | None:
        """The engine's ``/v1/models`` entry of ``model``, as one of its replicas gave it."""
        for replica in self.replicas(model):
            if replica.info is not None:
                return replica.info
        return None

    async def _read_info(self, replica: Replica) -> None:
        assert self._pool is not None
        try:
            async with asyncio.timeout(self._health_timeout_s):
                status, body = await self._pool.get(replica.url, "/v1/models")
            doc = orjson.loads(body) if status == 200 else None
        except (Http1Error, TimeoutError, OSError, orjson.JSONDecodeError):
            return  # asked again at the next passing check
        data = doc.get("data") if isinstance(doc, dict) else None
        for entry in data if isinstance(data, list) else ():
            if isinstance(entry, dict) and entry.get("id") == replica.model:
                replica.info = entry
                return
        replica.info = {}  # the engine does not list it: nothing to add


def _is_endpoints_event(data: object) -> bool:
    try:
        event = json.loads(data)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return isinstance(event, dict) and event.get("event") == ENDPOINTS_EVENT
