"""Tracing: records reach the Redis stream without slowing calls, survive a Redis outage as
counted drops, and give the statistics a known workflow structure implies."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import openai

from services.cli import trace as trace_cli
from services.core.stats import workflow_stats
from services.core.trace import read_trace
from services.router.client import workflow_request
from services.runtime.redis_server import RedisServer
from services.runtime.store import Store
from tests.router.conftest import StartEngine, StartRouter, register, wait_until


def _client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


async def test_redis_outage_keeps_serving_counts_drops_and_resumes(
    start_engine: StartEngine, start_router: StartRouter
) -> None:
    redis = RedisServer().start()
    store = Store.connect(redis.url, timeout_s=1.0, namespace="outage")
    try:
        engine = await start_engine("m")
        await register(store, "m", engine)
        handle = await start_router(redis_url=redis.url, namespace="outage", redis_timeout_s=0.5)
        recorder = handle.router.recorder
        async with _client(handle.http_url) as client:
            for _ in range(3):
                await client.completions.create(model="m", prompt="before")
            assert len(await handle.trace(3)) == 3

            redis.stop()
            started = time.monotonic()
            for _ in range(5):
                reply = await client.completions.create(model="m", prompt="during")
                assert reply.choices[0].text
            assert time.monotonic() - started < 2.0  # calls never waited on Redis
            await wait_until(lambda: recorder.dropped >= 5, timeout_s=20)
            metrics = handle.router.metrics.render().decode()
            assert "scepsy_router_trace_dropped_total 5.0" in metrics

            redis = RedisServer(port=redis.port).start()  # restarted empty: no persistence
            await store.close()
            store = Store.connect(redis.url, timeout_s=1.0, namespace="outage")
            await register(store, "m", engine)
            await wait_until(lambda: handle.router.registry.models() == ["m"], timeout_s=10)
            for _ in range(2):
                await client.completions.create(model="m", prompt="after")
            calls = await handle.trace(2, timeout_s=10)
        assert [c["status"] for c in calls] == ["ok", "ok"]
        assert recorder.dropped == 5
        assert recorder.recorded == 5
    finally:
        await store.close()
        redis.stop()


async def test_known_workflow_structure_gives_the_implied_statistics(
    start_engine: StartEngine, start_router: StartRouter, store: Store, tmp_path: Path
) -> None:
    # Each request: 1 call to A, then 4 parallel calls to B. So n_A = 1, n_B = 4; A never
    # overlaps itself (p_A = 1) and B's 4 equal calls overlap almost entirely (p_B close to 4);
    # A runs before B, so the stages are [A] then [B].
    a = await start_engine("A", first_token_delay_s=0.05)
    b1 = await start_engine("B", first_token_delay_s=0.2)
    b2 = await start_engine("B", first_token_delay_s=0.2)
    await register(store, "A", a)
    await register(store, "B", b1, b2)
    handle = await start_router()
    async with _client(handle.http_url) as client:
        for n in range(3):
            with workflow_request("fanout", f"req-{n}") as req:
                tagged = req.bind(client)
                await tagged.completions.create(model="A", prompt="plan")
                await asyncio.gather(
                    *(tagged.completions.create(model="B", prompt=f"part {i}") for i in range(4))
                )
        await client.completions.create(model="A", prompt="an untagged call")
    await handle.trace(16)

    out = tmp_path / "trace.jsonl"
    args = argparse.Namespace(
        out=str(out), redis_url=handle.router.config.redis_url,
        namespace=handle.router.config.namespace, json=False,
    )  # fmt: skip
    assert await asyncio.to_thread(trace_cli.run_export, args) == 0
    stats = {w.workflow: w for w in workflow_stats(read_trace(out))}

    fanout = stats["fanout"]
    assert fanout.requests == 3
    assert fanout.llm("A").n == 1.0
    assert fanout.llm("B").n == 4.0
    assert fanout.llm("A").p == 1.0
    assert 3.5 <= fanout.llm("B").p <= 4.0
    assert fanout.stages == (("A",), ("B",))
    untagged = stats["untagged"]
    assert (untagged.requests, untagged.llm("A").n) == (1, 1.0)
