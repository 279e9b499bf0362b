"""Nothing hangs: a stream that sends nothing for ``stream_idle_timeout_s`` ends with an error,
and the calls in flight on a replica that is ejected end at once (a call that has sent its
client nothing goes to another replica). Scripted upstreams: an engine that stops generating
but keeps its connections open cannot be made on demand (the chaos tests do it with SIGTERM)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import aiohttp

from services.core.routing import Endpoint
from services.runtime.store import Store
from tests.router.conftest import StartRouter, StartUpstream, register, wait_until


async def _stream_events(url: str, body: dict[str, Any]) -> tuple[list[Any], float]:
    """Every SSE payload of a streamed completion, and the seconds it took."""
    started = time.monotonic()
    events: list[Any] = []
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(url + "/v1/completions", json=body) as reply,
    ):
        assert reply.status == 200
        async for line in reply.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append(json.loads(line[6:]))
    return events, time.monotonic() - started


async def test_a_stream_that_goes_quiet_ends_with_an_error(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    upstream = await start_upstream("m", tokens=5, token_delay_s=60.0)
    await register(store, "m", upstream)
    handle = await start_router(stream_idle_timeout_s=0.5)
    body = {"model": "m", "prompt": "p", "stream": True}
    events, took = await _stream_events(handle.http_url, body)
    assert events[0]["choices"][0]["text"] == "w0"
    error = events[-1]["error"]
    assert "sent nothing for 0.5 s" in error["message"] and error["code"] == 502
    assert took < 3.0
    assert handle.metric('scepsy_router_aborted_total{model="m",reason="idle"}') == 1
    assert (await handle.trace(1))[0]["status"] == "error"


async def test_a_slow_stream_that_keeps_sending_is_not_ended(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    # A token every 0.25 s, 1.5 s in all, with an idle limit of 0.6 s: each read resets the
    # stream's idle clock, so the watchdog never ends it (only quiet streams end).
    upstream = await start_upstream("m", tokens=6, token_delay_s=0.25)
    await register(store, "m", upstream)
    handle = await start_router(stream_idle_timeout_s=0.6)
    body = {"model": "m", "prompt": "p", "stream": True}
    events, _ = await _stream_events(handle.http_url, body)
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text == "w0 w1 w2 w3 w4 w5"
    assert not any("error" in e for e in events)
    assert handle.metric('scepsy_router_aborted_total{model="m",reason="idle"}') == 0
    assert (await handle.trace(1))[0]["status"] == "ok"


async def test_streams_on_an_ejected_replica_end_at_once(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    upstream = await start_upstream("m", tokens=5, token_delay_s=60.0)
    await register(store, "m", upstream)
    handle = await start_router(eject_after=1, health_interval_s=0.1)
    body = {"model": "m", "prompt": "p", "stream": True}
    reading = asyncio.create_task(_stream_events(handle.http_url, body))
    await wait_until(lambda: upstream.calls == 1)
    await asyncio.sleep(0.2)  # the first chunk is out
    upstream.healthy = False
    events, took = await asyncio.wait_for(reading, 10)
    assert events[0]["choices"][0]["text"] == "w0"
    assert "replica ejected" in events[-1]["error"]["message"]
    assert took < 3.0
    assert handle.metric('scepsy_router_aborted_total{model="m",reason="ejected"}') == 1


async def test_a_call_waiting_on_an_ejected_replica_goes_to_another(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    slow = await start_upstream("m", first_token_delay_s=60.0)
    fast = await start_upstream("m")
    await store.put_endpoint(Endpoint("m", "m-slow", slow.url))
    handle = await start_router(eject_after=1, health_interval_s=0.1)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

        async def call() -> tuple[int, Any]:
            body = {"model": "m", "prompt": "p"}
            async with session.post(handle.http_url + "/v1/completions", json=body) as reply:
                return reply.status, await reply.json()

        calling = asyncio.create_task(call())
        await wait_until(lambda: slow.calls == 1)
        await store.put_endpoint(Endpoint("m", "m-fast", fast.url))
        await wait_until(lambda: len(handle.router.registry.replicas("m")) == 2)
        slow.healthy = False
        status, answer = await asyncio.wait_for(calling, 10)
    assert status == 200 and answer["choices"][0]["text"] == "w0 w1 w2 w3"
    assert fast.calls == 1
    assert time.monotonic() - started < 5.0
    assert handle.metric('scepsy_router_retries_total{model="m"}') == 1


async def test_slow_health_checks_of_a_replica_that_answers_calls_are_not_misses(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    """The check adapts to load: a timed-out /health counts as a miss only when no call on the
    replica finished or streamed since the last check. Checks run by hand."""
    upstream = await start_upstream("m")
    await register(store, "m", upstream)
    handle = await start_router(health_interval_s=30.0, health_timeout_s=0.1, eject_after=2)
    registry = handle.router.registry
    replica = registry.replicas("m")[0]
    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            body = {"model": "m", "prompt": "p"}
            async with session.post(handle.http_url + "/v1/completions", json=body) as reply:
                return reply.status

        for _ in range(4):  # busy: a call finishes between slow checks
            upstream.health_delays = [0.5]
            assert await call() == 200
            assert not await registry.probe(replica)
            assert replica.healthy and replica.failed_checks == 0
        upstream.health_delays = [0.5, 0.5]  # idle and slow twice: ejected
        assert not await registry.probe(replica)
        assert not await registry.probe(replica)
        assert not replica.healthy


async def test_stream_chunks_reach_the_client_as_the_engine_sends_them_under_load(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    # One slow stream (a token every 0.3 s) beside 16 clients keeping the router busy with
    # instant calls: each token reaches the client about when the engine sent it, not in one
    # burst at the end (the router's read of a stream must not wait for more).
    slow = await start_upstream("slow", tokens=5, token_delay_s=0.3)
    fast = await start_upstream("fast", tokens=16)
    await register(store, "slow", slow)
    await register(store, "fast", fast)
    handle = await start_router()
    stop = asyncio.Event()

    async def busy(session: aiohttp.ClientSession) -> None:
        body = {"model": "fast", "prompt": "p", "stream": True}
        while not stop.is_set():
            async with session.post(handle.http_url + "/v1/completions", json=body) as reply:
                await reply.read()

    async with aiohttp.ClientSession() as session:
        load = [asyncio.create_task(busy(session)) for _ in range(16)]
        try:
            await asyncio.sleep(0.3)
            arrivals: list[float] = []
            started = time.monotonic()
            body = {"model": "slow", "prompt": "p", "stream": True}
            async with session.post(handle.http_url + "/v1/completions", json=body) as reply:
                async for line in reply.content:
                    if line.startswith(b"data: {"):
                        arrivals.append(time.monotonic() - started)
        finally:
            stop.set()
            await asyncio.gather(*load)
    assert len(arrivals) == 5
    # the engine spreads the tokens over ~1.2 s; a burst would put them all at the end
    assert arrivals[0] < arrivals[-1] - 0.6
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap > 0.1 for gap in gaps) >= 3


async def test_a_call_past_the_router_deadline_gets_504_and_is_recorded_as_a_timeout(
    start_upstream: StartUpstream, start_router: StartRouter, store: Store
) -> None:
    # The engine takes a minute to answer; the router's own deadline is 0.3 s. The deadline's
    # cancellation is told from a client going away: 504 and kind "timeout", not "cancelled".
    upstream = await start_upstream("m", first_token_delay_s=60.0)
    await register(store, "m", upstream)
    handle = await start_router(upstream_timeout_s=0.3, connect_timeout_s=0.3)
    body = {"model": "m", "prompt": "p", "max_tokens": 2}
    async with (
        aiohttp.ClientSession() as session,
        session.post(handle.http_url + "/v1/completions", json=body) as reply,
    ):
        answer = await reply.json()
    assert (reply.status, answer["error"]["code"]) == (504, 504)
    assert "no complete answer within 0.3 s" in answer["error"]["message"]
    assert handle.metric('scepsy_router_errors_total{kind="timeout",model="m"}') == 1
    requests = 'scepsy_router_requests_total{{api="http",model="m",status="{}"}}'
    assert handle.metric(requests.format("error")) == 1
    assert handle.metric(requests.format("cancelled")) == 0
    assert (await handle.trace(1))[0]["status"] == "error"
    # the router is fine afterwards: the next call on a quick replica succeeds
    upstream.first_token_delay_s = 0.0
    async with (
        aiohttp.ClientSession() as session,
        session.post(handle.http_url + "/v1/completions", json=body) as reply,
    ):
        assert reply.status == 200
