"""The node agent over a real gRPC channel (port 0) with a real Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.agent.config import AgentConfig
from services.agent.fake_nvml import FakeNvml
from services.agent.service import Agent, agent_binding
from services.agent.sources import NvmlSource
from services.runtime.server import Server
from services.runtime.store import Store


@dataclass
class Running:
    agent: Agent
    server: Server
    channel: grpc.aio.Channel


def agent_config(redis_url: str, **overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "node_name": "node-1",
        "heartbeat_s": 0.1,
        "node_ttl_s": 0.5,
        "drain_s": 0.3,
        "grace_s": 1.0,
    } | overrides
    return AgentConfig(**values)  # type: ignore[arg-type]


async def start_agent(config: AgentConfig, store: Store, recording: str) -> Running:
    agent = Agent(
        config, NvmlSource(FakeNvml.recorded(recording), config.node_name, "host-1"), store
    )
    server = Server(config, [agent_binding(agent)])
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Running(agent, server, channel)


@pytest.fixture
async def running(redis_url: str, store: Store) -> AsyncIterator[Running]:
    r = await start_agent(agent_config(redis_url), store, "dgx-h100-nvswitch")
    yield r
    await r.channel.close()
    await r.server.stop()


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(reply.status)


async def test_inventory_and_topology_over_grpc(running: Running) -> None:
    stub = agent_pb2_grpc.NodeAgentStub(running.channel)
    reply = await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=2)
    node = reply.node
    assert node.name == "node-1"
    assert node.source == pb.INVENTORY_SOURCE_NVML
    assert len(node.gpus) == 8 and node.gpus[3].gpu_type == "H100-SXM"
    assert node.agent_address == running.server.address
    assert [list(d.gpus) for d in node.topology.domains] == [list(range(8))]
    topo = await stub.GetTopology(agent_pb2.GetTopologyRequest(), timeout=2)
    assert len(topo.topology.links) == 28
    assert topo.topology.links[0].pcie_level == pb.PCIE_LEVEL_NODE


async def test_health_serving_after_start(running: Running) -> None:
    assert await health_status(running.channel) == health_pb2.HealthCheckResponse.SERVING
    assert (
        await health_status(running.channel, "scepsy.v1.NodeAgent")
        == health_pb2.HealthCheckResponse.SERVING
    )


async def test_reflection_lists_the_service(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(requests(), timeout=2):
        names |= {s.name for s in reply.list_services_response.service}
    assert {"scepsy.v1.NodeAgent", "grpc.health.v1.Health"} <= names


async def test_registers_in_redis_and_deregisters_on_stop(redis_url: str, store: Store) -> None:
    r = await start_agent(agent_config(redis_url), store, "a100-pcie-nvlink-pairs")
    nodes = await store.list_nodes()
    assert [n.name for n in nodes] == ["node-1"]
    assert nodes[0].domains == ((0, 1), (2, 3))
    assert nodes[0].agent_address == r.server.address
    await r.channel.close()
    await r.server.stop()
    assert await store.list_nodes() == []


async def test_not_serving_during_shutdown(redis_url: str, store: Store) -> None:
    r = await start_agent(agent_config(redis_url, drain_s=1.0), store, "l40s-pcie-2numa")
    stopping = asyncio.create_task(r.server.stop())
    await asyncio.sleep(0.2)  # inside the drain window: still reachable, no longer serving
    assert await health_status(r.channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_status(r.channel)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await r.channel.close()


async def test_heartbeat_expiry_removes_node(redis_url: str, store: Store) -> None:
    r = await start_agent(agent_config(redis_url), store, "l40s-pcie-2numa")
    await asyncio.sleep(0.3)
    assert r.agent.beats >= 2  # it keeps beating while alive
    assert [n.name for n in await store.list_nodes()] == ["node-1"]
    # The agent dies without deregistering (as in a crash): the TTL (0.5 s) removes the node.
    await r.agent.stop_heartbeat()
    await asyncio.sleep(0.8)
    assert await store.list_nodes() == []
    await r.channel.close()
    await r.server.stop()


async def test_restart_re_registers_without_duplicates(redis_url: str, store: Store) -> None:
    first = await start_agent(agent_config(redis_url), store, "dgx-h100-nvswitch")
    await first.agent.stop_heartbeat()  # crashed: its record is still there until the TTL
    second = await start_agent(agent_config(redis_url), store, "dgx-h100-nvswitch")
    nodes = await store.list_nodes()
    assert [n.name for n in nodes] == ["node-1"]
    assert nodes[0].agent_address == second.server.address != first.server.address
    for r in (first, second):
        await r.channel.close()
        await r.server.stop()


async def test_keeps_serving_while_redis_is_unreachable(store: Store) -> None:
    # A Redis that does not answer: the agent still serves gRPC and counts failed heartbeats.
    from services.runtime.redis_server import free_port

    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    dead_store = Store.connect(dead_url, timeout_s=0.2)
    r = await start_agent(agent_config(dead_url), dead_store, "l40s-pcie-2numa")
    await asyncio.sleep(0.35)
    assert r.agent.failed_beats >= 2 and r.agent.beats == 0
    stub = agent_pb2_grpc.NodeAgentStub(r.channel)
    reply = await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=2)
    assert len(reply.node.gpus) == 8
    await r.channel.close()
    await r.server.stop()
    await dead_store.close()
