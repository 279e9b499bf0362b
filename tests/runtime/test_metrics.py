"""RPC metrics of the one Server, over a real channel: every call counted by its final code, timed,
and served as Prometheus text on the server's metrics port."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc, profiler_pb2, profiler_pb2_grpc
from services.agent.config import AgentConfig
from services.agent.service import Agent, agent_binding
from services.core.cluster.inventory import NodeInventory
from services.core.errors import UnavailableError
from services.profiler.service import profiler_binding
from services.runtime.config import ServiceConfig
from services.runtime.metrics import split_method
from services.runtime.server import Server, ServiceBinding
from services.runtime.store import Store

HEALTH = "grpc.health.v1.Health"
PROFILER = "scepsy.v1.Profiler"
MIX = profiler_pb2.RequestMixSpec(input_len=512, output_len=128)


def profile_request(tp: int = 1) -> profiler_pb2.ProfileRequest:
    return profiler_pb2.ProfileRequest(
        backend="analytic", model="meta-llama/Llama-3.2-1B", gpu_type="H100-SXM", tp=tp, mix=MIX
    )


def sample(server: Server, name: str, **labels: str) -> float:
    return server.registry.get_sample_value(name, labels) or 0.0


async def counted(server: Server, name: str, **labels: str) -> float:
    """``sample`` once it is set: the caller has the status of an abort a moment before the
    server's interceptor counts it."""
    for _ in range(200):
        if value := sample(server, name, **labels):
            return value
        await asyncio.sleep(0.01)
    return 0.0


async def test_calls_are_counted_by_code_and_timed(redis_url: str, store: Store) -> None:
    config = ServiceConfig(redis_url=redis_url, drain_s=0, grace_s=1)
    server = Server(config, [profiler_binding(store)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

            profiler = profiler_pb2_grpc.ProfilerStub(channel)
            first = await profiler.Profile(profile_request(), timeout=30)
            second = await profiler.Profile(profile_request(), timeout=30)
            assert not first.cached and second.cached
            with pytest.raises(grpc.aio.AioRpcError) as bad:  # a domain error, mapped
                await profiler.Profile(profile_request(tp=3), timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        handled, errors = "scepsy_rpc_handled_total", "scepsy_rpc_errors_total"
        check = {"service": HEALTH, "method": "Check"}
        profile = {"service": PROFILER, "method": "Profile"}
        assert sample(server, handled, **check, code="OK") == 1
        assert sample(server, handled, **check, code="NOT_FOUND") == 1
        assert sample(server, errors, **check, code="NOT_FOUND") == 1
        assert sample(server, errors, **check, code="OK") == 0
        assert sample(server, handled, **profile, code="OK") == 2
        assert await counted(server, handled, **profile, code="INVALID_ARGUMENT") == 1
        assert sample(server, errors, **profile, code="INVALID_ARGUMENT") == 1
        assert sample(server, "scepsy_rpc_seconds_count", **profile) == 3
        assert sample(server, "scepsy_rpc_seconds_sum", **profile) > 0
        assert sample(server, "scepsy_rpc_in_flight", **profile) == 0
        # the profiler's own figures are in the same registry
        assert sample(server, "scepsy_profiler_profiles_total", source="computed") == 1
        assert sample(server, "scepsy_profiler_profiles_total", source="stored") == 1
        assert sample(server, "scepsy_profiler_compute_seconds_count", backend="analytic-1") == 1

        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{server.metrics_address}/metrics") as response,
        ):
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
        assert (
            'scepsy_rpc_handled_total{code="INVALID_ARGUMENT",method="Profile",'
            'service="scepsy.v1.Profiler"} 1.0'
        ) in text
        assert 'scepsy_profiler_profiles_total{source="computed"} 1.0' in text
    finally:
        await server.stop()


class FailingSource:
    def read(self) -> NodeInventory:
        raise RuntimeError("secret detail")

    def close(self) -> None:
        return None


async def test_an_unexpected_exception_counts_as_internal(redis_url: str, store: Store) -> None:
    config = AgentConfig(redis_url=redis_url, node_name="n", drain_s=0, grace_s=0.5)
    server = Server(config, [agent_binding(Agent(config, FailingSource(), store))])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await agent_pb2_grpc.NodeAgentStub(channel).GetInventory(
                    agent_pb2.GetInventoryRequest(), timeout=5
                )
        assert err.value.code() == grpc.StatusCode.INTERNAL
        labels = {"service": "scepsy.v1.NodeAgent", "method": "GetInventory", "code": "INTERNAL"}
        assert await counted(server, "scepsy_rpc_errors_total", **labels) == 1
    finally:
        await server.stop()


async def ticks(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> Any:
    """A server stream that never ends by itself."""
    while True:
        yield b"tick"
        await asyncio.sleep(0.01)


def ticker() -> ServiceBinding:
    handler = grpc.method_handlers_generic_handler(
        "test.Ticker", {"Ticks": grpc.unary_stream_rpc_method_handler(ticks)}
    )
    return ServiceBinding("test.Ticker", lambda server: server.add_generic_rpc_handlers((handler,)))


async def test_a_stream_the_client_cancels_counts_as_cancelled(redis_url: str) -> None:
    server = Server(ServiceConfig(redis_url=redis_url, drain_s=0, grace_s=0.5), [ticker()])
    await server.start()
    labels = {"service": "test.Ticker", "method": "Ticks"}
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_stream("/test.Ticker/Ticks")(b"", timeout=5)
            assert await call.read() == b"tick"
            assert sample(server, "scepsy_rpc_in_flight", **labels) == 1
            call.cancel()
            deadline = time.monotonic() + 5
            while not sample(server, "scepsy_rpc_handled_total", **labels, code="CANCELLED"):
                assert time.monotonic() < deadline, "the cancelled stream was not counted"
                await asyncio.sleep(0.02)
        assert sample(server, "scepsy_rpc_in_flight", **labels) == 0
        assert sample(server, "scepsy_rpc_errors_total", **labels, code="CANCELLED") == 1
    finally:
        await server.stop()


@pytest.mark.parametrize("field", ["port", "metrics_port"])
async def test_a_taken_port_is_a_clear_error(field: str, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ServiceConfig(redis_url=redis_url, drain_s=0, grace_s=0.5, **{field: port})
        with pytest.raises(UnavailableError, match=f"^{field}: cannot listen on 127.0.0.1:{port}"):
            await Server(config, []).start()


def test_split_method() -> None:
    assert split_method("/scepsy.v1.Placer/Place") == ("scepsy.v1.Placer", "Place")
    assert split_method("odd") == ("unknown", "odd")
