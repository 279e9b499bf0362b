"""The gRPC front end over real gRPC on port 0, with the Python clients (asyncio and sync)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from protos.scepsy.v1 import router_pb2
from services.router.client import (
    RouterClient,
    SyncRouterClient,
    generate_request,
    workflow_request,
)
from services.runtime.store import Store
from tests.router.conftest import StartEngine, StartRouter, register, wait_until

CHAT = [{"role": "user", "content": "plan the GPUs"}]


async def test_generate_unary_and_streamed_with_workflow_tags(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", tokens=3)
    await register(store, "m", engine)
    handle = await start_router()
    async with RouterClient(handle.grpc_target) as client:
        assert await client.list_models() == ["m"]
        with workflow_request("beam", "b-1"):
            reply = await client.generate(generate_request("m", messages=CHAT, max_tokens=2))
            chunks = [c async for c in client.generate_stream(generate_request("m", prompt="a b"))]
    assert (reply.text, reply.finish_reason) == ("w0 w1", "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 2)
    assert "".join(c.text for c in chunks) == "w0 w1 w2"
    assert chunks[-1].finish_reason == "length"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 3)
    calls = await handle.trace(2)
    assert [(c["workflow"], c["request_id"]) for c in calls] == [("beam", "b-1")] * 2
    assert calls[0]["call_id"] == reply.id
    assert calls[1]["ttft"] is not None


async def test_request_fields_reach_the_engine(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m")
    await register(store, "m", engine)
    handle = await start_router()
    request = generate_request(
        "m", prompt="x", max_tokens=5, temperature=0.0, stop=["\n"], extra_json='{"top_k": 3}'
    )
    request.seed = 7
    async with RouterClient(handle.grpc_target) as client:
        await client.generate(request)
    assert engine.last_body == {
        "model": "m",
        "prompt": "x",
        "temperature": 0.0,
        "max_tokens": 5,
        "stop": ["\n"],
        "seed": 7,
        "top_k": 3,
    }


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (router_pb2.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "nope"),
        (router_pb2.GenerateRequest(model="m"), grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        (
            generate_request("m", prompt="x", messages=CHAT),
            grpc.StatusCode.INVALID_ARGUMENT,
            "exactly one",
        ),
        (
            generate_request("m", prompt="x", extra_json="[1]"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "JSON object",
        ),
        (
            generate_request("m", prompt="x", extra_json='{"stream": true}'),
            grpc.StatusCode.INVALID_ARGUMENT,
            "may not set stream",
        ),
        (generate_request("", prompt="x"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        # the engine fails (a bad field makes it answer HTTP 500): UNAVAILABLE
        (
            generate_request("m", prompt="x", extra_json='{"fake_delay_s": "soon"}'),
            grpc.StatusCode.UNAVAILABLE,
            "",
        ),
    ],
)
async def test_errors_map_to_status_codes(
    start_engine: StartEngine,
    start_router: StartRouter,
    store: Store,
    request_: router_pb2.GenerateRequest,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router()
    async with RouterClient(handle.grpc_target) as client:
        for streamed in (False, True):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if streamed:
                    _ = [c async for c in client.generate_stream(request_)]
                else:
                    await client.generate(request_)
            assert caught.value.code() == code
            assert needle in (caught.value.details() or "")
        assert (await client.generate(generate_request("m", prompt="ok"))).text


async def test_engine_error_status_is_mapped(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("served-name")
    await register(store, "m", engine)  # registered under a name the engine does not serve
    handle = await start_router()
    async with RouterClient(handle.grpc_target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(generate_request("m", prompt="x"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "engine answered 404" in (caught.value.details() or "")


async def test_overload_is_resource_exhausted_with_a_retry_hint(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=0.5)
    await register(store, "m", engine)
    handle = await start_router(max_in_flight=1, queue_size=0, retry_after_s=1.5)
    async with RouterClient(handle.grpc_target) as client:
        first = asyncio.create_task(client.generate(generate_request("m", prompt="x")))
        await wait_until(lambda: engine.in_flight > 0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(generate_request("m", prompt="x"))
        assert (await first).text
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1500") in tuple(caught.value.trailing_metadata() or ())


async def test_client_deadline_bounds_the_engine_call(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    engine = await start_engine("m", first_token_delay_s=5.0)
    await register(store, "m", engine)
    handle = await start_router()
    async with RouterClient(handle.grpc_target) as client:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.generate(generate_request("m", prompt="x"), deadline_s=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if engine.cancelled:
            break
        await asyncio.sleep(0.02)
    assert engine.cancelled == 1


async def test_api_key_on_grpc(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router(api_keys="k1")
    for key in (None, "wrong"):
        async with RouterClient(handle.grpc_target, api_key=key) as client:
            for rpc in (
                client.list_models(),
                client.generate(generate_request("m", prompt="x")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await rpc
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with RouterClient(handle.grpc_target, api_key="k1") as client:
        assert await client.list_models() == ["m"]


async def test_sync_client(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m", tokens=2))
    handle = await start_router()

    def drive() -> tuple[str, str, list[str]]:
        with SyncRouterClient(handle.grpc_target) as client, workflow_request("sync", "s-1"):
            unary = client.generate(generate_request("m", prompt="x")).text
            streamed = "".join(
                c.text for c in client.generate_stream(generate_request("m", prompt="x"))
            )
            return unary, streamed, client.list_models()

    assert await asyncio.to_thread(drive) == ("w0 w1", "w0 w1", ["m"])
    calls = await handle.trace(2)
    assert {(c["workflow"], c["request_id"]) for c in calls} == {("sync", "s-1")}
    assert json.dumps(calls)  # plain JSON records
