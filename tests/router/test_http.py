"""The OpenAI-compatible HTTP front end, driven by the official openai client and raw HTTP,
over fake engines on real sockets and a real Redis."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import openai
import pytest
from structlog.testing import capture_logs

from services.router.client import workflow_request
from services.runtime.store import Store
from tests.router.conftest import StartEngine, StartRouter, register

CHAT = [{"role": "user", "content": "what is the plan"}]


def _client(url: str, key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def test_openai_client_non_streaming_matches_the_engine(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("chat-model", tokens=5)
    await register(store, "chat-model", engine)
    handle = await start_router()
    async with _client(handle.http_url) as via_router, _client(engine.url) as direct:
        for kwargs in ({"max_tokens": 3}, {}):
            got = await via_router.chat.completions.create(
                model="chat-model", messages=CHAT, **kwargs
            )  # type: ignore[call-overload]
            want = await direct.chat.completions.create(model="chat-model", messages=CHAT, **kwargs)  # type: ignore[call-overload]
            assert got.choices[0].message.content == want.choices[0].message.content
            assert got.usage == want.usage
        text = await via_router.completions.create(model="chat-model", prompt="a b c", max_tokens=2)
        assert text.choices[0].text == "w0 w1"
        assert text.usage is not None and text.usage.prompt_tokens == 3
        models = await via_router.models.list()
        assert [m.id for m in models.data] == ["chat-model"]


async def test_openai_client_streaming(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", tokens=4)
    await register(store, "m", engine)
    handle = await start_router()
    async with _client(handle.http_url) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "w0 w1 w2 w3"
        )
        # The router asked the engine for usage (for the trace) but the client did not:
        assert all(c.usage is None for c in chunks)
        assert engine.last_body is not None
        assert engine.last_body["stream_options"] == {"include_usage": True}

        stream = await client.completions.create(
            model="m", prompt="x y", stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == "w0 w1 w2 w3"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    calls = await handle.trace(2)
    assert [c["completion_tokens"] for c in calls] == [4, 4]
    assert all(c["ttft"] is not None and 0 <= c["ttft"] <= c["end"] - c["start"] for c in calls)


async def test_calls_are_traced_with_their_workflow_identity(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m")
    await register(store, "m", engine)
    handle = await start_router()
    async with _client(handle.http_url) as client:
        with workflow_request("rag", "req-1") as request:
            tagged = request.bind(client)
            await tagged.chat.completions.create(model="m", messages=CHAT)
            await client.completions.create(model="m", prompt="p", extra_headers=request.headers)
        await client.completions.create(model="m", prompt="untagged")
    calls = await handle.trace(3)
    assert [(c["workflow"], c["request_id"]) for c in calls[:2]] == [("rag", "req-1")] * 2
    assert calls[2]["workflow"] == "untagged"
    assert calls[2]["request_id"] == calls[2]["call_id"]
    assert {c["status"] for c in calls} == {"ok"}
    assert {c["replica"] for c in calls} == {"m-0"}


async def _post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, Any]:
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, None, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, None, "must be a JSON object"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "model", "'model'"),
        ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "model", "'model'"),
        ("/v1/chat/completions", b'{"model": "m", "messages": "hi"}', 400, "messages", "list"),
        (
            "/v1/chat/completions",
            b'{"model": "m", "messages": [{"content": "x"}]}',
            400,
            "messages.0.role",
            "role",
        ),
        ("/v1/completions", b'{"model": "m", "prompt": {"a": 1}}', 400, "prompt", "'prompt'"),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "max_tokens": "5"}',
            400,
            "max_tokens",
            "integer",
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "stream": "yes"}',
            400,
            "stream",
            "boolean",
        ),
        (
            "/v1/completions",
            b'{"model": "m", "prompt": "x", "temperature": "hot"}',
            400,
            "temperature",
            "number",
        ),
        ("/v1/completions", b'{"model": "nope", "prompt": "x"}', 404, "model", "nope"),
        ("/v1/no-such-route", b"{}", 404, None, ""),
    ],
)
async def test_bad_input_gets_an_openai_error_and_the_router_keeps_serving(
    start_engine: StartEngine,
    start_router: StartRouter,
    store: Store,
    path: str,
    body: bytes,
    status: int,
    param: str | None,
    needle: str,
) -> None:
    engine = await start_engine("m")
    await register(store, "m", engine)
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        got_status, answer = await _post(session, handle.http_url + path, body)
        assert got_status == status
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param
        assert needle in error["message"]
        ok_status, _ = await _post(
            session, handle.http_url + "/v1/completions", b'{"model": "m", "prompt": "x"}'
        )
        assert ok_status == 200
    assert engine.calls == 1  # nothing invalid reached the engine


async def test_unknown_model_is_a_not_found_error_for_the_openai_client(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router()
    async with _client(handle.http_url) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-none", messages=CHAT)
    assert caught.value.code == "model_not_found"


async def test_oversized_body_is_413_and_method_mismatch_405(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router(max_body_bytes=4096)
    big = json.dumps({"model": "m", "prompt": "x" * 10_000}).encode()
    async with aiohttp.ClientSession() as session:
        status, answer = await _post(session, handle.http_url + "/v1/completions", big)
        assert status == 413
        assert answer["error"]["code"] == "request_too_large"
        async with session.get(handle.http_url + "/v1/completions") as reply:
            assert reply.status == 405
            assert "error" in await reply.json()
        status, _ = await _post(
            session, handle.http_url + "/v1/completions", b'{"model": "m", "prompt": "x"}'
        )
        assert status == 200


async def test_api_keys_are_required_when_configured_and_never_logged(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    secret = "sk-test-0123456789"
    with capture_logs() as logs:
        handle = await start_router(api_keys=f"{secret}, other-key")
        assert secret not in repr(handle.router.config)
        async with _client(handle.http_url, key="wrong") as wrong:
            with pytest.raises(openai.AuthenticationError):
                await wrong.completions.create(model="m", prompt="x")
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        async with aiohttp.ClientSession() as session:
            status, answer = await _post(
                session, handle.http_url + "/v1/completions", b'{"model": "m", "prompt": "x"}'
            )
            assert (status, answer["error"]["code"]) == (401, "invalid_api_key")
            async with session.get(handle.http_url + "/metrics") as reply:
                assert reply.status == 200  # metrics need no key
        async with _client(handle.http_url, key=secret) as right:
            reply = await right.completions.create(model="m", prompt="x")
            assert reply.choices[0].text
    assert secret not in repr(logs)
    metrics = handle.router.metrics.render().decode()
    assert "scepsy_router_unauthenticated_total 3.0" in metrics


async def test_metrics_expose_requests_latency_ttft_and_in_flight(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router()
    async with _client(handle.http_url) as client:
        await client.completions.create(model="m", prompt="x")
        stream = await client.completions.create(model="m", prompt="x", stream=True)
        _ = [c async for c in stream]
    async with (
        aiohttp.ClientSession() as session,
        session.get(handle.http_url + "/metrics") as reply,
    ):
        text = await reply.text()
    assert 'scepsy_router_requests_total{api="http",model="m",status="ok"} 2.0' in text
    assert 'scepsy_router_request_seconds_count{model="m"} 2.0' in text
    assert 'scepsy_router_ttft_seconds_count{model="m"} 1.0' in text
    assert 'scepsy_router_in_flight{model="m",replica="m-0"} 0.0' in text
    assert 'scepsy_router_replica_healthy{model="m",replica="m-0"} 1.0' in text
    assert "scepsy_router_trace_dropped_total 0.0" in text


async def test_health_endpoint(start_router: StartRouter) -> None:
    handle = await start_router()
    async with (
        aiohttp.ClientSession() as session,
        session.get(handle.http_url + "/health") as reply,
    ):
        assert reply.status == 200
