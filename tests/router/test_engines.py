"""The router in front of real vLLM CPU engines: one engine of each of two tiny models
(different weights), shared by the whole module (each engine takes 20-45 s to start on two
cores). A test that needs two replicas of a model registers one engine under two replica ids:
a policy chooses among replicas, whatever engine serves them. The engine-kill test starts a
replica of its own and kills that, so the shared engines stay whole and tests run in any order;
at most three engines run at once.

The engine venv (``make engine-venv``) is needed: without it these tests skip locally and fail
under CI (env ``CI`` set). Greedy decoding makes answers comparable: a call through the router
must return exactly what the engine returns when called directly.

Conditions that need a call to last (backpressure, deadlines, a client going away, calls in
flight at shutdown) use ``LONG``. Whether an engine aborted a call is read from the engine's own
Prometheus metrics: it has answered the call and runs nothing, having generated only part of
the tokens the call asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import aiohttp
import grpc
import openai
import pytest
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from protos.scepsy.v1 import router_pb2
from services.cli import trace as trace_cli
from services.core.routing import Endpoint
from services.core.workload.stats import workflow_stats
from services.core.workload.trace import parse_trace_lines, read_trace
from services.router.client import (
    RouterClient,
    SyncRouterClient,
    generate_request,
    tagged_async_http_client,
    tagged_http_client,
    workflow_request,
)
from services.runtime.engines import (
    EngineSpec,
    LocalEngine,
    run_engine_module,
    stop_engines,
)
from services.runtime.redis_server import RedisServer, free_port
from services.runtime.store import Store
from tests.router.conftest import RunningRouter, StartRouter, complete, register, wait_until

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODELS = {"tiny-a": 0, "tiny-b": 1}  # served name -> weight seed
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
CHAT = [{"role": "user", "content": "What is the plan?"}]
# A long call: 128 sampled sequences of 240 tokens (the context holds 256), about 5 s here. One
# greedy sequence of 240 tokens takes only ~0.4 s on the tiny model: too short to tell a call
# cut short from one that ran to its end.
LONG: dict[str, Any] = {
    "prompt": "long", "max_tokens": 240, "ignore_eos": True, "temperature": 1.0, "seed": 0,
    "n": 128,
}  # fmt: skip
LONG_TOKENS = 128 * 240


@pytest.fixture(scope="module")
def model_dirs(vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The weights of each tiny model, written once."""
    root = tmp_path_factory.mktemp("router-models")
    for name, seed in MODELS.items():
        run_engine_module(
            "services.profiler.tiny_model", ["--out", str(root / name), "--seed", str(seed)]
        )
    return {name: root / name for name in MODELS}


@pytest.fixture(scope="module")
def engines(
    vllm: Path, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, LocalEngine]]:
    """One engine of each model, both started at once."""
    root = tmp_path_factory.mktemp("router-engines")
    started = {
        name: LocalEngine(EngineSpec.cpu(model_dirs[name], name), root / f"{name}.log", vllm=vllm)
        for name in MODELS
    }
    try:
        for engine in started.values():
            engine.start()
        deadline = time.monotonic() + 300
        for engine in started.values():
            engine.wait_ready(deadline)
        yield started
    finally:
        stop_engines(list(started.values()))


@pytest.fixture
def own_engine(vllm: Path, model_dirs: dict[str, Path], tmp_path: Path) -> Iterator[LocalEngine]:
    """An engine of tiny-a for one test alone (one that kills it), stopped after the test."""
    with LocalEngine(
        EngineSpec.cpu(model_dirs["tiny-a"], "tiny-a"), tmp_path / "own.log", vllm=vllm
    ) as engine:
        engine.start()
        engine.wait_ready(time.monotonic() + 300)
        yield engine


@pytest.fixture
def start_router(start_router: StartRouter) -> StartRouter:
    """Routers over these engines: a health check may take up to 5 s to answer. On two cores
    shared by several engines, an idle engine's ``/health`` can take over a second while another
    generates, which must not eject it."""

    async def start(**overrides: Any) -> RunningRouter:
        return await start_router(**{"health_timeout_s": 5.0, **overrides})

    return start


