"""Service processes announce themselves in a real Redis: addresses, PID, extra fields; withdrawn
at stop, expired when the process stops refreshing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket

from services.profiler.service import profiler_binding
from services.runtime.config import ServiceConfig
from services.runtime.registration import Registration
from services.runtime.server import Server
from services.runtime.store import ServiceRecord, Store


async def test_a_started_server_is_announced_and_withdrawn(
    redis_url: str, namespace: str, store: Store
) -> None:
    config = ServiceConfig(
        redis_url=redis_url, namespace=namespace, drain_s=0, grace_s=0.5, service_ttl_s=0.3
    )
    binding = dataclasses.replace(profiler_binding(store), announce=lambda: {"zone": "a"})
    server = Server(config, [binding])
    await server.start()
    registration = Registration(store, "profiler", config)
    try:
        record = await registration.start(server)
        assert record.address == server.address and record.metrics_address == server.metrics_address
        assert record.metrics_address.startswith("127.0.0.1:") and server.port > 0
        assert (record.pid, record.host) == (os.getpid(), socket.gethostname())
        assert record.extra == {"zone": "a"}
        assert await store.list_services() == [record]
        # refreshed every third of the TTL: still there after several TTLs
        await asyncio.sleep(1.0)
        [again] = await store.list_services()
        assert again.heartbeat_at > record.heartbeat_at and again.started_at == record.started_at
    finally:
        await registration.stop()
        await server.stop()
    assert await store.list_services() == []


async def test_a_record_expires_without_refreshes(store: Store) -> None:
    record = ServiceRecord("placer", "127.0.0.1:1", "127.0.0.1:2", 7, "h", 1.0, 1.0, {"x": "y"})
    await store.put_service(record, ttl_s=0.2)
    assert await store.list_services() == [record]
    await asyncio.sleep(0.4)
    assert await store.list_services() == []


def test_record_json_round_trip() -> None:
    record = ServiceRecord("router", "h:1", "h:2", 9, "h", 1.5, 2.5, {"http_address": "h:3"})
    assert ServiceRecord.from_json(record.to_json()) == record
    assert record.id == "router@h:9"
