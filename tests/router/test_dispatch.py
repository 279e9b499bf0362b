"""Dispatch failures a real engine cannot produce on demand, played by scripted upstreams on real
sockets (``services.router.scripted_upstream``), and replica bookkeeping that needs no engine.

Backpressure, deadlines, cancellation, live endpoints and the routing policies are tested on
real vLLM engines in ``test_engines``.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import openai
import pytest
import redis.asyncio as aioredis

from services.router.client import RouterClient, generate_request
from services.router.scripted_upstream import ScriptedUpstream
from services.router.service import Router, router_binding
from services.runtime.server import Server
from services.runtime.store import Store
from tests.router.conftest import (
    RunningRouter,
    StartRouter,
    StartUpstream,
    complete,
    nothing_at,
    register,
    router_config,
    wait_until,
)


async def test_a_dead_replica_is_ejected_calls_fail_over_and_it_is_readmitted(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """Scripted: re-admission needs the dead replica back on the same port, and restarting a
    real engine takes 20-45 s (ejection and failover on a killed real engine are in
    ``test_engines``)."""
    alive, doomed = await start_upstream("m"), await start_upstream("m")
    await register(store, "m", alive, doomed)
    handle = await start_router(health_interval_s=0.1)
    port = doomed.port
    await doomed.stop()
    async with aiohttp.ClientSession() as session:
        results = [await complete(session, handle) for _ in range(6)]
        assert [status for status, _, _ in results] == [200] * 6
        assert {headers["x-scepsy-replica"] for _, headers, _ in results} == {"m-0"}
        assert handle.metric('scepsy_router_replica_healthy{model="m",replica="m-1"}') == 0
        assert handle.metric('scepsy_router_errors_total{kind="connect",model="m"}') >= 1
        assert handle.metric('scepsy_router_retries_total{model="m"}') >= 1

        revived = ScriptedUpstream("m", port=port)
        await revived.start()
        try:
            replica = handle.router.registry.replicas("m")[1]
            await wait_until(lambda: replica.healthy)
            served = {(await complete(session, handle))[1]["x-scepsy-replica"] for _ in range(4)}
            assert served == {"m-0", "m-1"}
        finally:
            await revived.stop()


async def test_an_unhealthy_replica_gets_no_calls_until_healthy(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """Scripted: a real engine's ``/health`` cannot be made to fail and recover on demand."""
    a, b = await start_upstream("m"), await start_upstream("m")
    await register(store, "m", a, b)
    handle = await start_router(health_interval_s=0.05)
    b.healthy = False
    replica_b = handle.router.registry.replicas("m")[1]
    await wait_until(lambda: not replica_b.healthy)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            assert (await complete(session, handle))[0] == 200
        assert (a.calls, b.calls) == (4, 0)
        b.healthy = True
        await wait_until(lambda: replica_b.healthy)
        for _ in range(4):
            await complete(session, handle)
    assert b.calls == 2


