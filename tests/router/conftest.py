"""Router fixtures: fake engines on real sockets, and routers served in-process (real HTTP and
gRPC on port 0, real Redis), stopped at the end of each test."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.core.routing import Endpoint
from services.router.config import RouterConfig
from services.router.fake_engine import FakeEngine
from services.router.service import Router, router_binding
from services.runtime.server import Server
from services.runtime.store import Store

StartEngine = Callable[..., Awaitable[FakeEngine]]


@dataclass
class RunningRouter:
    router: Router
    server: Server
    store: Store

    @property
    def http_url(self) -> str:
        return self.router.http_url

    @property
    def grpc_target(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        await self.server.stop()

    async def trace(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The first ``count`` recorded trace records, waiting for the writer to store them
        (a call is recorded just after its answer went out)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            lines = [json.loads(line) for _, line in await self.store.read_trace()]
            if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
                return lines
            await asyncio.sleep(0.02)


StartRouter = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def start_engine() -> AsyncIterator[StartEngine]:
    """Start a ``FakeEngine`` (arguments as for it); all are stopped after the test."""
    started: list[FakeEngine] = []

    async def start(model: str, **kwargs: Any) -> FakeEngine:
        engine = FakeEngine(model, **kwargs)
        await engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        await engine.stop()


def router_config(redis_url: str, namespace: str, **overrides: Any) -> RouterConfig:
    """A router config for tests: free ports, fast health checks and refreshes, no drain."""
    base = RouterConfig(
        redis_url=redis_url,
        namespace=namespace,
        port=0,
        http_port=0,
        drain_s=0.0,
        grace_s=5.0,
        health_interval_s=0.1,
        refresh_s=0.2,
        trace_flush_s=0.05,
        log_level="warning",
    )
    config = dataclasses.replace(base, **overrides)
    config.validate()
    return config


@pytest.fixture
async def start_router(redis_url: str, namespace: str, store: Store) -> AsyncIterator[StartRouter]:
    """Start a router in-process (config overrides as keyword arguments); stopped after."""
    running: list[RunningRouter] = []

    async def start(**overrides: Any) -> RunningRouter:
        config = router_config(
            overrides.pop("redis_url", redis_url),
            overrides.pop("namespace", namespace),
            **overrides,
        )
        router_store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
        router = Router(config, router_store)
        server = Server(config, [router_binding(router)])
        await server.start()
        handle = RunningRouter(router, server, router_store)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.stop()
        await handle.store.close()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def register(store: Store, model: str, *engines: FakeEngine | str) -> None:
    """Register engines (or base URLs) as replicas ``{model}-0``, ``{model}-1``, ..."""
    for i, engine in enumerate(engines):
        url = engine if isinstance(engine, str) else engine.url
        await store.put_endpoint(Endpoint(model, f"{model}-{i}", url))
