"""The gRPC front end rejecting bad requests on its own, over real gRPC on port 0, with no engine:
the request checks come before any engine call, and an unreachable replica is an address where
nothing listens. Generation over gRPC (asyncio and sync clients, streaming, workflow tags,
request fields, overload, deadlines, API keys, engine errors) is tested on real vLLM engines in
``test_engines``."""

from __future__ import annotations

import grpc
import pytest

from protos.scepsy.v1 import router_pb2
from services.router.client import RouterClient, generate_request
from services.runtime.store import Store
from tests.router.conftest import StartRouter, StartUpstream, nothing_at, register

CHAT = [{"role": "user", "content": "plan the GPUs"}]


async def _expect(
    client: RouterClient, request: router_pb2.GenerateRequest, code: grpc.StatusCode, needle: str
) -> None:
    """Both RPCs, unary and streamed, fail with ``code`` and a message containing ``needle``."""
    for streamed in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if streamed:
                _ = [c async for c in client.generate_stream(request)]
            else:
                await client.generate(request)
        assert caught.value.code() == code
        assert needle in (caught.value.details() or "")


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
        (
            generate_request("m", prompt="x", extra_json='{"a": ' + "[" * 1000 + "]" * 1000 + "}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "'extra_json' is nested more than 64 levels deep",
        ),
    ],
)
async def test_bad_requests_map_to_status_codes_before_any_engine_call(
    start_router: StartRouter,
    request_: router_pb2.GenerateRequest,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    # Requests are checked before the model is looked up, so no replica of "m" is needed.
    handle = await start_router()
    async with RouterClient(handle.grpc_target) as client:
        await _expect(client, request_, code, needle)


async def test_an_unreachable_replica_is_unavailable(
    start_router: StartRouter, store: Store
) -> None:
    # The first call cannot connect (and ejects the replica), the second finds none healthy.
    await register(store, "m", nothing_at())
    handle = await start_router(health_interval_s=30.0)
    async with RouterClient(handle.grpc_target) as client:
        request = generate_request("m", prompt="x")
        await _expect(client, request, grpc.StatusCode.UNAVAILABLE, "model m")


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "ListModels"])
async def test_bytes_that_are_not_the_request_message_are_invalid_argument(
    start_router: StartRouter, method: str
) -> None:
    # A deserializer that raises makes grpc answer UNKNOWN; the router names the bad request.
    handle = await start_router()
    async with grpc.aio.insecure_channel(handle.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method == "GenerateStream":
                call = channel.unary_stream(f"/scepsy.v1.Router/{method}")
                _ = [chunk async for chunk in call(b"\xff\xff\xff\xff")]
            else:
                await channel.unary_unary(f"/scepsy.v1.Router/{method}")(b"\xff\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid scepsy.v1." in (caught.value.details() or "")


@pytest.mark.parametrize("chat", [False, True])
async def test_n_sequences_come_back_as_separate_choices(
    start_router: StartRouter, start_upstream: StartUpstream, store: Store, chat: bool
) -> None:
    # The scripted engine interleaves the three sequences token by token, as vLLM does; they
    # were run together into one text, and Generate returned only the first.
    await register(store, "m", await start_upstream("m"))
    handle = await start_router()
    fields = {"messages": CHAT} if chat else {"prompt": "x"}
    request = generate_request("m", max_tokens=3, extra_json='{"n": 3}', **fields)  # type: ignore[arg-type]
    want = ["w0 w1 w2", "s1w0 s1w1 s1w2", "s2w0 s2w1 s2w2"]
    async with RouterClient(handle.grpc_target) as client:
        unary = await client.generate(request)
        chunks = [c async for c in client.generate_stream(request)]
    assert [(c.index, c.text, c.finish_reason) for c in unary.choices] == [
        (i, text, "length") for i, text in enumerate(want)
    ]
    assert (unary.text, unary.finish_reason) == (want[0], "length")
    assert unary.usage.completion_tokens == 9
    texts = ["", "", ""]
    for chunk in chunks:
        texts[chunk.index] += chunk.text
    assert texts == want
    ends = [(c.index, c.finish_reason) for c in chunks if c.finish_reason]
    assert ends == [(0, "length"), (1, "length"), (2, "length")]
    assert chunks[-1].usage.completion_tokens == 9
    assert not any(c.HasField("usage") for c in chunks[:-1])
