"""Bytes that do not decode as a method's request message, sent over a real channel to the one
Server: INVALID_ARGUMENT naming the message type, with the rich status, for every service's unary
and server-streaming methods (grpc alone answers UNKNOWN); valid requests are untouched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from protos.scepsy.v1 import placer_pb2, profiler_pb2, profiler_pb2_grpc
from services.core import errors
from services.placer.config import PlacerConfig
from services.placer.service import Placer, placer_binding
from services.profiler.service import profiler_binding
from services.runtime.errors import DETAILS_KEY, DOMAIN, error_from_rpc
from services.runtime.server import Server, ServiceBinding
from services.runtime.store import Store

# Field 1, length-delimited, with a length varint that never ends: no message decodes from it.
MALFORMED = b"\x0a\xff\xff\xff"


async def echo_places(
    request: placer_pb2.PlaceRequest, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[placer_pb2.PlaceRequest]:
    yield request


def streamer() -> ServiceBinding:
    """A server-streaming method (an async generator) with a generated request message."""
    handler = grpc.method_handlers_generic_handler(
        "test.Streamer",
        {
            "Echo": grpc.unary_stream_rpc_method_handler(
                echo_places,
                request_deserializer=placer_pb2.PlaceRequest.FromString,
                response_serializer=placer_pb2.PlaceRequest.SerializeToString,
            )
        },
    )
    return ServiceBinding(
        name="test.Streamer",
        add_to_server=lambda server: server.add_generic_rpc_handlers((handler,)),
    )


@pytest.fixture
async def server(redis_url: str, store: Store) -> AsyncIterator[Server]:
    config = PlacerConfig(redis_url=redis_url, drain_s=0.0, grace_s=1.0)
    s = Server(config, [placer_binding(Placer(config, store)), profiler_binding(store), streamer()])
    await s.start()
    yield s
    await s.stop()


async def refused(address: str, method: str, *, streaming: bool) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            if streaming:
                async for _ in channel.unary_stream(method)(MALFORMED, timeout=5):
                    pass
            else:
                await channel.unary_unary(method)(MALFORMED, timeout=5)
    return err.value


@pytest.mark.parametrize(
    ("method", "message", "streaming"),
    [
        ("/scepsy.v1.Placer/Place", "scepsy.v1.PlaceRequest", False),
        ("/scepsy.v1.Profiler/Profile", "scepsy.v1.ProfileRequest", False),
        ("/scepsy.v1.Profiler/GetProfile", "scepsy.v1.GetProfileRequest", False),
        ("/test.Streamer/Echo", "scepsy.v1.PlaceRequest", True),
        # Health/Watch writes with context.write rather than yielding
        ("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest", True),
    ],
)
async def test_malformed_bytes_are_invalid_argument_naming_the_message(
    server: Server, method: str, message: str, streaming: bool
) -> None:
    err = await refused(server.address, method, streaming=streaming)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"request is not a valid {message}: ")
    raw = dict(err.trailing_metadata() or ())[DETAILS_KEY]
    assert isinstance(raw, bytes)
    status = status_pb2.Status.FromString(raw)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert [status.details[0].Unpack(info), status.details[1].Unpack(bad)] == [True, True]
    assert (info.reason, info.domain, info.metadata["field"]) == (
        "invalid_input",
        DOMAIN,
        "request",
    )
    [violation] = bad.field_violations
    assert (violation.field, violation.reason) == ("request", "invalid_input")
    back = error_from_rpc(err)
    assert type(back) is errors.InvalidInputError
    assert (back.field, back.reason) == ("request", "invalid_input")


async def test_valid_requests_still_work_and_refusals_are_counted(server: Server) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        mix = profiler_pb2.RequestMixSpec(input_len=512, output_len=128)
        request = profiler_pb2.ProfileRequest(
            backend="analytic", model="meta-llama/Llama-3.2-1B", gpu_type="H100-SXM", tp=1, mix=mix
        )
        response = await profiler_pb2_grpc.ProfilerStub(channel).Profile(request, timeout=30)
        assert response.profile.key.model == "meta-llama/Llama-3.2-1B"
        echoed = [m async for m in channel.unary_stream("/test.Streamer/Echo")(b"", timeout=5)]
        assert echoed == [b""]
    await refused(server.address, "/scepsy.v1.Placer/Place", streaming=False)
    labels = {"service": "scepsy.v1.Placer", "method": "Place", "code": "INVALID_ARGUMENT"}
    # The caller has the status as soon as the server aborts, a moment before the server's
    # interceptor counts it.
    for _ in range(200):
        if server.registry.get_sample_value("scepsy_rpc_handled_total", labels):
            break
        await asyncio.sleep(0.01)
    assert server.registry.get_sample_value("scepsy_rpc_handled_total", labels) == 1
    assert server.registry.get_sample_value("scepsy_rpc_errors_total", labels) == 1
    profiled = {"service": "scepsy.v1.Profiler", "method": "Profile", "code": "OK"}
    assert server.registry.get_sample_value("scepsy_rpc_handled_total", profiled) == 1
