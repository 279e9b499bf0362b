"""The Redis store: every piece of shared state goes through here (redis-py asyncio).

Each call has a deadline (the client's socket timeouts); connection failures and timeouts surface
as ``UnavailableError`` naming the Redis URL, so callers can keep serving and retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protos.scepsy.v1 import planner_pb2 as planner_pb
from protos.scepsy.v1 import types_pb2 as pb
from services.core.cluster.inventory import NodeInventory
from services.core.errors import ConfigError, InvalidInputError, UnavailableError
from services.core.perf.profile import Profile, ProfileKey
from services.core.planning.plan import Plan
from services.core.routing import Endpoint
from services.runtime.convert import (
    node_from_pb,
    node_to_pb,
    plan_from_pb,
    plan_to_pb,
    profile_from_pb,
    profile_to_pb,
)
from services.runtime.keys import Keys
from services.runtime.redis_url import checked, redact

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A running service process as it announces itself (``services.runtime.registration``).

    ``extra`` holds what one kind of service adds, e.g. the router's ``http_address`` or an
    agent's ``node``.
    """

    name: str  # the kind of service: "planner", "router", "agent", ...
    address: str  # gRPC host:port
    metrics_address: str  # host:port of GET /metrics
    pid: int
    host: str  # the host name of the machine it runs on
    started_at: float  # unix seconds
    heartbeat_at: float  # unix seconds of the last refresh
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Unique among live processes: one process registers once."""
        return f"{self.name}@{self.host}:{self.pid}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> ServiceRecord:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) when ``raw`` is not a record."""
        doc = json.loads(raw)
        return cls(
            name=str(doc["name"]),
            address=str(doc["address"]),
            metrics_address=str(doc["metrics_address"]),
            pid=int(doc["pid"]),
            host=str(doc["host"]),
            started_at=float(doc["started_at"]),
            heartbeat_at=float(doc["heartbeat_at"]),
            extra={str(k): str(v) for k, v in dict(doc.get("extra") or {}).items()},
        )


