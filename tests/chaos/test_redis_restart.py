"""Redis restarted with and without its data while calls run: the router keeps serving the
replicas it knew and writes them back to an empty store, the agent re-registers its node within
a heartbeat, the planner publishes the current plan again, and trace records that vanished are
counted. Nothing is re-registered by the test."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from services.agent.config import AgentConfig
from services.agent.fake_nvml import FakeNvml
from services.agent.service import Agent
from services.agent.sources import NvmlSource
from services.core.planning.plan import spec_from_text
from services.core.routing import Endpoint
from services.planner import service as planner_service
from services.planner.config import PlannerConfig
from services.planner.service import Planner
from services.runtime.redis_server import RedisServer
from services.runtime.store import Store
from tests.core.planning.test_plan import SPEC, build_plan
from tests.router.conftest import StartRouter, StartUpstream, wait_until

CALL_BOUND_S = 5.0  # no call may take longer than this


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """`scepsy up`'s kind of Redis: persistent, with a password."""
    server = RedisServer.embedded(tmp_path / "home").start()
    yield server
    server.stop()


async def _load(url: str, stop: asyncio.Event, outcomes: Counter[str]) -> None:
    """One client calling the router until ``stop``: each outcome counted by status."""
    timeout = aiohttp.ClientTimeout(total=CALL_BOUND_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            try:
                body = {"model": "m", "prompt": "p", "max_tokens": 4}
                async with session.post(url + "/v1/completions", json=body) as reply:
                    await reply.read()
                    outcomes[str(reply.status)] += 1
            except TimeoutError:
                outcomes["hung"] += 1
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("keep_data", [True, False], ids=["with-data", "empty"])
async def test_redis_restarted_while_calls_run(
    embedded: RedisServer,
    start_router: StartRouter,
    start_upstream: StartUpstream,
    keep_data: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace = "chaos"
    monkeypatch.setattr(planner_service, "REPUBLISH_S", 0.2)
    store = Store.connect(embedded.url, 1.0, namespace)
    ups = [await start_upstream("m") for _ in range(2)]
    for i, up in enumerate(ups):
        await store.put_endpoint(Endpoint("m", f"m-{i}", up.url))
    text = SPEC.format(rate=1.0)
    plan = build_plan(text, spec_from_text(text), created_at=1.0)
    await store.put_plan(plan)  # made current by someone (as `scepsy plan offline` does)
    handle = await start_router(redis_url=embedded.url, namespace=namespace)
    agent_config = AgentConfig(
        redis_url=embedded.url, namespace=namespace, node_name="node-1", heartbeat_s=0.2
    )
    source = NvmlSource(FakeNvml.recorded("dgx-h100-nvswitch"), "node-1", "host-1")
    agent = Agent(agent_config, source, store)
    await agent.heartbeat()
    planner = Planner(PlannerConfig(redis_url=embedded.url, namespace=namespace), store)
    await planner.start_keeping()
    agent_beats = asyncio.create_task(_beat(agent))

    stop, outcomes = asyncio.Event(), Counter[str]()
    clients = [asyncio.create_task(_load(handle.http_url, stop, outcomes)) for _ in range(4)]
    try:
        await wait_until(lambda: handle.router.recorder.recorded >= 20)
        written_before = handle.router.recorder.recorded
        embedded.restart(keep_data=keep_data)
        restarted = time.monotonic()
        # the agent's node is back within one heartbeat (plus the call's own time)
        await _wait_for(lambda: _has_node(store), 0.2 + 1.0)
        node_back_s = time.monotonic() - restarted
        # the plan and the endpoints are in the store again, without anyone re-registering
        await _wait_for(lambda: _current_is(store, plan.id), 0.2 + 1.0)
        await _wait_for(lambda: _endpoints_are(store, ["m-0", "m-1"]), 3.0)
        await asyncio.sleep(0.5)  # calls go on after the restart
        assert handle.router.registry.models() == ["m"]
        # an explicit removal is followed
        await store.remove_endpoint("m", "m-1")
        await wait_until(lambda: [r.id for r in handle.router.registry.replicas("m")] == ["m-0"])
        calls_before_stop = sum(outcomes.values())
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        agent_beats.cancel()
        await planner.stop_keeping()
        await store.close()

    print(f"chaos redis restart ({'with' if keep_data else 'without'} data): {dict(outcomes)}")
    assert set(outcomes) == {"200"}, outcomes  # every call answered, none hung
    assert sum(outcomes.values()) > calls_before_stop > 0
    assert node_back_s <= 1.2
    lost = handle.metric("scepsy_router_trace_lost_total")
    restores = handle.metric("scepsy_router_endpoint_restores_total")
    if keep_data:
        assert lost == 0 and restores == 0
    else:
        assert written_before <= lost <= handle.router.recorder.recorded
        assert restores >= 1


async def _beat(agent: Agent) -> None:
    while True:
        await asyncio.sleep(0.2)
        await agent.heartbeat()


async def _wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await check():
                return
        except Exception:  # Redis may still be starting
            pass
        assert time.monotonic() < deadline, f"not reached within {timeout_s} s"
        await asyncio.sleep(0.02)


async def _has_node(store: Store) -> bool:
    return [n.name for n in await store.list_nodes()] == ["node-1"]


async def _current_is(store: Store, plan_id: str) -> bool:
    return await store.current_plan_id() == plan_id


async def _endpoints_are(store: Store, replicas: list[str]) -> bool:
    return [e.replica for e in await store.list_endpoints()] == replicas
