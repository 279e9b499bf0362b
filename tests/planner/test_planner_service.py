"""The planner over real gRPC (port 0) with a real Redis server and the analytic profiles."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.core.cluster.declared import parse_cluster
from services.core.placement.heuristic import cluster_state, instances_of, validate
from services.core.planning.plan import spec_from_text
from services.planner.config import PlannerConfig
from services.planner.service import Planner, planner_binding
from services.runtime.convert import plan_from_pb, plan_to_pb
from services.runtime.server import Server
from services.runtime.store import Store
from tests.core.planning.test_plan import SPEC as TEST_PLAN_SPEC
from tests.core.planning.test_plan import build_plan

# Two small models on two L40S (PCIe: TP 1 only), k = 2: 2 configurations per model, so the
# analytic profiles take a fraction of a second.
SPEC = """
version: 1
fraction_unit: 2
models:
  small: Qwen/Qwen2.5-0.5B
  tiny: Qwen/Qwen3-0.6B
workflows:
  - name: chat
    rate: {rate}
    stats:
      tool_time: 0.1
      llms:
        small: {{n: 2, prompt_tokens: 300, completion_tokens: 50}}
        tiny: {{n: 1, prompt_tokens: 200, completion_tokens: 20}}
"""
CLUSTER = """
version: 1
nodes:
  - {name: box, gpu_type: L40S, gpus: 2, interconnect: pcie}
"""
CLUSTER_DOC = {
    "version": 1,
    "nodes": [{"name": "live", "gpu_type": "L40S", "gpus": 2, "interconnect": "pcie"}],
}


@dataclass
class Running:
    server: Server
    channel: grpc.aio.Channel
    stub: planner_pb2_grpc.PlannerStub
    store: Store


async def start(redis_url: str, namespace: str) -> Running:
    config = PlannerConfig(redis_url=redis_url, namespace=namespace, drain_s=0.0, grace_s=1.0)
    store = Store.connect(redis_url, namespace=namespace)
    server = Server(config, [planner_binding(Planner(config, store))])
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    return Running(server, channel, planner_pb2_grpc.PlannerStub(channel), store)


async def stop(r: Running) -> None:
    await r.channel.close()
    await r.server.stop()
    await r.store.close()


@pytest.fixture
async def planner(redis_url: str, namespace: str) -> AsyncIterator[Running]:
    r = await start(redis_url, namespace)
    yield r
    await stop(r)


async def plan(r: Running, rate: float = 2.0, cluster: str = CLUSTER) -> planner_pb2.Plan:
    request = planner_pb2.PlanRequest(spec_yaml=SPEC.format(rate=rate), cluster_yaml=cluster)
    response: planner_pb2.PlanResponse = await r.stub.Plan(request)
    return response.plan


async def test_plan_is_stored_current_and_places(planner: Running, store: Store) -> None:
    health = health_pb2_grpc.HealthStub(planner.channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service="scepsy.v1.Planner"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    msg = await plan(planner)
    got = plan_from_pb(msg)
    assert sorted(got.allocation) == ["small", "tiny"]
    assert got.gpus <= 2 and got.rounds >= 1 and got.search_seconds > 0
    (chat,) = got.workflows
    assert chat.target_rps == 2.0 and chat.throughput_rps >= 2.0 / 0.9
    assert all(m.utilization <= 0.9 for m in got.llms)
    state = cluster_state(got.nodes, got.fraction_unit)
    assert validate(got.placement, state, instances_of(got.allocation, 2)) == ()

    # stored under its id and current, read back from Redis (not from the service's memory)
    assert await store.current_plan_id() == msg.id
    assert await store.get_plan(msg.id) == got
    current = await planner.stub.GetPlan(planner_pb2.GetPlanRequest())
    by_id = await planner.stub.GetPlan(planner_pb2.GetPlanRequest(id=msg.id))
    assert current.plan == by_id.plan == msg


async def test_plans_are_immutable_and_earlier_ones_stay_readable(
    planner: Running, store: Store
) -> None:
    first = await plan(planner, rate=2.0)
    again = await plan(planner, rate=2.0)
    # same inputs, same result: the same content hash, and the first document stands
    assert again.id == first.id and again.created_at == first.created_at
    second = await plan(planner, rate=20.0)
    assert second.id != first.id
    assert await store.current_plan_id() == second.id
    assert [i for i, _ in await store.list_plans()] == [second.id, first.id]
    old = await planner.stub.GetPlan(planner_pb2.GetPlanRequest(id=first.id))
    assert old.plan == first


async def test_plans_survive_a_restart(redis_url: str, namespace: str) -> None:
    r = await start(redis_url, namespace)
    try:
        msg = await plan(r)
    finally:
        await stop(r)
    fresh = await start(redis_url, namespace)  # a new process would see the same
    try:
        current = await fresh.stub.GetPlan(planner_pb2.GetPlanRequest())
        by_id = await fresh.stub.GetPlan(planner_pb2.GetPlanRequest(id=msg.id))
        assert current.plan == by_id.plan == msg
    finally:
        await stop(fresh)


async def test_plans_for_the_live_cluster(planner: Running, store: Store) -> None:
    # no cluster in the spec nor the request: the nodes the agents registered
    for node in parse_cluster(CLUSTER_DOC):
        await store.put_node(node, ttl_s=30)
    got = plan_from_pb(await plan(planner, cluster=""))
    assert [n.name for n in got.nodes] == ["live"]
    assert {a.node for a in got.placement.assignments} == {"live"}


async def test_errors_map_to_status_codes(planner: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plan(planner, rate=100_000.0)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "best achievable throughput with these GPUs: chat" in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planner.stub.GetPlan(planner_pb2.GetPlanRequest())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planner.stub.GetPlan(planner_pb2.GetPlanRequest(id="feedfacefeedface"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    bad = planner_pb2.PlanRequest(spec_yaml="version: 1\nworkflows: []\n", cluster_yaml=CLUSTER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planner.stub.Plan(bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec_yaml" in (caught.value.details() or "")


def test_plan_round_trips_through_protobuf() -> None:
    text = TEST_PLAN_SPEC.format(rate=0.3)
    plan = build_plan(text, spec_from_text(text), created_at=5.0)
    plan = dataclasses.replace(plan, rounds=3, constraints=("a reason", "another"))
    assert any(a.units < plan.fraction_unit for a in plan.placement.assignments)
    assert plan_from_pb(plan_to_pb(plan)) == plan
