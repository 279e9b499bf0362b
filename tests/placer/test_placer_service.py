"""The placer over a real gRPC channel (port 0), with the live cluster in a real Redis server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.scepsy.v1 import placer_pb2, placer_pb2_grpc
from protos.scepsy.v1 import types_pb2 as pb
from services.agent.fake_nvml import FakeNvml
from services.agent.sources import NvmlSource
from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.placement.heuristic import cluster_state, instances_of, make_placement, validate
from services.placer.config import PlacerConfig
from services.placer.service import Placer, placer_binding
from services.runtime.convert import allocation_to_pb, assignments_from_pb, node_to_pb
from services.runtime.server import Server
from services.runtime.store import Store

H100S = parse_cluster(
    {"version": 1, "nodes": [{"name": "h", "gpu_type": "H100-SXM", "gpus": 8, "count": 2}]}
)
ALLOCATION = {"big": Allocation(1.0, 4, 3), "small": Allocation(0.25, 1, 6)}


@dataclass
class Running:
    server: Server
    channel: grpc.aio.Channel
    stub: placer_pb2_grpc.PlacerStub


async def start(
    redis_url: str, store: Store, declared: tuple[NodeInventory, ...] | None = None
) -> Running:
    config = PlacerConfig(redis_url=redis_url, drain_s=0.0, grace_s=1.0)
    server = Server(config, [placer_binding(Placer(config, store, declared))])
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Running(server, channel, placer_pb2_grpc.PlacerStub(channel))


@pytest.fixture
async def running(redis_url: str, store: Store) -> AsyncIterator[Running]:
    for node in H100S:
        await store.put_node(node, ttl_s=30)
    r = await start(redis_url, store)
    yield r
    await r.channel.close()
    await r.server.stop()


async def test_places_on_the_live_nodes_from_redis(running: Running) -> None:
    reply = await running.stub.Place(
        placer_pb2.PlaceRequest(allocation=allocation_to_pb(ALLOCATION, 4)), timeout=5
    )
    assignments = assignments_from_pb(reply.placement, 4)
    state = cluster_state(H100S, 4)
    placement = make_placement(state, assignments)
    assert validate(placement, state, instances_of(ALLOCATION, 4)) == ()
    assert (reply.started, reply.stopped, reply.moved) == (9, 0, 0)
    tp4 = [a for a in assignments if a.model == "big"]
    assert all(len(a.gpus) == 4 for a in tp4) and len({a.node for a in tp4}) == 2
    small = [a for a in reply.placement.assignments if a.model == "small"]
    assert {(a.mps_percentage, round(a.memory_fraction, 4)) for a in small} == {(25, 0.2375)}
    # 12 GPUs for TP4 + 6 quarters on 2 GPUs: 1/2 GPU stranded, 2 whole GPUs left on one node
    frag = reply.placement.fragmentation
    assert (frag.partly_used_gpus, frag.stranded_fraction, frag.largest_free_tp) == (1, 0.5, 2)


async def test_incremental_with_the_current_placement(running: Running) -> None:
    first = await running.stub.Place(
        placer_pb2.PlaceRequest(allocation=allocation_to_pb(ALLOCATION, 4)), timeout=5
    )
    fewer = ALLOCATION | {"small": Allocation(0.25, 1, 4)}
    again = await running.stub.Place(
        placer_pb2.PlaceRequest(allocation=allocation_to_pb(fewer, 4), current=first.placement),
        timeout=5,
    )
    assert (again.started, again.stopped, again.moved) == (0, 2, 0)
    before = {(a.model, a.replica): (a.node, list(a.gpus)) for a in first.placement.assignments}
    for a in again.placement.assignments:
        assert before[(a.model, a.replica)] == (a.node, list(a.gpus))


async def test_request_nodes_override_the_live_cluster(running: Running) -> None:
    a100 = NvmlSource(FakeNvml.recorded("a100-pcie-nvlink-pairs"), "a100").read()
    request = placer_pb2.PlaceRequest(
        allocation=allocation_to_pb({"pair": Allocation(1.0, 2, 2)}, 4), nodes=[node_to_pb(a100)]
    )
    reply = await running.stub.Place(request, timeout=5)
    assert sorted(tuple(a.gpus) for a in reply.placement.assignments) == [(0, 1), (2, 3)]
    assert {a.node for a in reply.placement.assignments} == {"a100"}


async def test_infeasible_allocation_fails_with_the_reason(running: Running) -> None:
    a100 = NvmlSource(FakeNvml.recorded("a100-pcie-nvlink-pairs"), "a100").read()
    request = placer_pb2.PlaceRequest(
        allocation=allocation_to_pb({"wide": Allocation(1.0, 4, 1)}, 4), nodes=[node_to_pb(a100)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Place(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (err.value.details() or "").startswith("tp_exceeds_domain: wide: TP 4")


async def test_malformed_allocation_is_invalid_argument(running: Running) -> None:
    bad = pb.Allocation(
        fraction_unit=4, llms=[pb.LlmAllocation(model="m", fraction_units=5, tp=1, replicas=1)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Place(placer_pb2.PlaceRequest(allocation=bad), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allocation.llms[0].fraction_units: must be in 1..4, got 5" in (
        err.value.details() or ""
    )


async def test_declared_cluster_and_empty_cluster(redis_url: str, store: Store) -> None:
    empty = await start(redis_url, store)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await empty.stub.Place(
                placer_pb2.PlaceRequest(allocation=allocation_to_pb(ALLOCATION, 4)), timeout=5
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not_enough_gpus: the cluster has no nodes" in (err.value.details() or "")
    finally:
        await empty.channel.close()
        await empty.server.stop()
    declared = await start(redis_url, store, H100S)
    try:
        reply = await declared.stub.Place(
            placer_pb2.PlaceRequest(allocation=allocation_to_pb(ALLOCATION, 4)), timeout=5
        )
        assert reply.started == 9
        health = health_pb2_grpc.HealthStub(declared.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service="scepsy.v1.Placer"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await declared.channel.close()
        await declared.server.stop()