class Store:
    def __init__(self, client: aioredis.Redis, url: str, keys: Keys | None = None) -> None:
        self._r = client
        self.url = redact(url)  # as shown in errors: without the password
        self.keys = keys or Keys()
        self._also_close: list[aioredis.Redis] = []  # a sentinel URL's sentinel clients

    @classmethod
    def connect(
        cls,
        url: str,
        timeout_s: float = 2.0,
        namespace: str = "scepsy",
        password: str | None = None,
    ) -> Store:
        """A store on ``url``; ``password`` (e.g. from a password file) is used when the URL
        carries none. A call that finds its pooled connection closed (Redis restarted) is tried
        once more on a new one, so the first call after a restart succeeds."""
        extra: dict[str, Any] = {"password": password} if password else {}
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "health_check_interval": 30,
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError],
        }
        if "+sentinel://" in checked(url):
            master, sentinels = _sentinel_master(url, options, password)
            store = cls(master, url, Keys(namespace))
            store._also_close = sentinels
            return store
        client = aioredis.Redis.from_url(url, **options, **extra)
        return cls(client, url, Keys(namespace))

    async def close(self) -> None:
        await self._r.aclose()
        for client in self._also_close:
            await client.aclose()

    async def ping(self) -> bool:
        return bool(await self._call(self._r.ping))

    # ------------------------------------------------------------------ nodes
    async def put_node(self, node: NodeInventory, ttl_s: float) -> bool:
        """Register or refresh a node; its record expires ``ttl_s`` after the last put.

        Returns True when the node was not registered before (a join), False on a heartbeat.
        """
        data = node_to_pb(node).SerializeToString()

        async def put() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.node(node.name), data, px=int(ttl_s * 1000))
                pipe.sadd(self.keys.nodes, node.name)
                _, added = await pipe.execute()
            return bool(added)

        return await self._call(put)

    async def list_nodes(self) -> list[NodeInventory]:
        """Live nodes sorted by name; names whose record expired are pruned from the index."""

        async def read() -> list[NodeInventory]:
            members = await self._r.smembers(self.keys.nodes)
            names = sorted(_text(n) for n in members)
            if not names:
                return []
            blobs = await self._r.mget([self.keys.node(n) for n in names])
            nodes, gone = [], []
            for name, blob in zip(names, blobs, strict=True):
                if blob is None:
                    gone.append(name)
                else:
                    nodes.append(node_from_pb(pb.Node.FromString(_bytes(blob))))
            if gone:
                await self._r.srem(self.keys.nodes, *gone)
            return nodes

        return await self._call(read)

    async def get_node(self, name: str) -> NodeInventory | None:
        blob = await self._call(lambda: self._r.get(self.keys.node(name)))
        return None if blob is None else node_from_pb(pb.Node.FromString(_bytes(blob)))

    async def remove_node(self, name: str) -> None:
        async def remove() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.node(name))
                pipe.srem(self.keys.nodes, name)
                await pipe.execute()

        await self._call(remove)

    # ------------------------------------------------------------------ profiles
    async def put_profile(self, profile: Profile) -> None:
        """Store a profile under its key; a newer measurement of the same key replaces it."""
        data = profile_to_pb(profile).SerializeToString()
        await self._call(lambda: self._r.set(self.keys.profile(profile.key.redis_field()), data))

    async def get_profile(self, key: ProfileKey) -> Profile | None:
        blob = await self._call(lambda: self._r.get(self.keys.profile(key.redis_field())))
        return None if blob is None else profile_from_pb(pb.Profile.FromString(_bytes(blob)))

    async def put_measured_profile(
        self,
        profile: Profile,
        measured: Sequence[tuple[float, int, int]],
        method: Mapping[str, Any],
    ) -> None:
        """Store a measured profile: as ``put_profile``, with each point's (throughput calls/s,
        calls, errors) and how it was measured (a JSON object, ``method_json``)."""
        if len(measured) != len(profile.points):
            raise InvalidInputError(
                f"measured: {len(measured)} entries for {len(profile.points)} profile points"
            )
        msg = profile_to_pb(profile)
        for point, (throughput, calls, errors) in zip(msg.points, measured, strict=True):
            point.throughput_rps, point.calls, point.errors = throughput, calls, errors
        msg.method_json = json.dumps(dict(method), sort_keys=True)
        data = msg.SerializeToString()
        await self._call(lambda: self._r.set(self.keys.profile(profile.key.redis_field()), data))

    async def get_profile_measurement(self, key: ProfileKey) -> dict[str, Any] | None:
        """How the profile under ``key`` was measured: ``{"method": {...}, "points": [{"rate",
        "throughput_rps", "calls", "errors"}, ...]}`` (``method`` is empty for a computed
        profile); None when no profile is stored under ``key``."""
        blob = await self._call(lambda: self._r.get(self.keys.profile(key.redis_field())))
        if blob is None:
            return None
        msg = pb.Profile.FromString(_bytes(blob))
        return {
            "method": json.loads(msg.method_json) if msg.method_json else {},
            "points": [
                {
                    "rate": p.rate,
                    "throughput_rps": p.throughput_rps,
                    "calls": p.calls,
                    "errors": p.errors,
                }
                for p in msg.points
            ],
        }

    # -------------------------------------------------------------- endpoints
    async def put_endpoint(self, endpoint: Endpoint) -> None:
        """Register (or replace) one engine replica of a model; announces ``endpoints_changed``.
        The first write to an empty store also gives the endpoint table its epoch."""
        value = json.dumps({"url": endpoint.url, "weight": endpoint.weight})

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.endpoints(endpoint.model), endpoint.replica, value)
                pipe.sadd(self.keys.endpoint_models, endpoint.model)
                pipe.set(self.keys.endpoints_epoch, _new_epoch(), nx=True)
                await pipe.execute()
            await self._publish({"event": "endpoints_changed", "model": endpoint.model})

        await self._call(put)

    async def remove_endpoint(self, model: str, replica: str) -> bool:
        """Deregister one replica; True when it was registered. The model leaves the index with
        its last replica."""

        async def remove() -> bool:
            # the table keeps its epoch when it becomes empty: an explicit "no replicas"
            await self._r.set(self.keys.endpoints_epoch, _new_epoch(), nx=True)
            removed = await self._r.hdel(self.keys.endpoints(model), replica)
            if not await self._r.exists(self.keys.endpoints(model)):
                await self._r.srem(self.keys.endpoint_models, model)
            if removed:
                await self._publish({"event": "endpoints_changed", "model": model})
            return bool(removed)

        return await self._call(remove)

    async def read_endpoints(self) -> EndpointTable:
        """The endpoint table with its epoch (None: the store has no table, e.g. a Redis that
        came back without its data), in one round trip: a script reads the epoch and every
        model's replicas together, so the table is exactly the one of that epoch (a router reads
        it every few seconds)."""
        keys = self.keys
        reply = await self._script(
            _READ_ENDPOINTS, [keys.endpoints_epoch, keys.endpoint_models], [keys.endpoints("")]
        )
        epoch, rest = reply[0], reply[1:]
        tables = {_text(rest[i]): rest[i + 1] or [] for i in range(0, len(rest) - 1, 2)}
        endpoints = _endpoints_of((model, _pairs(tables[model])) for model in sorted(tables))
        return EndpointTable(None if epoch is None else _text(epoch), tuple(endpoints))

    async def restore_endpoints(self, endpoints: Sequence[Endpoint]) -> None:
        """Write back replicas a reader knew after the store lost them: each one only where its
        replica id has no record (a newer registration wins), then announce
        ``endpoints_changed``. The table gets an epoch if it has none."""
        if not endpoints:
            return

        async def restore() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                for e in endpoints:
                    value = json.dumps({"url": e.url, "weight": e.weight})
                    pipe.hsetnx(self.keys.endpoints(e.model), e.replica, value)
                    pipe.sadd(self.keys.endpoint_models, e.model)
                pipe.set(self.keys.endpoints_epoch, _new_epoch(), nx=True)
                await pipe.execute()
            for model in sorted({e.model for e in endpoints}):
                await self._publish({"event": "endpoints_changed", "model": model})

        await self._call(restore)

    async def list_endpoints(self) -> list[Endpoint]:
        """Every registered replica, sorted by (model, replica). Entries that do not parse are
        left out: a bad write must not take the whole routing table down."""

        async def read() -> list[Endpoint]:
            models = sorted(_text(m) for m in await self._r.smembers(self.keys.endpoint_models))
            tables = [(m, await self._r.hgetall(self.keys.endpoints(m))) for m in models]
            return _endpoints_of((m, entries.items()) for m, entries in tables)

        return await self._call(read)

    # ------------------------------------------------------------------ trace
    async def append_trace(self, lines: Sequence[str | bytes], max_len: int) -> int:
        """Append trace JSON lines to the capped trace stream (one round trip, one script for
        the whole batch, approximate cap); returns the stream's length after (a writer can tell
        that records vanished)."""
        if not lines:
            return await self.trace_length()
        return int(await self._script(_APPEND_TRACE, [self.keys.trace], [max_len, *lines]))

    async def read_trace(self, after: str = "", count: int = 1000) -> list[tuple[str, str]]:
        """Up to ``count`` (entry id, JSON line) pairs of the trace stream, oldest first, after
        the entry id ``after`` (from the start when empty)."""
        start = f"({after}" if after else "-"
        entries = await self._call(
            lambda: self._r.xrange(self.keys.trace, min=start, max="+", count=count)
        )
        out: list[tuple[str, str]] = []
        for entry_id, fields in entries or []:
            line = (fields or {}).get(b"call", b"")
            out.append((_text(entry_id or b""), _text(line or b"")))
        return out

    async def trace_length(self) -> int:
        return int(await self._call(lambda: self._r.xlen(self.keys.trace)))

    # ------------------------------------------------------------------ plans
    async def put_plan(self, plan: Plan, *, current: bool = True) -> bool:
        """Store ``plan`` under its id and (unless ``current`` is False) make it current, in one
        MULTI/EXEC transaction.

        A plan is immutable: when its id (a content hash) is already stored, the stored document
        and its creation time stay, and only the current pointer moves to it. Making it current
        announces ``plan_changed``. Returns True when the plan was new.
        """
        data = plan_to_pb(plan).SerializeToString()

        async def put() -> bool:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.plan(plan.id), data, nx=True)
                pipe.zadd(self.keys.plans, {plan.id: plan.created_at}, nx=True)
                if current:
                    pipe.set(self.keys.current_plan, plan.id)
                added = (await pipe.execute())[0]
            if current:
                await self._publish({"event": "plan_changed", "plan": plan.id})
            return bool(added)

        return await self._call(put)

    async def set_current_plan(self, plan_id: str) -> bool:
        """Make the stored plan ``plan_id`` current (announcing ``plan_changed``); False when no
        such plan is stored (nothing changes then)."""

        async def swap() -> bool:
            exists = await self._r.exists(self.keys.plan(plan_id))
            if not exists:
                return False
            await self._r.set(self.keys.current_plan, plan_id)
            await self._publish({"event": "plan_changed", "plan": plan_id})
            return True

        return await self._call(swap)

    async def get_plan(self, plan_id: str) -> Plan | None:
        blob = await self._call(lambda: self._r.get(self.keys.plan(plan_id)))
        return None if blob is None else plan_from_pb(planner_pb.Plan.FromString(_bytes(blob)))

    async def current_plan_id(self) -> str | None:
        value = await self._call(lambda: self._r.get(self.keys.current_plan))
        return None if value is None else _text(value)

    async def get_current_plan(self) -> Plan | None:
        """The current plan (plans never change, so reading the pointer first is consistent)."""
        plan_id = await self.current_plan_id()
        return None if plan_id is None else await self.get_plan(plan_id)

    async def list_plans(self, limit: int = 10) -> list[tuple[str, float]]:
        """(plan id, created at) of the ``limit`` most recently created plans, newest first."""
        entries: list[Any] = await self._call(
            lambda: self._r.zrevrange(self.keys.plans, 0, limit - 1, withscores=True)
        )
        return [(_text(plan_id), float(score)) for plan_id, score in entries]

    # ---------------------------------------------------------------- engines
    async def put_engines(self, node: str, engines: Sequence[pb.Engine], ttl_s: float) -> None:
        """Replace the engine records of ``node`` (its agent's view), expiring ``ttl_s`` after
        the last put (a dead agent's engines vanish with its node)."""
        key = self.keys.engines(node)

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                if engines:
                    pipe.hset(key, mapping={e.id: e.SerializeToString() for e in engines})
                    pipe.pexpire(key, int(ttl_s * 1000))
                pipe.sadd(self.keys.engine_nodes, node)
                await pipe.execute()

        await self._call(put)

    async def remove_engines(self, node: str) -> None:
        async def remove() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.engines(node))
                pipe.srem(self.keys.engine_nodes, node)
                await pipe.execute()

        await self._call(remove)

    async def list_engines(self, node: str | None = None) -> list[pb.Engine]:
        """The engine records of every node (or of ``node``), sorted by (node, id). Records
        that do not parse are left out."""

        async def read() -> list[pb.Engine]:
            if node is not None:
                nodes = [node]
            else:
                nodes = sorted(_text(n) for n in await self._r.smembers(self.keys.engine_nodes))
            out: list[pb.Engine] = []
            for name in nodes:
                entries = await self._r.hgetall(self.keys.engines(name))
                if not entries and node is None:
                    await self._r.srem(self.keys.engine_nodes, name)
                for _, blob in sorted(entries.items()):
                    try:
                        out.append(pb.Engine.FromString(_bytes(blob)))
                    except DecodeError:
                        continue
            return out

        return await self._call(read)

    # --------------------------------------------------------------- services
    async def put_service(self, record: ServiceRecord, ttl_s: float) -> None:
        """Register or refresh a service process; its record expires ``ttl_s`` after the last
        put."""

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.service(record.id), record.to_json(), px=int(ttl_s * 1000))
                pipe.sadd(self.keys.services, record.id)
                await pipe.execute()

        await self._call(put)

    async def list_services(self) -> list[ServiceRecord]:
        """Live service processes sorted by (name, id); ids whose record expired are pruned from
        the index, and records that do not parse are left out."""

        async def read() -> list[ServiceRecord]:
            ids = sorted(_text(i) for i in await self._r.smembers(self.keys.services))
            if not ids:
                return []
            blobs = await self._r.mget([self.keys.service(i) for i in ids])
            records, gone = [], []
            for service_id, blob in zip(ids, blobs, strict=True):
                if blob is None:
                    gone.append(service_id)
                    continue
                try:
                    records.append(ServiceRecord.from_json(_text(blob)))
                except (ValueError, KeyError, TypeError):
                    continue
            if gone:
                await self._r.srem(self.keys.services, *gone)
            return sorted(records, key=lambda r: (r.name, r.id))

        return await self._call(read)

    async def remove_service(self, service_id: str) -> None:
        async def remove() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.service(service_id))
                pipe.srem(self.keys.services, service_id)
                await pipe.execute()

        await self._call(remove)

    # ------------------------------------------------------------------ events
    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[aioredis.client.PubSub]:
        pubsub = self._r.pubsub()
        await self._call(lambda: pubsub.subscribe(self.keys.events))
        try:
            yield pubsub
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _publish(self, event: dict[str, Any]) -> None:
        await self._r.publish(self.keys.events, json.dumps(event))

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc

    async def _script(
        self, script: str, keys: Sequence[str], args: Sequence[str | bytes | int]
    ) -> Any:
        """Run a Lua ``script`` by its digest (``EVALSHA``), loading it first when Redis does
        not know it (a new or restarted Redis): one round trip in the usual case."""
        digest = _SCRIPT_DIGESTS.get(script)
        if digest is None:
            digest = _SCRIPT_DIGESTS[script] = hashlib.sha1(script.encode()).hexdigest()

        async def run() -> Any:
            try:
                return await self._r.evalsha(digest, len(keys), *keys, *args)
            except NoScriptError:
                await self._r.script_load(script)
                return await self._r.evalsha(digest, len(keys), *keys, *args)

        return await self._call(run)

    # ------------------------------------------------------------ control loop
    # Keys, beside the schema of services.runtime.keys: {ns}:v1:loop:control (hash: paused "1"
    # or "0", pinned plan id, updated_at), {ns}:v1:loop:decisions (list of JSON decisions,
    # newest first, capped), {ns}:v1:loop:status (string with TTL: JSON of the loop's last
    # tick), {ns}:v1:loop:leader (string with TTL: the planner process that runs the loop).
    _LEASE = """
    if redis.call('get', KEYS[1]) == ARGV[1] then
      redis.call('pexpire', KEYS[1], ARGV[2]) return 1
    end
    if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
    return 0
    """
    _UNLEASE = """
    if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
    return 0
    """

    def _loop_key(self, name: str) -> str:
        from services.runtime.keys import SCHEMA

        return f"{self.keys.namespace}:{SCHEMA}:loop:{name}"

    async def loop_control(self) -> dict[str, Any]:
        """The operator's settings of the control loop: ``{"paused": bool, "pinned": plan id or
        None, "updated_at": unix seconds or None}``."""
        raw = await self._call(lambda: self._r.hgetall(self._loop_key("control")))
        fields = {_text(k): _text(v) for k, v in (raw or {}).items()}
        updated = fields.get("updated_at")
        return {
            "paused": fields.get("paused") == "1",
            "pinned": fields.get("pinned") or None,
            "updated_at": float(updated) if updated else None,
        }

    async def set_loop_paused(self, paused: bool, now: float) -> None:
        key = self._loop_key("control")

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(key, "paused", "1" if paused else "0")
                pipe.hset(key, "updated_at", repr(now))
                await pipe.execute()

        await self._call(put)

    async def set_loop_pinned(self, plan_id: str | None, now: float) -> None:
        """Pin ``plan_id`` (the loop never replaces it), or unpin with None."""
        key = self._loop_key("control")

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                if plan_id:
                    pipe.hset(key, "pinned", plan_id)
                else:
                    pipe.hdel(key, "pinned")
                pipe.hset(key, "updated_at", repr(now))
                await pipe.execute()

        await self._call(put)

    async def put_loop_decision(self, decision: Mapping[str, Any], cap: int) -> None:
        """Record one decision (a JSON object); only the ``cap`` newest are kept."""
        key, line = self._loop_key("decisions"), json.dumps(decision)

        async def put() -> None:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.lpush(key, line)
                pipe.ltrim(key, 0, cap - 1)
                await pipe.execute()

        await self._call(put)

    async def loop_decisions(self, limit: int = 20) -> list[dict[str, Any]]:
        """The ``limit`` newest decisions, newest first (entries that do not parse are left
        out)."""
        key = self._loop_key("decisions")
        raw = await self._call(lambda: self._r.lrange(key, 0, max(0, limit - 1)))
        out: list[dict[str, Any]] = []
        for entry in raw or []:
            try:
                doc = json.loads(_text(entry))
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out

    async def put_loop_status(self, status: Mapping[str, Any], ttl_s: float) -> None:
        """The loop's view at its last tick; it expires ``ttl_s`` after (a stopped loop shows
        no status)."""
        key, text = self._loop_key("status"), json.dumps(status)
        await self._call(lambda: self._r.set(key, text, px=int(ttl_s * 1000)))

    async def loop_status(self) -> dict[str, Any] | None:
        raw = await self._call(lambda: self._r.get(self._loop_key("status")))
        if raw is None:
            return None
        try:
            doc = json.loads(_text(raw))
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    async def hold_loop_lease(self, holder: str, ttl_s: float) -> bool:
        """Take or keep the loop's lease for ``holder`` for ``ttl_s``: True when ``holder`` now
        runs the loop (one planner process does, however many run)."""
        key, ms = self._loop_key("leader"), int(ttl_s * 1000)
        got = await self._call(lambda: self._r.eval(self._LEASE, 1, key, holder, str(ms)))
        return bool(got)

    async def release_loop_lease(self, holder: str) -> None:
        key = self._loop_key("leader")
        await self._call(lambda: self._r.eval(self._UNLEASE, 1, key, holder))


