"""The examples in ``examples/`` run against a real router (in-process, real HTTP, real Redis)
whose replicas are scripted upstreams: every call of a workflow request is served, tagged and
traced, and the trace's statistics show the workflow's shape (calls per request, fan-out
concurrency). The upstreams answer ``w0 w1 ...``: no number for the reranker (the examples
fall back to the retriever's order) and never "yes" to the LangGraph check (every request takes
all its rounds), so the call counts are exact."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import parse_trace_lines
from services.router.scripted_upstream import ScriptedUpstream
from services.router.service import Router, router_binding
from services.runtime.server import Server
from services.runtime.store import Store
from tests.router.conftest import register, router_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(path).stem, EXAMPLES / path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def router_url(redis_url: str, namespace: str, store: Store) -> AsyncIterator[str]:
    upstreams = [
        ScriptedUpstream(model, tokens=3, first_token_delay_s=0.02)
        for model in ("generator", "reranker")
    ]
    for upstream in upstreams:
        await upstream.start()
        await register(store, upstream.model, upstream)
    config = router_config(redis_url, namespace)
    router_store = Store.connect(config.redis_url, config.redis_timeout_s, config.namespace)
    router = Router(config, router_store)
    server = Server(config, [router_binding(router)])
    await server.start()
    try:
        yield router.http_url
    finally:
        await server.stop()
        await router_store.close()
        for upstream in upstreams:
            await upstream.stop()


async def traced(store: Store, calls: int, workflow: str) -> WorkflowStats:
    """The statistics of ``workflow`` once ``calls`` calls are in the trace stream."""
    for _ in range(250):
        lines = [line for _, line in await store.read_trace("", 10_000)]
        if len(lines) >= calls:
            break
        await asyncio.sleep(0.02)
    trace = parse_trace_lines(lines)
    assert len(trace.calls) == calls
    (stats,) = [s for s in workflow_stats(trace) if s.workflow == workflow]
    return stats


async def test_asyncio_rag_example(router_url: str, store: Store) -> None:
    rag = load("asyncio_rag/rag.py")
    config = rag.Config(router=router_url, requests=6, rate=50.0, fanout=4, tool_s=0.01)
    summary = await rag.run(config)
    assert (summary.requests, summary.failed, summary.errors) == (6, 0, [])
    assert summary.calls_per_request == 6  # query, 4 reranks, answer
    # the scripted upstream answers max_tokens words: the example's limit reached it
    assert summary.example_answer == " ".join(f"w{i}" for i in range(config.max_tokens))
    stats = await traced(store, 36, "rag-asyncio")
    assert stats.requests == 6 and stats.failed_requests == 0
    assert stats.llm("generator").n == 2 and stats.llm("reranker").n == 4
    # the four reranks of a request run at once: more than one in flight while it is busy
    assert stats.llm("reranker").p > 1.5
    assert stats.llm("generator").p == pytest.approx(1.0)
    assert stats.stages == (("generator",), ("reranker",)) or len(stats.stages) == 1


async def test_asyncio_rag_command_line(router_url: str) -> None:
    rag = load("asyncio_rag/rag.py")
    argv = ["--router", router_url, "--requests", "2", "--rate", "20", "--json"]
    code = await asyncio.to_thread(rag.main, argv)
    assert code == 0
    with pytest.raises(SystemExit):
        rag.parse_args(["--rate", "0"])


async def test_langgraph_example(router_url: str, store: Store) -> None:
    graph = load("langgraph_rag/graph.py")
    config = graph.Config(router=router_url, requests=3, rate=50.0, fanout=3, attempts=2)
    summary = await graph.run(config)
    assert (summary.requests, summary.failed, summary.errors) == (3, 0, [])
    assert summary.rounds_mean == 2  # the check never says yes: both rounds
    # per round: rewrite, 3 reranks, answer, check = 6 calls; 2 rounds; 3 requests
    stats = await traced(store, 36, "rag-langgraph")
    assert stats.requests == 3
    assert stats.llm("generator").n == 4 and stats.llm("reranker").n == 8
    assert stats.llm("reranker").p > 1.0


def test_the_example_spec_plans(capsys: pytest.CaptureFixture[str]) -> None:
    """``examples/spec.yaml`` (what the READMEs apply) parses and plans offline."""
    from services.cli.main import main

    assert main(["plan", "--offline", "--spec", str(EXAMPLES / "spec.yaml"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(doc["allocation"]) == ["generator", "reranker"]
    assert {w["workflow"] for w in doc["workflows"]} == {"rag-asyncio", "rag-langgraph"}
