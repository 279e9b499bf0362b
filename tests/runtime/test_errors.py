"""Domain errors become gRPC status codes at the boundary, over a real channel."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc
from services.agent.config import AgentConfig
from services.agent.service import Agent, agent_binding
from services.core import errors
from services.core.cluster.inventory import NodeInventory
from services.runtime.errors import status_of
from services.runtime.server import Server
from services.runtime.store import Store


class FailingSource:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def read(self) -> NodeInventory:
        raise self.exc

    def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("exc", "code", "details"),
    [
        (
            errors.InventoryError("c.yaml: nodes[0].gpus: bad"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "nodes[0].gpus",
        ),
        (errors.NotFoundError("node 'x' not found"), grpc.StatusCode.NOT_FOUND, "node 'x'"),
        (
            errors.InfeasibleError("needs 9 GPUs"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "needs 9 GPUs",
        ),
        (errors.UnavailableError("redis down"), grpc.StatusCode.UNAVAILABLE, "redis down"),
        # anything unexpected is INTERNAL and does not leak its text
        (
            RuntimeError("secret stack detail"),
            grpc.StatusCode.INTERNAL,
            "internal error in /scepsy.v1.NodeAgent/GetInventory",
        ),
    ],
)
async def test_error_mapping_over_grpc(
    exc: Exception, code: grpc.StatusCode, details: str, redis_url: str, store: Store
) -> None:
    config = AgentConfig(redis_url=redis_url, node_name="n", drain_s=0, grace_s=0.5)
    agent = Agent(config, FailingSource(exc), store)
    server = Server(config, [agent_binding(agent)])
    server.port = await _start_without_agent(server)
    async with grpc.aio.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await agent_pb2_grpc.NodeAgentStub(channel).GetInventory(
                agent_pb2.GetInventoryRequest(), timeout=2
            )
    assert err.value.code() == code
    assert details in (err.value.details() or "")
    assert "secret" not in (err.value.details() or "")
    await server.stop()


async def _start_without_agent(server: Server) -> int:
    # The failing source also fails the start-up heartbeat; that must not stop serving.
    try:
        return await server.start()
    except Exception as exc:  # pragma: no cover - makes a failure readable
        raise AssertionError(f"server failed to start: {exc}") from exc


def test_status_of_uses_the_most_specific_class() -> None:
    assert status_of(errors.ConfigError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.ScepsyError("x")) == grpc.StatusCode.UNKNOWN


async def test_health_watch_streams_through_the_error_mapping(redis_url: str, store: Store) -> None:
    """Health/Watch writes its answers (``context.write``) instead of yielding them: the error
    mapping must pass such handlers through, not fail them as INTERNAL."""
    config = AgentConfig(redis_url=redis_url, node_name="n", drain_s=0, grace_s=0.5)
    server = Server(config, [agent_binding(Agent(config, FailingSource(RuntimeError()), store))])
    await _start_without_agent(server)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="scepsy.v1.NodeAgent"), timeout=5
            )
            first = await stream.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stream.cancel()
    finally:
        await server.stop()