@dataclass(frozen=True, slots=True)
class EndpointTable:
    """The registered replicas and the table's epoch (``Store.read_endpoints``)."""

    epoch: str | None
    endpoints: tuple[Endpoint, ...]


def _sentinel_master(
    url: str, options: dict[str, Any], password: str | None
) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """The master behind the sentinels of a ``redis+sentinel://`` URL (``redis_url``); redis-py
    asks the sentinels again for the master after a failover."""
    from urllib.parse import parse_qs, unquote, urlsplit

    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, secret = userinfo.partition(":")
    sentinels: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"redis_url: sentinel {host!r} is not host:port in {redact(url)!r}")
        sentinels.append((name.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(f"redis_url: a sentinel URL ends with /SERVICE[/DB], got {redact(url)!r}")
    query = parse_qs(parts.query)
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": options["socket_timeout"]}
    if "sentinel_password" in query:
        sentinel_kwargs["password"] = query["sentinel_password"][0]
    master_options = dict(options)
    if parts.scheme.startswith("rediss"):
        master_options["ssl"] = True
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        sentinels, sentinel_kwargs=sentinel_kwargs, **master_options
    )
    master: aioredis.Redis = sentinel.master_for(
        path[0],
        redis_class=aioredis.Redis,
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(secret) or password or None,
    )
    return master, list(sentinel.sentinels)


def _new_epoch() -> str:
    return uuid.uuid4().hex


# The endpoint table in one round trip (``Store.read_endpoints``): KEYS the epoch and the
# models' set, ARGV[1] the prefix of a model's hash; the epoch, then each model and its hash.
_READ_ENDPOINTS = """
local out = {redis.call('GET', KEYS[1])}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  out[#out + 1] = model
  out[#out + 1] = redis.call('HGETALL', ARGV[1] .. model)
end
return out
"""

# A batch of trace lines (``Store.append_trace``): KEYS the stream, ARGV[1] its approximate cap,
# the rest one line each; returns the stream's length after.
_APPEND_TRACE = """
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'call', ARGV[i])
end
return redis.call('XLEN', KEYS[1])
"""

_SCRIPT_DIGESTS: dict[str, str] = {}


def _pairs(flat: Sequence[bytes | str]) -> list[tuple[bytes | str, bytes | str]]:
    """``[k1, v1, k2, v2, ...]`` (a hash as a script returns it) as pairs."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]


def _endpoints_of(
    tables: Iterable[tuple[str, Iterable[tuple[bytes | str, bytes | str]]]],
) -> list[Endpoint]:
    """The endpoints of (model, (replica, JSON value) pairs) tables, sorted by replica within
    each model; entries that do not parse are left out."""
    out: list[Endpoint] = []
    for model, entries in tables:
        for replica, raw in sorted((_text(k), _text(v)) for k, v in entries):
            endpoint = _endpoint(model, replica, raw)
            if endpoint is not None:
                out.append(endpoint)
    return out


def _endpoint(model: str, replica: str, raw: str) -> Endpoint | None:
    try:
        value = json.loads(raw)
        return Endpoint(model, replica, str(value["url"]), float(value.get("weight", 1.0)))
    except (ValueError, TypeError, KeyError, AttributeError, InvalidInputError):
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def profiles_from_thread(
    store: Store, loop: asyncio.AbstractEventLoop, timeout_s: float
) -> tuple[Callable[[ProfileKey], Profile | None], Callable[[Profile], None]]:
    """Blocking ``get`` and ``put`` of profiles for code running in a worker thread (the plan
    path's ``StoreFirst``): each call hops onto ``loop``, where ``store`` lives, with a deadline."""

    def get(key: ProfileKey) -> Profile | None:
        return asyncio.run_coroutine_threadsafe(store.get_profile(key), loop).result(timeout_s)

    def put(profile: Profile) -> None:
        asyncio.run_coroutine_threadsafe(store.put_profile(profile), loop).result(timeout_s)

    return get, put
