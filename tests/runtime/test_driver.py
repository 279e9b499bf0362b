"""The workflow driver: the simulator's workflow programs run through the real router (in-process,
real HTTP, real Redis) on a real tiny-model vLLM CPU engine. One engine serves both LLMs of the
RAG workflow under their two deployment names, so the module starts only one.

The router's recorded trace, with the driver's request spans beside it, must give the
workflow's known structure: the calls of each request as the program makes them for the same
seeds (n_m), the reranker's fan-out (p_m), the stage order, and tool time."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from services.core.errors import InvalidInputError, NotFoundError
from services.core.routing import Endpoint
from services.core.sim.program import run_instantly
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import parse_trace_lines
from services.router.service import Router, router_binding
from services.runtime.driver import (
    DriveResult,
    RequestOutcome,
    WorkflowDriver,
    direct_session,
    poisson_offsets,
    tiny_workflow,
)
from services.runtime.engines import EngineSpec, LocalEngine, run_engine_module, vllm_executable
from services.runtime.server import Server
from services.runtime.store import Store
from tests.router.conftest import router_config

REQUESTS = 10
SEED = 5


@pytest.fixture
async def router(redis_url: str, namespace: str) -> AsyncIterator[Router]:
    config = router_config(redis_url, namespace)
    router_store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
    router = Router(config, router_store)
    server = Server(config, [router_binding(router)])
    await server.start()
    yield router
    await server.stop()
    await router_store.close()


async def _recorded(store: Store, count: int, timeout_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for _, line in await store.read_trace(count=100_000)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------- no engine
def test_poisson_offsets_start_at_zero_and_name_bad_input() -> None:
    offsets = poisson_offsets(4.0, 400, np.random.default_rng(0))
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert 400 / offsets[-1] == pytest.approx(4.0, rel=0.2)
    with pytest.raises(InvalidInputError, match="rate"):
        poisson_offsets(0.0, 3, np.random.default_rng(0))


def test_window_latency_is_the_median_of_the_stretches_means() -> None:
    def request(start: float, latency: float, status: str = "ok") -> RequestOutcome:
        return RequestOutcome(f"r{start}", start, start, start + latency, status, (), 0.0)  # type: ignore[arg-type]

    # three stretches of the run (by start): 1 s requests, a stall of 9 s ones, 2 s ones
    requests = [request(t, 1.0) for t in (0, 1, 2)] + [request(t, 9.0) for t in (4, 5)]
    requests += [request(t, 2.0) for t in (8, 9)] + [request(3.0, 50.0, "error")]
    run = DriveResult("rag", 1.0, tuple(requests))
    # the mean counts the stall, the median of the stretches' means (1, 9, 2) does not; the
    # failed request counts in neither
    assert run.latency_stats()["mean"] == pytest.approx(25 / 7)
    assert run.window_latency() == pytest.approx(2.0)
    assert run.window_latency(parts=1) == pytest.approx(25 / 7)
    assert math.isnan(DriveResult("rag", 1.0, (request(0.0, 1.0, "error"),)).window_latency())
    with pytest.raises(InvalidInputError, match="parts: must be >= 1, got 0"):
        run.window_latency(parts=0)


def test_tiny_variants_fit_the_tiny_context_and_keep_the_structure() -> None:
    rag = tiny_workflow("rag")
    for seed in range(50):
        calls, tools = run_instantly(rag.program(np.random.default_rng(seed)))
        assert all(c.prompt_tokens + c.completion_tokens <= 256 for c in calls)
        assert [t.name for t in tools] == ["retrieve"] and calls[-1].model == "generator"
    with pytest.raises(InvalidInputError, match="no tiny variant of 'nope'"):
        tiny_workflow("nope")


async def test_a_failed_call_fails_its_request_and_the_run_goes_on(
    router: Router, store: Store
) -> None:
    # No engine is registered for the RAG models: the router answers 404 for every call.
    workflow = tiny_workflow("rag")
    async with direct_session() as session:
        driver = WorkflowDriver(router.http_url, workflow, session, store=store)
        result = await driver.run(20.0, 3, seed=1)
    assert [r.status for r in result.requests] == ["error"] * 3
    for r in result.requests:
        # the program stopped at the first failed step: the parallel reranker calls
        assert {m for m, _ in r.calls} == {"reranker"}
        assert all(c.error.startswith("http 404") for _, c in r.calls)
    # the request spans are recorded as failed requests beside the router's calls
    trace = parse_trace_lines(await _recorded(store, 3))
    assert [q.status for q in trace.requests] == ["error"] * 3


# ------------------------------------------------------------------------------- real engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    try:
        vllm = vllm_executable()
    except NotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the engine tests: {exc}")
        pytest.skip(f"no engine venv ({exc})")
    model_dir: Path = tmp_path_factory.mktemp("models") / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    # One engine, both deployment names (vLLM takes the last --served-model-name list).
    spec = EngineSpec.cpu(
        model_dir, "reranker", extra_args=["--served-model-name", "reranker", "generator"]
    )
    log = tmp_path_factory.mktemp("engine-logs") / "rag.log"
    with LocalEngine(spec, log, vllm=vllm) as started:
        started.start()
        started.wait_ready(time.monotonic() + 300)
        yield started


async def _wait_models(session: aiohttp.ClientSession, url: str, models: set[str]) -> None:
    deadline = time.monotonic() + 10
    while True:
        async with session.get(f"{url}/v1/models") as reply:
            listed = {m["id"] for m in (await reply.json())["data"]}
        if models <= listed or time.monotonic() > deadline:
            assert models <= listed
            return
        await asyncio.sleep(0.1)


def _stats(lines: list[str], name: str) -> WorkflowStats:
    (stats,) = [s for s in workflow_stats(parse_trace_lines(lines)) if s.workflow == name]
    return stats


@pytest.mark.engine
@pytest.mark.slow
async def test_rag_on_real_engines_has_its_known_structure(
    engine: LocalEngine, router: Router, store: Store
) -> None:
    workflow = tiny_workflow("rag")
    for model in workflow.models:
        await store.put_endpoint(Endpoint(model, f"{model}-0", engine.base_url))
    async with direct_session() as session:
        await _wait_models(session, router.http_url, set(workflow.models))
        driver = WorkflowDriver(router.http_url, workflow, session, store=store)
        result = await driver.run(2.0, REQUESTS, seed=SEED)
    assert [r.status for r in result.requests] == ["ok"] * REQUESTS

    # What the same programs ask for, without any timing (common random numbers).
    planned = [
        run_instantly(workflow.program(np.random.default_rng([SEED, i]))) for i in range(REQUESTS)
    ]
    fanout = [sum(c.model == "reranker" for c in calls) for calls, _ in planned]
    tool_s = [sum(t.seconds for t in tools) for _, tools in planned]
    for r, (calls, _) in zip(result.requests, planned, strict=True):
        assert sorted((m, c.prompt_tokens, c.completion_tokens) for m, c in r.calls) == sorted(
            (c.model, c.prompt_tokens, c.completion_tokens) for c in calls
        )

    # The router's trace (calls) plus the driver's spans (requests), as the planner reads them.
    lines = await _recorded(store, sum(fanout) + REQUESTS + REQUESTS)
    stats = _stats(lines, "rag")
    assert stats.requests == REQUESTS and stats.request_records == REQUESTS
    assert stats.llm("reranker").n == pytest.approx(np.mean(fanout))
    assert stats.llm("generator").n == 1.0
    # the K reranker calls are sent at once: they overlap; the generator runs alone
    assert stats.llm("reranker").p > 2.0
    assert stats.llm("generator").p == pytest.approx(1.0)
    assert stats.stages == (("reranker",), ("generator",))
    # tool time (retrieval) is counted thanks to the request spans
    assert stats.tool_time_mean >= 0.9 * float(np.mean(tool_s))
    # the driver's own view of the run gives the same structure
    (own,) = workflow_stats(result.trace())
    assert own.llm("reranker").n == stats.llm("reranker").n