async def test_a_server_error_is_retried_once_on_another_replica(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """Scripted: a real engine answers 500 before its first byte only when it breaks, which
    cannot be caused on demand."""
    failing, fine = await start_upstream("m"), await start_upstream("m")
    failing.fail_status = 500
    await register(store, "m", failing, fine)
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        results = [await complete(session, handle) for _ in range(4)]
        assert [(s, h["x-scepsy-replica"]) for s, h, _ in results] == [(200, "m-1")] * 4
        assert failing.calls >= 1
        assert handle.metric('scepsy_router_retries_total{model="m"}') == failing.calls
        # not ejected: the engine's /health still passes, and a 500 may be the call's own fault
        assert handle.metric('scepsy_router_replica_healthy{model="m",replica="m-0"}') == 1
        fine.fail_status = 503
        status, _, answer = await complete(session, handle)
        # both fail: the answer of the second one tried is forwarded as it is
        assert status in (500, 503)
        assert answer["error"]["message"] == "scripted failure"


async def test_stream_broken_mid_way_ends_with_an_error_event(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """Scripted: the answer must break off after a few chunks and before ``[DONE]``, every
    time. A real engine would have to be killed mid-stream, which its 20-45 s restart allows
    once per module (``test_engines`` does it last, checking that no call hangs)."""
    upstream = await start_upstream("m", tokens=50, token_delay_s=0.05)
    await register(store, "m", upstream)
    handle = await start_router()
    async with openai.AsyncOpenAI(
        base_url=handle.http_url + "/v1", api_key="x", max_retries=0
    ) as client:
        stream = await client.completions.create(model="m", prompt="p", stream=True)
        received = []
        with pytest.raises(openai.APIError, match=r"broke off|without|ejected"):
            async for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    stopping = asyncio.ensure_future(upstream.stop())
    await stopping
    assert 3 <= len(received) < 50
    calls = await handle.trace(1)
    assert calls[0]["status"] == "error"


async def test_no_healthy_replica_is_503(start_router: StartRouter, store: Store) -> None:
    # No engine: the one replica's address has nothing listening. Health checks are slow, so
    # the first call finds it still admitted, fails to connect (502: no other replica to
    # retry on) and ejects it; the next call finds no healthy replica.
    await register(store, "m", nothing_at())
    handle = await start_router(health_interval_s=30.0)
    async with aiohttp.ClientSession() as session:
        status, _, answer = await complete(session, handle)
        assert (status, answer["error"]["code"]) == (502, 502)  # vLLM's shape: the status
        status, _, answer = await complete(session, handle)
        assert (status, answer["error"]["code"]) == (503, 503)
        assert "no healthy replica" in answer["error"]["message"]


async def test_endpoints_are_refreshed_periodically_too(
    start_router: StartRouter, store: Store, redis_url: str
) -> None:
    # No engine needed: only the registry is observed.
    handle = await start_router(refresh_s=0.1)
    # Written without the change announcement, as if the event had been lost.
    client = aioredis.Redis.from_url(redis_url)
    try:
        url = nothing_at()
        await client.hset(store.keys.endpoints("quiet"), "r0", f'{{"url": "{url}"}}')
        await client.sadd(store.keys.endpoint_models, "quiet")
    finally:
        await client.aclose()
    await wait_until(lambda: handle.router.registry.models() == ["quiet"])


async def test_ejection_needs_eject_after_failed_health_checks_in_a_row(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """Scripted: a real engine's ``/health`` cannot be made slow or failing on demand. Checks are
    run by hand (the periodic ones are 30 s apart), so the count is exact."""
    upstream = await start_upstream("m")
    await register(store, "m", upstream)
    handle = await start_router(health_interval_s=30.0, health_timeout_s=0.2, eject_after=3)
    registry = handle.router.registry
    replica = registry.replicas("m")[0]
    upstream.health_delays = [1.0, 1.0]  # a busy engine: two checks time out, then it answers
    assert [await registry.probe(replica) for _ in range(3)] == [False, False, True]
    assert replica.healthy
    upstream.healthy = False
    assert not await registry.probe(replica)
    assert not await registry.probe(replica)
    assert replica.healthy  # two failures in a row: still admitted
    assert not await registry.probe(replica)
    assert not replica.healthy  # the third ejects
    assert handle.metric('scepsy_router_replica_healthy{model="m",replica="m-0"}') == 0
    upstream.healthy = True
    assert await registry.probe(replica)
    assert replica.healthy  # one passing check re-admits, as before


async def test_a_draining_router_answers_503_with_retry_after_until_in_flight_calls_end(
    start_upstream: StartUpstream, redis_url: str, namespace: str, store: Store
) -> None:
    """Scripted: the in-flight call must last a known time. The router is built here, not by
    ``start_router``, because the test stops it itself."""
    upstream = await start_upstream("m", first_token_delay_s=1.5)
    await register(store, "m", upstream)
    config = router_config(redis_url, namespace, grace_s=10.0, retry_after_s=2.0)
    router_store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
    router = Router(config, router_store)
    server = Server(config, [router_binding(router)])
    await server.start()
    handle = RunningRouter(router, server, router_store)
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(complete(session, handle))
            await wait_until(lambda: upstream.calls == 1)
            stopping = asyncio.create_task(server.stop())
            await wait_until(lambda: router.dispatcher.draining)
            async with aiohttp.ClientSession() as fresh:  # a new connection, not a pooled one
                async with fresh.get(handle.http_url + "/health") as reply:
                    assert reply.status == 503
                status, headers, answer = await complete(fresh, handle)
            assert (status, headers["Retry-After"]) == (503, "2")
            assert answer["error"]["code"] == 503
            assert answer["error"]["type"] == "service_unavailable"
            async with RouterClient(handle.grpc_target) as client:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.generate(generate_request("m", prompt="p"))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ("retry-after-ms", "2000") in tuple(caught.value.trailing_metadata() or ())
            assert (await slow)[0] == 200  # the call in flight when the drain began finished
            await stopping
        assert upstream.calls == 1
    finally:
        await router_store.close()


async def test_health_says_503_from_the_start_of_the_drain_while_calls_are_still_served(
    start_upstream: StartUpstream, redis_url: str, namespace: str, store: Store
) -> None:
    """The drain window (``drain_s``) is for load balancers to notice: gRPC health goes
    NOT_SERVING and HTTP /health must say 503 at once, while calls are still served."""
    upstream = await start_upstream("m")
    await register(store, "m", upstream)
    config = router_config(redis_url, namespace, drain_s=2.0)
    router_store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
    router = Router(config, router_store)
    server = Server(config, [router_binding(router)])
    await server.start()
    handle = RunningRouter(router, server, router_store)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(handle.http_url + "/health") as reply:
                assert reply.status == 200
            stopping = asyncio.create_task(server.stop())
            await wait_until(lambda: not router.http.serving)
            assert not router.dispatcher.draining  # still inside the drain window
            async with session.get(handle.http_url + "/health") as reply:
                assert reply.status == 503
            status, _, _ = await complete(session, handle)
            assert status == 200  # calls are still served during the window
            await stopping
    finally:
        await router_store.close()
