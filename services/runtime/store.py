"""The Redis store: every piece of shared state goes through here (redis-py asyncio).

Each call has a deadline (the client's socket timeouts); connection failures and timeouts surface
as ``UnavailableError`` naming the Redis URL, so callers can keep serving and retry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protos.scepsy.v1 import types_pb2 as pb
from services.core.errors import UnavailableError
from services.core.inventory import NodeInventory
from services.core.profile import Profile, ProfileKey
from services.runtime.convert import node_from_pb, node_to_pb, profile_from_pb, profile_to_pb
from services.runtime.keys import Keys

T = TypeVar("T")


class Store:
    def __init__(self, client: aioredis.Redis, url: str, keys: Keys | None = None) -> None:
        self._r = client
        self.url = url
        self.keys = keys or Keys()

    @classmethod
    def connect(cls, url: str, timeout_s: float = 2.0, namespace: str = "scepsy") -> Store:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(client, url, Keys(namespace))

    async def close(self) -> None:
        await self._r.aclose()

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
            if added:
                await self._publish({"event": "node_joined", "node": node.name})
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
                for name in gone:
                    await self._publish({"event": "node_left", "node": name})
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
            await self._publish({"event": "node_left", "node": name})

        await self._call(remove)

    # ------------------------------------------------------------------ profiles
    async def put_profile(self, profile: Profile) -> None:
        """Store a profile under its key; a newer measurement of the same key replaces it."""
        data = profile_to_pb(profile).SerializeToString()
        await self._call(lambda: self._r.set(self.keys.profile(profile.key.redis_field()), data))

    async def get_profile(self, key: ProfileKey) -> Profile | None:
        blob = await self._call(lambda: self._r.get(self.keys.profile(key.redis_field())))
        return None if blob is None else profile_from_pb(pb.Profile.FromString(_bytes(blob)))

    # ------------------------------------------------------------------ events
    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[aioredis.client.PubSub]:
        pubsub = self._r.pubsub()
        await self._call(lambda: pubsub.subscribe(self.keys.events))
        try:
            yield pubsub
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _publish(self, event: dict[str, Any]) -> None:
        await self._r.publish(self.keys.events, json.dumps(event))

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise UnavailableError(f"redis at {self.url}: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
