"""The OpenAI-compatible HTTP front end rejecting bad requests on its own, before any engine
call: no engine is registered here. What engines answer through this front end (equality with
the engine, streaming, tracing, metrics, API keys, the router serving on after bad input) is
tested on real vLLM engines in ``test_engines``."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from tests.router.conftest import StartRouter, complete


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
async def test_bad_input_gets_an_openai_error_before_any_engine_call(
    start_router: StartRouter, path: str, body: bytes, status: int, param: str | None, needle: str
) -> None:
    # Requests are checked before the model is looked up, so no replica of "m" is needed.
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        got_status, answer = await _post(session, handle.http_url + path, body)
    assert got_status == status
    error = answer["error"]
    # vLLM's shape: the code is the HTTP status, so router and engine errors read alike.
    assert (set(error), error["code"]) == ({"message", "type", "param", "code"}, status)
    assert error["param"] == param
    assert needle in error["message"]


async def test_oversized_body_is_413_and_method_mismatch_405(start_router: StartRouter) -> None:
    handle = await start_router(max_body_bytes=4096)
    big = json.dumps({"model": "m", "prompt": "x" * 10_000}).encode()
    async with aiohttp.ClientSession() as session:
        status, answer = await _post(session, handle.http_url + "/v1/completions", big)
        assert status == 413
        assert answer["error"]["code"] == 413
        async with session.get(handle.http_url + "/v1/completions") as reply:
            assert reply.status == 405
            assert (await reply.json())["error"]["code"] == 405


async def test_health_endpoint(start_router: StartRouter) -> None:
    handle = await start_router()
    async with (
        aiohttp.ClientSession() as session,
        session.get(handle.http_url + "/health") as reply,
    ):
        assert reply.status == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_deeply_nested_json_is_400_without_a_traceback(
    start_router: StartRouter, path: str
) -> None:
    # 1,000 levels made json.loads raise RecursionError: a 500 and a logged traceback per call.
    deep = b"[" * 1000 + b"]" * 1000
    handle = await start_router()
    async with aiohttp.ClientSession() as session:
        with capture_logs() as logs:
            status, answer = await _post(
                session, handle.http_url + path, b'{"model": "m", "prompt": ' + deep + b"}"
            )
    assert (status, answer["error"]["code"]) == (400, 400)
    assert answer["error"]["type"] == "invalid_request_error"
    assert "nested more than 64 levels" in answer["error"]["message"]
    assert [e for e in logs if e["log_level"] in ("error", "critical")] == []


async def test_a_missing_api_key_is_401_with_the_status_as_code(
    start_router: StartRouter,
) -> None:
    # Made by the router, shaped like vLLM's errors (502 and 503 in ``test_dispatch``).
    handle = await start_router(api_keys="k")
    async with aiohttp.ClientSession() as session:
        status, _, answer = await complete(session, handle)
    assert (status, answer["error"]["code"]) == (401, 401)


async def test_metrics_can_be_put_behind_the_api_key(start_router: StartRouter) -> None:
    open_ = await start_router(api_keys="k1")
    locked = await start_router(api_keys="k1", metrics_auth=True)
    async with aiohttp.ClientSession() as session:
        async with session.get(open_.http_url + "/metrics") as reply:
            assert reply.status == 200
        async with session.get(locked.http_url + "/metrics") as reply:
            assert reply.status == 401
            assert (await reply.json())["error"]["code"] == 401
        auth = {"Authorization": "Bearer k1"}
        async with session.get(locked.http_url + "/metrics", headers=auth) as reply:
            assert reply.status == 200
            text = await reply.text()
    assert "scepsy_router_requests" in text and "k1" not in text


async def test_models_carry_the_fields_the_engine_returns(
    start_upstream: Any, start_router: StartRouter, store: Any
) -> None:
    from tests.router.conftest import register, wait_until

    upstream = await start_upstream("m")
    await register(store, "m", upstream)
    handle = await start_router()
    await wait_until(lambda: handle.router.registry.model_info("m") is not None)
    async with (
        aiohttp.ClientSession() as session,
        session.get(handle.http_url + "/v1/models") as reply,
    ):
        (entry,) = (await reply.json())["data"]
    assert entry["id"] == "m" and entry["max_model_len"] == 256
    assert entry["root"] == "/models/m" and entry["owned_by"] == "vllm"