@pytest.fixture
async def routed(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> RunningRouter:
    """A router over both engines, registered as replicas ``tiny-a-0`` and ``tiny-b-0``."""
    for name, engine in engines.items():
        await register(store, name, engine.base_url)
    return await start_router(health_interval_s=0.2, upstream_timeout_s=60)


def _openai(url: str, key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _long_request(model: str) -> router_pb2.GenerateRequest:
    """``LONG`` as a gRPC request."""
    extra = {k: LONG[k] for k in ("ignore_eos", "seed", "n")}
    return generate_request(
        model, prompt=LONG["prompt"], max_tokens=LONG["max_tokens"],
        temperature=LONG["temperature"], extra_json=json.dumps(extra),
    )  # fmt: skip


@dataclass(frozen=True)
class _EngineCounts:
    running: float  # requests being generated (a call of n sequences counts n)
    generated: float  # tokens generated so far
    calls: float  # HTTP calls received on the completion routes, whatever their answer


async def _engine_counts(
    session: aiohttp.ClientSession, replicas: Sequence[LocalEngine]
) -> _EngineCounts:
    """The engines' own Prometheus counts, summed over ``replicas``."""
    totals = {"vllm:num_requests_running": 0.0, "vllm:generation_tokens_total": 0.0, "calls": 0.0}
    for engine in replicas:
        async with session.get(engine.base_url + "/metrics") as reply:
            text = await reply.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals:
                    totals[sample.name] += sample.value
                elif sample.name == "http_requests_total" and sample.labels.get("handler") in (
                    "/v1/completions",
                    "/v1/chat/completions",
                ):
                    totals["calls"] += sample.value
    return _EngineCounts(
        running=totals["vllm:num_requests_running"],
        generated=totals["vllm:generation_tokens_total"],
        calls=totals["calls"],
    )


async def _wait_generating(session: aiohttp.ClientSession, replicas: Sequence[LocalEngine]) -> None:
    """Wait until ``replicas`` run a request. Only for ``LONG`` calls: while an engine generates,
    its metrics endpoint can take most of a second to answer, too late to see a short call."""
    deadline = time.monotonic() + 10
    while not (await _engine_counts(session, replicas)).running:
        assert time.monotonic() < deadline, "the engine never started generating"
        await asyncio.sleep(0.02)


async def _assert_cut_short(
    session: aiohttp.ClientSession, replicas: Sequence[LocalEngine], before: _EngineCounts
) -> None:
    """The one ``LONG`` call sent to ``replicas`` since ``before`` was aborted there: the engine
    finished handling it and runs nothing, having generated only part of its tokens."""
    deadline = time.monotonic() + 10
    while True:
        now = await _engine_counts(session, replicas)
        if now.calls > before.calls and not now.running:
            break
        assert time.monotonic() < deadline, "the engine kept the call"
        await asyncio.sleep(0.05)
    assert now.calls - before.calls == 1
    assert now.generated - before.generated < LONG_TOKENS, "the call ran to its end"


async def _post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, Any]:
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


async def _post_raw(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    async with session.post(url, json=body) as reply:
        return await reply.read()


async def _sse(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> AsyncIterator[bytes]:
    """The bytes of a streamed answer as they arrive."""
    async with session.post(url, json=body) as reply:
        assert reply.status == 200
        async for piece in reply.content.iter_any():
            yield piece


async def _read(pieces: AsyncIterator[Any], begun: asyncio.Event) -> list[Any]:
    """Read a stream to its end, setting ``begun`` at its first piece (the engine generates)."""
    got = []
    async for piece in pieces:
        begun.set()
        got.append(piece)
    return got


# ------------------------------------------------------------------ answers equal the engine's
async def _workflow(client: openai.AsyncOpenAI, question: str) -> list[str]:
    """A small workflow: a chat answer from tiny-a, then two tiny-b completions built on it,
    one streamed and one not."""
    first = await client.chat.completions.create(
        model="tiny-a", messages=[{"role": "user", "content": question}], **GREEDY
    )
    draft = first.choices[0].message.content or ""
    review = await client.completions.create(model="tiny-b", prompt="Review: " + draft, **GREEDY)
    stream = await client.completions.create(
        model="tiny-b", prompt="Summarise: " + draft, stream=True, **GREEDY
    )
    summary = "".join([c.choices[0].text async for c in stream if c.choices])
    return [draft, review.choices[0].text, summary]


async def test_openai_workflow_through_the_router_equals_the_engines(
    routed: RunningRouter, engines: dict[str, LocalEngine]
) -> None:
    direct_a, direct_b = engines["tiny-a"].base_url, engines["tiny-b"].base_url
    async with (
        _openai(routed.http_url) as via_router,
        _openai(direct_a) as a,
        _openai(direct_b) as b,
    ):
        question = [{"role": "user", "content": "What is the capital of France?"}]
        with workflow_request("review", "q1") as request:
            got = await _workflow(request.bind(via_router), question[0]["content"])
        first = await a.chat.completions.create(model="tiny-a", messages=question, **GREEDY)
        want_draft = first.choices[0].message.content
        want_review = (
            (await b.completions.create(model="tiny-b", prompt="Review: " + got[0], **GREEDY))
            .choices[0]
            .text
        )
        want_summary = (
            (await b.completions.create(model="tiny-b", prompt="Summarise: " + got[0], **GREEDY))
            .choices[0]
            .text
        )
    assert got == [want_draft, want_review, want_summary]
    assert all(got), "the tiny models answered something"
    calls = await routed.trace(3)
    assert [c["model"] for c in calls] == ["tiny-a", "tiny-b", "tiny-b"]
    assert {(c["workflow"], c["request_id"], c["status"]) for c in calls} == {
        ("review", "q1", "ok")
    }
    assert [c["completion_tokens"] for c in calls] == [8, 8, 8] or all(
        0 < c["completion_tokens"] <= 8 for c in calls
    )  # 8 unless a model emitted its end token first
    assert calls[2]["ttft"] is not None


async def test_openai_answers_streamed_or_not_equal_the_engines(
    routed: RunningRouter, engines: dict[str, LocalEngine]
) -> None:
    async with _openai(routed.http_url) as via_router, _openai(engines["tiny-a"].base_url) as a:
        for limit in ({"max_tokens": 3}, {}):  # {}: the engine's own default length
            got = await via_router.chat.completions.create(
                model="tiny-a", messages=CHAT, temperature=0, **limit
            )  # type: ignore[call-overload]
            want = await a.chat.completions.create(
                model="tiny-a", messages=CHAT, temperature=0, **limit
            )  # type: ignore[call-overload]
            assert got.choices[0].message.content == want.choices[0].message.content
            assert got.usage == want.usage

        stream = await via_router.chat.completions.create(
            model="tiny-a", messages=CHAT, stream=True, **GREEDY
        )
        chunks = [c async for c in stream]
        want = await a.chat.completions.create(model="tiny-a", messages=CHAT, **GREEDY)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == want.choices[0].message.content
        # The router asked the engine for usage (for the trace) but the client did not:
        assert all(c.usage is None for c in chunks)
        chat_usage = want.usage

        stream = await via_router.completions.create(
            model="tiny-a", prompt="The router", stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )  # fmt: skip
        chunks = [c async for c in stream]
        text = await a.completions.create(model="tiny-a", prompt="The router", **GREEDY)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
        assert chunks[-1].usage == text.usage
        models = await via_router.models.list()
        assert [m.id for m in models.data] == ["tiny-a", "tiny-b"]
    calls = await routed.trace(4)
    assert chat_usage is not None
    assert (calls[2]["prompt_tokens"], calls[2]["completion_tokens"]) == (
        chat_usage.prompt_tokens, chat_usage.completion_tokens,
    )  # fmt: skip
    for call in calls[2:]:
        assert call["ttft"] is not None and 0 <= call["ttft"] <= call["end"] - call["start"]
    # untagged calls are traced as single-call requests
    assert {c["workflow"] for c in calls} == {"untagged"}
    assert all(c["request_id"] == c["call_id"] for c in calls)


async def test_tagged_clients_tag_the_calls_of_the_current_request_only(
    routed: RunningRouter,
) -> None:
    base = routed.http_url + "/v1"
    async with openai.AsyncOpenAI(
        base_url=base, api_key="x", http_client=tagged_async_http_client(), max_retries=0
    ) as client:
        with workflow_request("agent", "a-1"):
            # tasks started inside the request inherit it
            await asyncio.gather(*(client.completions.create(model="tiny-a", prompt="x", **GREEDY)
                                   for _ in range(2)))  # fmt: skip
        await client.completions.create(model="tiny-a", prompt="untagged", **GREEDY)
    async with _openai(routed.http_url) as plain:
        with workflow_request("rag", "r-1") as request:
            await request.bind(plain).chat.completions.create(
                model="tiny-b", messages=CHAT, **GREEDY
            )
            await plain.completions.create(
                model="tiny-b", prompt="p", extra_headers=request.headers, **GREEDY
            )

    def sync_calls() -> None:
        with (
            openai.OpenAI(
                base_url=base, api_key="x", http_client=tagged_http_client(), max_retries=0
            ) as client,
            workflow_request("agent", "a-2"),
        ):
            client.completions.create(model="tiny-a", prompt="x", **GREEDY)

    await asyncio.to_thread(sync_calls)
    calls = await routed.trace(6)
    assert [(c["workflow"], c["request_id"] if c["workflow"] != "untagged" else None)
            for c in calls] == [("agent", "a-1"), ("agent", "a-1"), ("untagged", None),
                                ("rag", "r-1"), ("rag", "r-1"), ("agent", "a-2")]  # fmt: skip
    assert {c["status"] for c in calls} == {"ok"}


async def test_grpc_client_equals_the_engine(
    routed: RunningRouter, engines: dict[str, LocalEngine]
) -> None:
    prompt = "The planner splits the GPUs"
    async with _openai(engines["tiny-b"].base_url) as direct:
        want = (await direct.completions.create(model="tiny-b", prompt=prompt, **GREEDY)).choices[0]
        want_chat = await direct.chat.completions.create(model="tiny-b", messages=CHAT, **GREEDY)
    async with RouterClient(routed.grpc_target) as client:
        assert await client.list_models() == ["tiny-a", "tiny-b"]
        with workflow_request("grpc-wf", "g-1"):
            unary = await client.generate(generate_request("tiny-b", prompt=prompt, max_tokens=8))
            chunks = [
                c
                async for c in client.generate_stream(
                    generate_request("tiny-b", prompt=prompt, max_tokens=8)
                )
            ]
            chat = await client.generate(generate_request("tiny-b", messages=CHAT, max_tokens=8))
    assert unary.text == want.text
    assert "".join(c.text for c in chunks) == want.text
    assert unary.finish_reason == chunks[-1].finish_reason == want.finish_reason
    assert unary.usage.completion_tokens == chunks[-1].usage.completion_tokens > 0
    assert chat.text == want_chat.choices[0].message.content
    assert want_chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        want_chat.usage.prompt_tokens, want_chat.usage.completion_tokens,
    )  # fmt: skip
    calls = await routed.trace(3)
    assert [(c["workflow"], c["request_id"]) for c in calls] == [("grpc-wf", "g-1")] * 3
    assert calls[0]["call_id"] == unary.id
    assert calls[1]["ttft"] is not None


async def test_grpc_request_fields_reach_the_engine(
    routed: RunningRouter, engines: dict[str, LocalEngine]
) -> None:
    # Seeded sampling repeats itself: the same fields sent to the engine directly give the same
    # answer, and one field lost on the way (seed, top_k, ignore_eos, ...) would change it.
    request = generate_request(
        "tiny-a", prompt="x", max_tokens=12, temperature=1.0, stop=["\n"],
        extra_json='{"top_k": 3, "ignore_eos": true}',
    )  # fmt: skip
    request.seed = 7
    async with RouterClient(routed.grpc_target) as client:
        got = await client.generate(request)
    async with _openai(engines["tiny-a"].base_url) as direct:
        want = await direct.completions.create(
            model="tiny-a", prompt="x", max_tokens=12, temperature=1.0, stop=["\n"], seed=7,
            extra_body={"top_k": 3, "ignore_eos": True},
        )  # fmt: skip
    assert (got.text, got.finish_reason) == (want.choices[0].text, want.choices[0].finish_reason)
    assert want.usage is not None
    assert got.usage.completion_tokens == want.usage.completion_tokens


async def test_sync_grpc_client(routed: RunningRouter, engines: dict[str, LocalEngine]) -> None:
    def drive() -> tuple[str, str, list[str]]:
        with SyncRouterClient(routed.grpc_target) as client, workflow_request("sync", "s-1"):
            request = generate_request("tiny-a", prompt="x", max_tokens=8)
            unary = client.generate(request).text
            streamed = "".join(c.text for c in client.generate_stream(request))
            return unary, streamed, client.list_models()

    unary, streamed, models = await asyncio.to_thread(drive)
    async with _openai(engines["tiny-a"].base_url) as direct:
        want = (await direct.completions.create(model="tiny-a", prompt="x", **GREEDY)).choices[0]
    assert unary == streamed == want.text
    assert models == ["tiny-a", "tiny-b"]
    calls = await routed.trace(2)
    assert {(c["workflow"], c["request_id"]) for c in calls} == {("sync", "s-1")}


# ------------------------------------------------------------------------------- errors, keys
async def test_bad_input_gets_clear_errors_and_the_router_keeps_serving(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    replicas = [engines["tiny-a"]]
    await register(store, "tiny-a", *(e.base_url for e in replicas))
    handle = await start_router(max_body_bytes=4096)
    url = handle.http_url
    bad = [  # path, body, status, in the message
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b'{"model": "tiny-a", "prompt": "x", "max_tokens": "5"}', 400,
         "integer"),
        ("/v1/chat/completions", b'{"model": "tiny-a", "messages": "hi"}', 400, "list"),
        ("/v1/completions", b'{"model": "gpt-none", "prompt": "x"}', 404, "gpt-none"),
        ("/v1/completions", json.dumps({"model": "tiny-a", "prompt": "x" * 9000}).encode(), 413,
         ""),
    ]  # fmt: skip
    async with (
        aiohttp.ClientSession() as session,
        _openai(url) as client,
        RouterClient(handle.grpc_target) as grpc_client,
    ):
        before = await _engine_counts(session, replicas)
        for path, body, status, needle in bad:
            got, answer = await _post(session, url + path, body)
            assert (got, set(answer["error"])) == (status, {"message", "type", "param", "code"})
            assert needle in answer["error"]["message"]
            reply = await client.completions.create(model="tiny-a", prompt="still", **GREEDY)
            assert reply.choices[0].finish_reason, f"not serving after {body[:40]!r}"
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-none", messages=CHAT)
        assert caught.value.code == "404"  # vLLM's shape: the HTTP status (openai: a string)
        for request_, code in (
            (router_pb2.GenerateRequest(model="gpt-none", prompt="x"), grpc.StatusCode.NOT_FOUND),
            (
                generate_request("tiny-a", prompt="x", extra_json='{"stream": true}'),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as rpc_error:
                await grpc_client.generate(request_)
            assert rpc_error.value.code() == code
        served = await grpc_client.generate(generate_request("tiny-a", prompt="x", max_tokens=4))
        assert served.finish_reason
        # Only the valid calls reached an engine (it counts a call once it has answered it).
        valid = before.calls + len(bad) + 1
        deadline = time.monotonic() + 5
        while (after := await _engine_counts(session, replicas)).calls < valid:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert after.calls == valid


async def test_engine_errors_are_forwarded_over_http_and_mapped_over_grpc(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    engine = engines["tiny-a"]
    await register(store, "tiny-a", engine.base_url)
    await register(store, "alias", engine.base_url)  # a name the engine does not serve
    handle = await start_router()
    too_long = json.dumps({"model": "tiny-a", "prompt": "x", "max_tokens": 1000}).encode()
    async with aiohttp.ClientSession() as session:
        want = await _post(session, engine.base_url + "/v1/completions", too_long)
        assert want[0] == 400  # beyond the engine's 256-token context
        assert await _post(session, handle.http_url + "/v1/completions", too_long) == want
        status, _, answer = await complete(session, handle, "alias")
        assert (status, answer["error"]["code"]) == (404, 404)  # the engine's own answer
        assert "alias" in answer["error"]["message"]
    async with RouterClient(handle.grpc_target) as client:
        for request_, code in (
            (generate_request("tiny-a", prompt="x", max_tokens=1000), "INVALID_ARGUMENT"),
            (generate_request("alias", prompt="x"), "NOT_FOUND"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate(request_)
            assert caught.value.code().name == code
            assert "engine answered" in (caught.value.details() or "")


async def test_api_keys_are_required_on_both_front_ends_and_never_logged(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    await register(store, "tiny-a", engines["tiny-a"].base_url)
    secret = "sk-test-0123456789"
    with capture_logs() as logs:
        handle = await start_router(api_keys=f"{secret}, other-key")
        assert secret not in repr(handle.router.config)
        async with _openai(handle.http_url, key="wrong") as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.completions.create(model="tiny-a", prompt="x", **GREEDY)
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        async with aiohttp.ClientSession() as session:
            body = b'{"model": "tiny-a", "prompt": "x"}'
            status, answer = await _post(session, handle.http_url + "/v1/completions", body)
            assert (status, answer["error"]["code"]) == (401, 401)
            async with session.get(handle.http_url + "/metrics") as reply:
                assert reply.status == 200  # metrics need no key
        async with _openai(handle.http_url, key=secret) as right:
            reply = await right.completions.create(model="tiny-a", prompt="x", **GREEDY)
            assert reply.choices[0].text
        for key in (None, "wrong"):
            async with RouterClient(handle.grpc_target, api_key=key) as client:
                for rpc in (
                    client.list_models(),
                    client.generate(generate_request("tiny-a", prompt="x", max_tokens=4)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await rpc
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with RouterClient(handle.grpc_target, api_key="other-key") as client:
            assert await client.list_models() == ["tiny-a"]
            answer = await client.generate(generate_request("tiny-a", prompt="x", max_tokens=4))
            assert answer.finish_reason
    assert secret not in repr(logs)
    assert handle.metric("scepsy_router_unauthenticated_total") == 3 + 4


async def test_metrics_expose_requests_latency_ttft_and_in_flight(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    await register(store, "tiny-b", engines["tiny-b"].base_url)
    handle = await start_router()
    async with _openai(handle.http_url) as client:
        await client.completions.create(model="tiny-b", prompt="x", **GREEDY)
        stream = await client.completions.create(model="tiny-b", prompt="x", stream=True, **GREEDY)
        _ = [c async for c in stream]
    async with (
        aiohttp.ClientSession() as session,
        session.get(handle.http_url + "/metrics") as reply,
    ):
        text = await reply.text()
    assert 'scepsy_router_requests_total{api="http",model="tiny-b",status="ok"} 2.0' in text
    assert 'scepsy_router_request_seconds_count{model="tiny-b"} 2.0' in text
    assert 'scepsy_router_ttft_seconds_count{model="tiny-b"} 1.0' in text
    assert 'scepsy_router_in_flight{model="tiny-b",replica="tiny-b-0"} 0.0' in text
    assert 'scepsy_router_replica_healthy{model="tiny-b",replica="tiny-b-0"} 1.0' in text
    assert "scepsy_router_trace_dropped_total 0.0" in text


# ------------------------------------------------------------------ replicas and routing
async def test_endpoints_update_live_without_restart(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    handle = await start_router(refresh_s=30.0)  # only the pub/sub event can bring the change
    async with aiohttp.ClientSession() as session:
        assert (await complete(session, handle, "tiny-b", **GREEDY))[0] == 404
        await store.put_endpoint(Endpoint("tiny-b", "r0", engines["tiny-b"].base_url))
        await wait_until(lambda: handle.router.registry.models() == ["tiny-b"])
        status, headers, answer = await complete(session, handle, "tiny-b", **GREEDY)
        assert (status, headers["x-scepsy-replica"]) == (200, "r0")
        assert answer["choices"][0]["text"]
        await store.remove_endpoint("tiny-b", "r0")
        await wait_until(lambda: handle.router.registry.models() == [])
        assert (await complete(session, handle, "tiny-b", **GREEDY))[0] == 404


async def test_affinity_policy_keeps_a_workflow_request_on_one_replica(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    url = engines["tiny-b"].base_url
    await register(store, "tiny-b", url, url)  # replicas tiny-b-0 and tiny-b-1, one engine
    handle = await start_router(policy="affinity")
    homes = set()
    async with aiohttp.ClientSession() as session:
        for request in range(6):
            tags = {"x-scepsy-workflow": "wf", "x-scepsy-request-id": f"r{request}"}
            served = {(await complete(session, handle, "tiny-b", tags, max_tokens=2))[1]
                      ["x-scepsy-replica"] for _ in range(3)}  # fmt: skip
            assert len(served) == 1
            homes |= served
    assert len(homes) > 1  # different requests land on different replicas


async def test_capacity_weighted_policy_prefers_the_larger_replica(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    url = engines["tiny-b"].base_url
    await store.put_endpoint(Endpoint("tiny-b", "small", url, 0.25))
    await store.put_endpoint(Endpoint("tiny-b", "large", url, 1.0))
    handle = await start_router(policy="capacity-weighted")
    async with aiohttp.ClientSession() as session:
        served = [
            (await complete(session, handle, "tiny-b", max_tokens=2))[1]["x-scepsy-replica"]
            for _ in range(4)
        ]
    assert served == ["large"] * 4  # idle: the larger replica serves every call


# ------------------------------------------------------- backpressure, deadlines, cancellation
async def test_beyond_in_flight_limit_and_queue_calls_are_turned_away_with_a_retry_hint(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    # One replica taking one call at a time, one call may wait, for at most 0.5 s: a long
    # generation holds the slot, a short call waits, further calls are turned away at once,
    # and the waiting call gives up long before the long one would end.
    engine = engines["tiny-a"]
    await register(store, "tiny-a", engine.base_url)
    handle = await start_router(
        max_in_flight=1, queue_size=1, queue_timeout_s=0.5, retry_after_s=2.0
    )
    short: dict[str, Any] = {"prompt": "x", "max_tokens": 2}
    async with aiohttp.ClientSession() as session, RouterClient(handle.grpc_target) as client:
        before = await _engine_counts(session, [engine])
        long_call = asyncio.create_task(complete(session, handle, "tiny-a", **LONG))
        await wait_until(
            lambda: handle.metric('scepsy_router_in_flight{model="tiny-a",replica="tiny-a-0"}') == 1
        )
        queued = asyncio.create_task(complete(session, handle, "tiny-a", **short))
        await wait_until(lambda: handle.metric('scepsy_router_queue_length{model="tiny-a"}') == 1)
        status, headers, answer = await complete(session, handle, "tiny-a", **short)
        assert (status, headers["Retry-After"]) == (429, "2")
        assert answer["error"]["type"] == "rate_limit_error"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(generate_request("tiny-a", prompt="x", max_tokens=2))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after-ms", "2000") in tuple(caught.value.trailing_metadata() or ())
        status, _, answer = await queued
        assert (status, answer["error"]["code"]) == (429, 429)
        assert "within 0.5 s" in answer["error"]["message"]
        assert not long_call.done()
        long_call.cancel()  # its client goes away: the engine stops, the slot is free again
        with pytest.raises(asyncio.CancelledError):
            await long_call
        await _assert_cut_short(session, [engine], before)  # no turned-away call reached it
        assert (await complete(session, handle, "tiny-a", **short))[0] == 200
    rejected = 'scepsy_router_requests_total{{api="{}",model="tiny-a",status="rejected"}}'
    assert [handle.metric(rejected.format(api)) for api in ("http", "grpc")] == [2, 1]


async def test_queue_hands_freed_slots_to_waiting_calls(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    # Eight calls, two at a time: the rest wait in the queue and each takes a freed slot. The
    # limit is watched at the router (in-process, every few ms): the engine's own metrics
    # endpoint answers too late to see calls this short.
    await register(store, "tiny-b", engines["tiny-b"].base_url)
    handle = await start_router(max_in_flight=2, queue_size=100)
    in_flight = 'scepsy_router_in_flight{model="tiny-b",replica="tiny-b-0"}'
    queued = 'scepsy_router_queue_length{model="tiny-b"}'
    seen: set[tuple[float, float]] = set()
    async with aiohttp.ClientSession() as session:
        calls = asyncio.gather(*(
            complete(session, handle, "tiny-b", prompt=f"q{i}", max_tokens=120, ignore_eos=True)
            for i in range(8)
        ))  # fmt: skip
        while not calls.done():
            seen.add((handle.metric(in_flight), handle.metric(queued)))
            await asyncio.sleep(0.005)
        results = await calls
    assert [(status, answer["usage"]["completion_tokens"]) for status, _, answer in results] == [
        (200, 120)
    ] * 8
    assert max(running for running, _ in seen) == 2
    assert max(waiting for _, waiting in seen) >= 1
    assert handle.router.dispatcher.active == 0


async def test_deadlines_end_the_call_and_abort_the_generation(
    engines: dict[str, LocalEngine], start_router: StartRouter, store: Store
) -> None:
    # The router's own upstream deadline: 504 over HTTP, DEADLINE_EXCEEDED over gRPC; and a
    # gRPC client's shorter deadline bounds the engine call of a patient router.
    engine = engines["tiny-a"]
    await register(store, "tiny-a", engine.base_url)
    hasty = await start_router(upstream_timeout_s=0.5, connect_timeout_s=0.5)
    patient = await start_router()
    async with (
        aiohttp.ClientSession() as session,
        RouterClient(hasty.grpc_target) as hasty_client,
        RouterClient(patient.grpc_target) as patient_client,
    ):
        before = await _engine_counts(session, [engine])
        started = time.monotonic()
        status, _, answer = await complete(session, hasty, "tiny-a", **LONG)
        assert (status, answer["error"]["code"]) == (504, 504)
        assert time.monotonic() - started < 3.0  # long before the generation would end
        await _assert_cut_short(session, [engine], before)

        for client, deadline_s in ((hasty_client, None), (patient_client, 0.5)):
            before = await _engine_counts(session, [engine])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.generate(_long_request("tiny-a"), deadline_s=deadline_s)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _assert_cut_short(session, [engine], before)
    calls = await hasty.trace(3)  # both routers record to the namespace's one stream
    assert [c["status"] for c in calls[:2]] == ["error"] * 2
    # At the client's deadline gRPC cancels the call, racing the router's own timer for it.
    assert calls[2]["status"] in ("error", "cancelled")


@pytest.mark.parametrize(("front", "stream"), [("http", False), ("http", True), ("grpc", True)])
async def test_a_client_going_away_aborts_the_generation(
    engines: dict[str, LocalEngine],
    start_router: StartRouter,
    store: Store,
    front: str,
    stream: bool,
) -> None:
    engine = engines["tiny-a"]
    await register(store, "tiny-a", engine.base_url)
    handle = await start_router()
    url, body = handle.http_url + "/v1/completions", {"model": "tiny-a", "stream": stream, **LONG}
    begun = asyncio.Event()
    async with aiohttp.ClientSession() as session, RouterClient(handle.grpc_target) as client:
        before = await _engine_counts(session, [engine])
        call: asyncio.Task[Any]
        if front == "grpc":
            chunks = client.generate_stream(_long_request("tiny-a"))
            call = asyncio.create_task(_read(chunks, begun))
        elif stream:
            call = asyncio.create_task(_read(_sse(session, url, body), begun))
        else:
            call = asyncio.create_task(_post_raw(session, url, body))
        if stream:
            await asyncio.wait_for(begun.wait(), timeout=30)
        else:
            await _wait_generating(session, [engine])
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await _assert_cut_short(session, [engine], before)
    calls = await handle.trace(1)
    assert calls[0]["status"] == "cancelled"
    await wait_until(lambda: handle.router.dispatcher.active == 0)


# -------------------------------------------------------------------------------- tracing
async def test_known_structure_gives_n_and_p(routed: RunningRouter, tmp_path: Path) -> None:
    # Each request: 1 call to tiny-a, then 4 parallel equal-length calls to tiny-b (one engine
    # batches them). So n_a = 1 and n_b = 4 exactly; p_a = 1 (one call at a time); the four
    # tiny-b calls are in flight together (their intervals share an instant), so 1 < p_b <= 4;
    # how close to 4 depends on how the shared CPU cores start and end them.
    # tiny-a runs before tiny-b: stages [a] then [b]. One more untagged call is its own request.
    # 200 tokens each (~0.4 s): long enough that the four fan-out calls always overlap
    fixed = {"temperature": 0, "max_tokens": 200, "extra_body": {"ignore_eos": True}}
    async with _openai(routed.http_url) as client:
        for n in range(3):
            with workflow_request("fanout", f"r{n}") as request:
                tagged = request.bind(client)
                await tagged.completions.create(model="tiny-a", prompt="plan", **fixed)
                await asyncio.gather(*(
                    tagged.completions.create(model="tiny-b", prompt=f"part {i}", **fixed)
                    for i in range(4)
                ))  # fmt: skip
        await client.completions.create(model="tiny-a", prompt="an untagged call", **fixed)
    calls = await routed.trace(16)
    assert len(calls) == 16
    for n in range(3):
        fanout = [c for c in calls if c["request_id"] == f"r{n}" and c["model"] == "tiny-b"]
        assert max(c["start"] for c in fanout) < min(c["end"] for c in fanout)
    assert all(c["completion_tokens"] == 200 and c["prompt_tokens"] > 0 for c in calls)

    out = tmp_path / "trace.jsonl"  # `scepsy trace export` writes what the planner reads
    args = argparse.Namespace(
        out=str(out), redis_url=routed.router.config.redis_url,
        namespace=routed.router.config.namespace, json=False,
    )  # fmt: skip
    assert await asyncio.to_thread(trace_cli.run_export, args) == 0
    exported = workflow_stats(read_trace(out))
    assert exported == workflow_stats(parse_trace_lines(json.dumps(c) for c in calls))
    stats = {w.workflow: w for w in exported}
    fanout_stats = stats["fanout"]
    assert fanout_stats.requests == 3
    assert fanout_stats.llm("tiny-a").n == 1.0 and fanout_stats.llm("tiny-b").n == 4.0
    assert fanout_stats.llm("tiny-a").p == 1.0
    assert 1.0 < fanout_stats.llm("tiny-b").p <= 4.0
    assert fanout_stats.stages == (("tiny-a",), ("tiny-b",))
    untagged = stats["untagged"]
    assert (untagged.requests, untagged.llm("tiny-a").n) == (1, 1.0)


class _State(TypedDict):
    question: str
    draft: str
    review: str


async def test_langgraph_graph_calls_two_models_through_the_router(
    routed: RunningRouter, engines: dict[str, LocalEngine]
) -> None:
    async with tagged_async_http_client() as http:

        def llm(model: str) -> ChatOpenAI:
            return ChatOpenAI(
                model=model, base_url=routed.http_url + "/v1", api_key="x", temperature=0,
                max_completion_tokens=8, max_retries=0, http_async_client=http,
            )  # fmt: skip

        drafter, reviewer = llm("tiny-a"), llm("tiny-b")

        async def draft(state: _State) -> dict[str, str]:
            reply = await drafter.ainvoke([HumanMessage(state["question"])])
            return {"draft": str(reply.content)}

        async def review(state: _State) -> dict[str, str]:
            reply = await reviewer.ainvoke([HumanMessage("Review: " + state["draft"])])
            return {"review": str(reply.content)}

        graph = StateGraph(_State)
        graph.add_node("draft", draft)
        graph.add_node("review", review)
        graph.add_edge(START, "draft")
        graph.add_edge("draft", "review")
        graph.add_edge("review", END)
        app = graph.compile()
        with workflow_request("langgraph", "g1"):
            result = await app.ainvoke(
                {"question": "How many GPUs does the plan use?", "draft": "", "review": ""}
            )

    async with _openai(engines["tiny-b"].base_url) as direct:
        want = await direct.chat.completions.create(
            model="tiny-b", messages=[{"role": "user", "content": "Review: " + result["draft"]}],
            **GREEDY,
        )  # fmt: skip
    assert result["review"] == want.choices[0].message.content
    calls = await routed.trace(2)
    assert [(c["model"], c["workflow"], c["request_id"]) for c in calls] == [
        ("tiny-a", "langgraph", "g1"), ("tiny-b", "langgraph", "g1"),
    ]  # fmt: skip


async def test_redis_outage_keeps_serving_counts_drops_and_resumes(
    engines: dict[str, LocalEngine], start_router: StartRouter
) -> None:
    # One replica: calls alternating between engines can take ~1 s each on two shared cores
    # (an engine's workers keep polling for a second after each call), which would hide
    # whether calls waited on Redis.
    url = engines["tiny-a"].base_url
    redis = RedisServer().start()
    store = Store.connect(redis.url, timeout_s=1.0, namespace="outage")
    try:
        await register(store, "tiny-a", url)
        handle = await start_router(redis_url=redis.url, namespace="outage", redis_timeout_s=2.0)
        recorder = handle.router.recorder
        async with _openai(handle.http_url) as client:
            for _ in range(3):
                await client.completions.create(model="tiny-a", prompt="before", **GREEDY)
            assert len(await handle.trace(3)) == 3

            redis.stop()
            started = time.monotonic()
            for _ in range(5):
                reply = await client.completions.create(model="tiny-a", prompt="during", **GREEDY)
                assert reply.choices[0].text
            assert time.monotonic() - started < 5.0  # no call waited on Redis (2 s timeout)
            await wait_until(lambda: recorder.dropped >= 5, timeout_s=20)
            assert handle.metric("scepsy_router_trace_dropped_total") == 5

            # Restarted empty (no persistence), and nobody registers the endpoint again: the
            # router keeps its replica (the table's epoch is gone, not a removal) and writes it
            # back to the store.
            redis = RedisServer(port=redis.port).start()
            await store.close()
            store = Store.connect(redis.url, timeout_s=1.0, namespace="outage")
            restores = handle.metric("scepsy_router_endpoint_restores_total")
            for _ in range(3):
                reply = await client.completions.create(model="tiny-a", prompt="after", **GREEDY)
                assert reply.choices[0].text
            assert handle.router.registry.models() == ["tiny-a"]
            models = await client.models.list()
            assert [m.id for m in models.data] == ["tiny-a"]

            deadline = time.monotonic() + 15  # the router writes the endpoint back
            while [(e.model, e.url) for e in await store.list_endpoints()] != [("tiny-a", url)]:
                assert time.monotonic() < deadline, "the router did not write the endpoint back"
                await asyncio.sleep(0.1)
            assert handle.metric("scepsy_router_endpoint_restores_total") == restores + 1
            for _ in range(2):
                await client.completions.create(model="tiny-a", prompt="later", **GREEDY)
            calls = await handle.trace(5, timeout_s=10)
        assert [c["status"] for c in calls] == ["ok"] * 5
        assert recorder.dropped == 5
        # the count follows the stream write the trace read above already saw
        await wait_until(lambda: recorder.recorded == 8, timeout_s=10)
        # the 3 records written before the restart vanished with Redis, and are counted
        await wait_until(lambda: recorder.lost == 3, timeout_s=10)
    finally:
        await store.close()
        redis.stop()


# ------------------------------------------------------------------------ shutdown, failure
async def test_sigterm_refuses_new_calls_finishes_in_flight_calls_and_exits(
    engines: dict[str, LocalEngine], store: Store, redis_url: str, namespace: str
) -> None:
    # The in-flight call (``LONG``, ~5 s here) outlasts the 0.2 s drain and fits in the 30 s
    # grace. It is streamed, so its first chunk tells that the engine generates.
    engine = engines["tiny-b"]
    await register(store, "tiny-b", engine.base_url)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.router", "--redis-url", redis_url,
        "--namespace", namespace, "--http-port", str(port), "--drain-s", "0.2",
        "--grace-s", "30", "--log-format", "json",
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_serving(url)
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny-b", **LONG, "stream": True}  # ~5 s: outlives the drain
            begun = asyncio.Event()
            streamed = _sse(session, url + "/v1/completions", body)
            in_flight = asyncio.create_task(_read(streamed, begun))
            await asyncio.wait_for(begun.wait(), timeout=30)
            process.send_signal(signal.SIGTERM)
            await _wait_draining(url, drain_s=0.2)  # past drain_s: new calls get 503...
            assert not in_flight.done()  # ...while the call still runs
            events = b"".join(await in_flight).decode().split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            finished = [
                c["finish_reason"] for e in events[:-2] for c in json.loads(e[6:])["choices"]
            ]
            assert finished.count("length") == LONG["n"]  # every sequence ran to its end
            assert await asyncio.wait_for(process.wait(), 15) == 0  # then it exits
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert '"event": "router_stopped"' in logs


async def _wait_serving(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "router did not start"
            await asyncio.sleep(0.1)


async def _wait_draining(url: str, drain_s: float, timeout_s: float = 5.0) -> None:
    """Wait until the router's ``/health`` answers 503 (the drain began; calls are still served
    for ``drain_s``), let ``drain_s`` pass, then check that a new call gets a 503 with
    ``Retry-After`` (the call in flight, ~5 s, is still running) rather than a refused
    connection. A call inside the window would queue behind the busy engine, hence the wait."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as fresh:
        while True:
            async with fresh.get(url + "/health") as reply:
                if reply.status == 503:
                    break
            assert time.monotonic() < deadline, "router still reports serving"
            await asyncio.sleep(0.05)
        await asyncio.sleep(drain_s + 0.3)
        body = {"model": "tiny-b", "prompt": "p", "max_tokens": 1}
        async with fresh.post(url + "/v1/completions", json=body) as reply:
            assert (reply.status, reply.headers["Retry-After"]) == (503, "1")
            assert (await reply.json())["error"]["code"] == 503


async def test_engine_killed_mid_run_later_calls_go_to_the_survivor(
    engines: dict[str, LocalEngine],
    own_engine: LocalEngine,
    start_router: StartRouter,
    store: Store,
) -> None:
    # Two replicas of tiny-a: the module's engine and this test's own, which is killed for good
    # (SIGKILL to its process group) once its first answer has begun to stream. Four streamed
    # calls, two per replica: the victim's end at once with an error event, the survivor's
    # complete; none waits for the 60 s deadline.
    victim = own_engine
    await register(store, "tiny-a", engines["tiny-a"].base_url, victim.base_url)
    routed = await start_router(health_interval_s=0.2, upstream_timeout_s=60)
    assert victim.pid is not None
    call = {"model": "tiny-a", **LONG, "n": 64, "stream": True}  # ~2.5 s: outlives the kill
    url = routed.http_url + "/v1/completions"
    streaming = asyncio.Event()

    async def streamed(session: aiohttp.ClientSession) -> tuple[str, bytes]:
        async with session.post(url, json=call) as reply:
            replica = reply.headers["x-scepsy-replica"]
            first = await reply.content.readany()
            if replica == "tiny-a-1" and not reply.content.at_eof():
                streaming.set()
            return replica, first + await reply.read()

    async with aiohttp.ClientSession() as session:
        in_flight = [asyncio.create_task(streamed(session)) for _ in range(4)]
        await asyncio.wait_for(streaming.wait(), timeout=30)
        os.killpg(victim.pid, signal.SIGKILL)  # the engine and its workers die mid-generation
        # None hangs: a stalled call would last until the router's 60 s upstream deadline.
        finished = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=45)
        assert sorted(replica for replica, _ in finished) == ["tiny-a-0"] * 2 + ["tiny-a-1"] * 2
        for replica, body in finished:
            events = body.decode().split("\n\n")
            if replica == "tiny-a-0":
                assert "data: [DONE]" in events
            else:
                assert '{"error"' in events[-2]  # the stream broke off, or ended early
                assert any(
                    why in events[-2] for why in ("broke off", "without [DONE]", "ejected")
                ), events[-2]
        served = []
        for _ in range(6):
            body = {"model": "tiny-a", "prompt": "after", **GREEDY}
            async with session.post(url, json=body) as reply:
                assert reply.status == 200
                served.append(reply.headers["x-scepsy-replica"])
        assert set(served) == {"tiny-a-0"}
    victim.stop()  # reaps it
    gone = routed.router.registry.replicas("tiny-a")[1]
    await wait_until(lambda: not gone.healthy)  # ejected by a failed call or health check
    metrics = routed.router.metrics.render().decode()
    assert 'scepsy_router_replica_healthy{model="tiny-a",replica="tiny-a-1"} 0.0' in metrics
    prefix = 'scepsy_router_replica_failures_total{model="tiny-a",replica="tiny-a-1"} '
    failures = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(prefix)]
    assert failures and failures[0] >= 1


async def test_engine_sigterm_under_load_ends_its_streams_and_calls_move_on(
    engines: dict[str, LocalEngine],
    own_engine: LocalEngine,
    start_router: StartRouter,
    store: Store,
) -> None:
    """A vLLM engine given SIGTERM stops generating but may keep its connections open: its
    streams must end with a clear error once the replica is ejected (not at the 60 s upstream
    deadline), and later calls go to the survivor."""
    victim = own_engine
    await register(store, "tiny-a", engines["tiny-a"].base_url, victim.base_url)
    routed = await start_router(health_interval_s=0.2, upstream_timeout_s=60)
    assert victim.pid is not None
    call = {"model": "tiny-a", **LONG, "n": 64, "stream": True}
    url = routed.http_url + "/v1/completions"
    streaming = asyncio.Event()

    async def streamed(session: aiohttp.ClientSession) -> tuple[str, bytes, float]:
        async with session.post(url, json=call) as reply:
            replica = reply.headers["x-scepsy-replica"]
            first = await reply.content.readany()
            if replica == "tiny-a-1" and not reply.content.at_eof():
                streaming.set()
            rest = await reply.read()
            return replica, first + rest, time.monotonic()

    async with aiohttp.ClientSession() as session:
        in_flight = [asyncio.create_task(streamed(session)) for _ in range(4)]
        await asyncio.wait_for(streaming.wait(), timeout=30)
        os.kill(victim.pid, signal.SIGTERM)
        signalled = time.monotonic()
        finished = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=45)
        for replica, body, ended in finished:
            events = body.decode().split("\n\n")
            assert "data: [DONE]" in events or '{"error"' in events[-2], events[-3:]
            if replica == "tiny-a-1" and "data: [DONE]" not in events:
                assert ended - signalled < 30  # ended by the router, not the 60 s deadline
        await wait_until(lambda: not routed.router.registry.replicas("tiny-a")[1].healthy, 30)
        for _ in range(4):
            body = {"model": "tiny-a", "prompt": "after", **GREEDY}
            async with session.post(url, json=body) as reply:
                assert reply.status == 200
                assert reply.headers["x-scepsy-replica"] == "tiny-a-0"
