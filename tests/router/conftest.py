"""Router fixtures: routers served in-process (real HTTP and gRPC on port 0, real Redis) and
scripted upstreams on real sockets, stopped at the end of each test. Real vLLM engines are
started once per module by ``test_engines``; the scripted upstream is only for failures a real
engine cannot produce on demand."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from services.core.errors import UnavailableError
from services.core.routing import Endpoint
from services.router.config import RouterConfig
from services.router.scripted_upstream import ScriptedUpstream
from services.router.service import Router, router_binding
from services.runtime.redis_server import free_port
from services.runtime.server import Server
from services.runtime.store import Store

StartUpstream = Callable[..., Awaitable[ScriptedUpstream]]


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

    def metric(self, series: str) -> float:
        """The value of one series of the router's metrics, e.g.
        ``'scepsy_router_queue_length{model="m"}'`` (0 when absent)."""
        for line in self.router.metrics.render().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def trace(self, count: int, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The first ``count`` recorded trace records, waiting for the writer to store them
        (a call is recorded just after its answer went out) and for Redis to be reachable (a
        pooled connection may still point at a Redis that was restarted)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                lines = [json.loads(line) for _, line in await self.store.read_trace()]
            except UnavailableError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                lines = []
            if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
                return lines
            await asyncio.sleep(0.02)


StartRouter = Callable[..., Awaitable[RunningRouter]]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    """Start a ``ScriptedUpstream`` (arguments as for it); all are stopped after the test."""
    started: list[ScriptedUpstream] = []

    async def start(model: str, **kwargs: Any) -> ScriptedUpstream:
        upstream = ScriptedUpstream(model, **kwargs)
        await upstream.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


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


async def complete(
    session: aiohttp.ClientSession,
    handle: RunningRouter,
    model: str = "m",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> tuple[int, dict[str, str], Any]:
    """POST a completion to the router: HTTP status, headers and JSON answer."""
    body = {"model": model, "prompt": "p", **fields}
    async with session.post(
        handle.http_url + "/v1/completions", json=body, headers=headers or {}
    ) as reply:
        return reply.status, dict(reply.headers), await reply.json()


def nothing_at() -> str:
    """A base URL where nothing listens (a port that was free a moment ago)."""
    return f"http://127.0.0.1:{free_port()}"


async def register(store: Store, model: str, *upstreams: ScriptedUpstream | str) -> None:
    """Register upstreams (or base URLs) as replicas ``{model}-0``, ``{model}-1``, ..."""
    for i, upstream in enumerate(upstreams):
        url = upstream if isinstance(upstream, str) else upstream.url
        await store.put_endpoint(Endpoint(model, f"{model}-{i}", url))
