"""Dispatch over fake engines on real sockets: failover, health, live endpoints, backpressure,
deadlines, cancellation, routing policies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest

from services.core.routing import Endpoint
from services.router.fake_engine import FakeEngine
from services.runtime.store import Store
from tests.router.conftest import (
    RunningRouter,
    StartEngine,
    StartRouter,
    register,
    wait_until,
)


async def _complete(
    session: aiohttp.ClientSession,
    handle: RunningRouter,
    model: str = "m",
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "prompt": "p", **fields}
    async with session.post(
        handle.http_url + "/v1/completions", json=body, headers=headers or {}
    ) as reply:
        return reply.status, dict(reply.headers), await reply.json()


def _metric(handle: RunningRouter, line_prefix: str) -> float:
    for line in handle.router.metrics.render().decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_dead_replica_is_ejected_calls_fail_over_and_it_is_readmitted(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    alive, doomed = await start_engine("m"), await start_engine("m")
    await register(store, "m", alive, doomed)
    handle = await start_router(health_interval_s=0.1)
    port = doomed.port
    await doomed.stop()
    async with aiohttp.ClientSession() as session:
        results = [await _complete(session, handle) for _ in range(6)]
        assert [status for status, _, _ in results] == [200] * 6
        assert {headers["x-scepsy-replica"] for _, headers, _ in results} == {"m-0"}
        assert _metric(handle, 'scepsy_router_replica_healthy{model="m",replica="m-1"}') == 0
        assert _metric(handle, 'scepsy_router_errors_total{kind="connect",model="m"}') >= 1
        assert _metric(handle, 'scepsy_router_retries_total{model="m"}') >= 1

        revived = FakeEngine("m", port=port)
        await revived.start()
        try:
            replica = handle.router.registry.replicas("m")[1]
            await wait_until(lambda: replica.healthy)
            served = {(await _complete(session, handle))[1]["x-scepsy-replica"] for _ in range(4)}
            assert served == {"m-0", "m-1"}
        finally:
            await revived.stop()


async def test_an_unhealthy_replica_gets_no_calls_until_healthy(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    a, b = await start_engine("m"), await start_engine("m")
    await register(store, "m", a, b)
    handle = await start_router(health_interval_s=0.05)
    b.healthy = False
    replica_b = handle.router.registry.replicas("m")[1]
    await wait_until(lambda: not replica_b.healthy)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            assert (await _complete(session, handle))[0] == 200
        assert (a.calls, b.calls) == (4, 0)
        b.healthy = True
        await wait_until(lambda: replica_b.healthy)
        for _ in range(4):
            await _complete(session, handle)
    assert b.calls == 2


async def test_a_server_error_is_retried_once_on_another_replica(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    failing, fine = await start_engine("m"), await start_engine("m")
    failing.fail_status = 500
    await register(store, "m", failing, fine)
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        results = [await _complete(session, handle) for _ in range(4)]
        assert [(s, h["x-scepsy-replica"]) for s, h, _ in results] == [(200, "m-1")] * 4
        assert failing.calls >= 1
        assert _metric(handle, 'scepsy_router_retries_total{model="m"}') == failing.calls
        # not ejected: the engine's /health still passes, and a 500 may be the call's own fault
        assert _metric(handle, 'scepsy_router_replica_healthy{model="m",replica="m-0"}') == 1
        fine.fail_status = 503
        status, _, answer = await _complete(session, handle)
        # both fail: the answer of the second one tried is forwarded as it is
        assert status in (500, 503)
        assert answer["error"]["message"] == "scripted failure"


async def test_no_healthy_replica_is_503(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m")
    await register(store, "m", engine)
    handle = await start_router()
    await engine.stop()
    async with aiohttp.ClientSession() as session:
        status, _, answer = await _complete(session, handle)
        assert status == 502  # the one replica failed before answering; none left to retry
        status, _, answer = await _complete(session, handle)
        assert (status, answer["error"]["code"]) == (503, "no_healthy_replica")


async def test_endpoints_update_live_without_restart(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    handle = await start_router(refresh_s=30.0)  # only the pub/sub event can bring the change
    engine = await start_engine("late")
    async with aiohttp.ClientSession() as session:
        assert (await _complete(session, handle, "late"))[0] == 404
        await store.put_endpoint(Endpoint("late", "r0", engine.url))
        await wait_until(lambda: handle.router.registry.models() == ["late"])
        assert (await _complete(session, handle, "late"))[0] == 200
        await store.remove_endpoint("late", "r0")
        await wait_until(lambda: handle.router.registry.models() == [])
        assert (await _complete(session, handle, "late"))[0] == 404


async def test_endpoints_are_refreshed_periodically_too(
    start_engine: StartEngine, start_router: StartRouter, store: Store, redis_url: str
) -> None:
    import redis.asyncio as aioredis

    handle = await start_router(refresh_s=0.1)
    engine = await start_engine("quiet")
    # Written without the change announcement, as if the event had been lost.
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.hset(store.keys.endpoints("quiet"), "r0", f'{{"url": "{engine.url}"}}')
        await client.sadd(store.keys.endpoint_models, "quiet")
    finally:
        await client.aclose()
    await wait_until(lambda: handle.router.registry.models() == ["quiet"])


async def test_beyond_in_flight_limit_and_queue_calls_get_429_with_retry_after(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=0.5)
    await register(store, "m", engine)
    handle = await start_router(max_in_flight=1, queue_size=1, retry_after_s=2.0)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_complete(session, handle))
        await wait_until(lambda: engine.in_flight == 1)
        second = asyncio.create_task(_complete(session, handle))
        await wait_until(lambda: _metric(handle, 'scepsy_router_queue_length{model="m"}') == 1)
        status, headers, answer = await _complete(session, handle)
        assert (status, headers["Retry-After"]) == (429, "2")
        assert answer["error"]["type"] == "rate_limit_error"
        assert [(await first)[0], (await second)[0]] == [200, 200]
    assert engine.max_in_flight == 1
    assert _metric(handle, 'scepsy_router_requests_total{api="http",model="m",status="rejected"}')


async def test_queued_call_times_out_with_429(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=1.0)
    await register(store, "m", engine)
    handle = await start_router(max_in_flight=1, queue_size=4, queue_timeout_s=0.2)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(_complete(session, handle))
        await wait_until(lambda: engine.in_flight == 1)
        started = time.monotonic()
        assert (await _complete(session, handle))[0] == 429
        assert time.monotonic() - started < 0.9
        assert (await first)[0] == 200


async def test_queue_hands_freed_slots_to_waiting_calls_in_order(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=0.05)
    await register(store, "m", engine)
    handle = await start_router(max_in_flight=2, queue_size=100)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(_complete(session, handle) for _ in range(12)))
    assert [status for status, _, _ in results] == [200] * 12
    assert engine.max_in_flight == 2
    assert handle.router.dispatcher.active == 0


async def test_upstream_deadline_is_504_and_cancels_the_engine_call(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=5.0)
    await register(store, "m", engine)
    handle = await start_router(upstream_timeout_s=0.3, connect_timeout_s=0.3)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        status, _, answer = await _complete(session, handle)
        assert (status, answer["error"]["code"]) == (504, "upstream_timeout")
        assert time.monotonic() - started < 2.0
    await wait_until(lambda: engine.cancelled == 1)
    calls = await handle.trace(1)
    assert calls[0]["status"] == "error"


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_engine_call(
    start_engine: StartEngine, start_router: StartRouter, store: Store, stream: bool
) -> None:
    engine = await start_engine("m", first_token_delay_s=5.0)
    await register(store, "m", engine)
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        call = asyncio.create_task(_complete(session, handle, stream=stream))
        await wait_until(lambda: engine.in_flight == 1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    await wait_until(lambda: engine.cancelled == 1)
    calls = await handle.trace(1)
    assert calls[0]["status"] == "cancelled"
    await wait_until(lambda: handle.router.dispatcher.active == 0)


async def test_stream_broken_mid_way_ends_with_an_error_event(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", tokens=50, token_delay_s=0.05)
    await register(store, "m", engine)
    handle = await start_router()
    async with openai.AsyncOpenAI(
        base_url=handle.http_url + "/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.completions.create(model="m", prompt="p", stream=True)
        received = []
        with pytest.raises(openai.APIError, match=r"broke off|without"):
            async for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    stopping = asyncio.ensure_future(engine.stop())
    await stopping
    assert 3 <= len(received) < 50
    calls = await handle.trace(1)
    assert calls[0]["status"] == "error"


async def test_affinity_policy_keeps_a_workflow_request_on_one_replica(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engines = [await start_engine("m") for _ in range(3)]
    await register(store, "m", *engines)
    handle = await start_router(policy="affinity")
    homes = set()
    async with aiohttp.ClientSession() as session:
        for request in range(6):
            tags = {"x-scepsy-workflow": "wf", "x-scepsy-request-id": f"r{request}"}
            served = {(await _complete(session, handle, headers=tags))[1]["x-scepsy-replica"]
                      for _ in range(3)}  # fmt: skip
            assert len(served) == 1
            homes |= served
    assert len(homes) > 1  # different requests land on different replicas


async def test_capacity_weighted_policy_prefers_the_larger_replica(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    small, large = await start_engine("m"), await start_engine("m")
    await store.put_endpoint(Endpoint("m", "small", small.url, 0.25))
    await store.put_endpoint(Endpoint("m", "large", large.url, 1.0))
    handle = await start_router(policy="capacity_weighted")
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            await _complete(session, handle)
    assert (small.calls, large.calls) == (0, 4)  # idle: the larger replica serves every call
