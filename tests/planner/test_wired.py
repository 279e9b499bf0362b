"""The planner calling the Profiler and Placer services, as the contracts say: real gRPC over
loopback (each service its own server on port 0), a real Redis server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.core.cluster.declared import parse_cluster
from services.core.errors import InvalidInputError
from services.core.perf.backends import AnalyticBackend
from services.core.planning.feedback import search_placed
from services.core.planning.plan import placer_for, spec_from_text
from services.core.planning.profiles import SpecProfiles
from services.core.planning.space import Problem
from services.core.workload.trace import TraceCall, dumps
from services.placer.config import PlacerConfig
from services.placer.service import Placer, placer_binding
from services.planner.clients import PlacerClient
from services.planner.config import PlannerConfig
from services.planner.service import Planner, planner_binding
from services.profiler.service import profiler_binding
from services.runtime.config import ServiceConfig
from services.runtime.convert import plan_from_pb
from services.runtime.errors import error_from_rpc
from services.runtime.server import Server
from services.runtime.store import Store
from tests.core.planning.test_search import serial, synthetic
from tests.planner.test_planner_service import CLUSTER, SPEC

ANALYTIC = AnalyticBackend.engine


@dataclass
class Suite:
    profiler: Server
    placer: Server
    planner: Server
    channel: grpc.aio.Channel
    stub: planner_pb2_grpc.PlannerStub


async def start_suite(redis_url: str, namespace: str, store: Store, timeout_s: float) -> Suite:
    common = {"redis_url": redis_url, "namespace": namespace, "drain_s": 0.0, "grace_s": 1.0}
    profiler = Server(ServiceConfig(**common), [profiler_binding(store)])  # type: ignore[arg-type]
    await profiler.start()
    placer_config = PlacerConfig(**common)  # type: ignore[arg-type]
    placer = Server(placer_config, [placer_binding(Placer(placer_config, store))])
    await placer.start()
    config = PlannerConfig(
        **common,  # type: ignore[arg-type]
        profiler_address=profiler.address,
        placer_address=placer.address,
        rpc_timeout_s=timeout_s,
    )
    planner = Server(config, [planner_binding(Planner(config, store))])
    await planner.start()
    channel = grpc.aio.insecure_channel(planner.address)
    return Suite(profiler, placer, planner, channel, planner_pb2_grpc.PlannerStub(channel))


async def rpc_count(server: Server, service: str, method: str) -> float:
    """The server's ``scepsy_rpc_handled_total`` of one method with status OK, from GET /metrics."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
        http.get(f"http://{server.metrics_address}/metrics") as response,
    ):
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "scepsy_rpc_handled_total" and (
                labels.get("service"),
                labels.get("method"),
                labels.get("code"),
            ) == (service, method, "OK"):
                return sample.value
    return 0.0


@pytest.fixture
async def suite(redis_url: str, namespace: str, store: Store) -> AsyncIterator[Suite]:
    s = await start_suite(redis_url, namespace, store, timeout_s=10.0)
    yield s
    await s.channel.close()
    for server in (s.planner, s.placer, s.profiler):
        await server.stop()


async def test_a_plan_uses_the_profiler_the_placer_and_a_stored_profile(
    suite: Suite, store: Store
) -> None:
    text = SPEC.format(rate=2.0)
    # a profile measured beforehand and stored under its key: the plan must use it as stored
    spec = spec_from_text(text, parse_cluster(CLUSTER_DOC))
    query = SpecProfiles(spec).query("small", 1, 1.0)
    stored = AnalyticBackend().profile(query.model, query.gpu, 1, 1.0, query.mix, seed=0)
    await store.put_profile(stored)

    response = await suite.stub.Plan(planner_pb2.PlanRequest(spec_yaml=text, cluster_yaml=CLUSTER))
    plan = plan_from_pb(response.plan)
    sources = {m.model: m.profile_sources for m in plan.llms}
    assert sources["small"].get(f"stored {ANALYTIC}") == 1
    assert sources["small"].get(f"computed {ANALYTIC}", 0) >= 1
    assert set(sources["tiny"]) == {f"computed {ANALYTIC}"}
    # the profiles were computed by the Profiler service, which stores what it computes
    tiny = SpecProfiles(spec).query("tiny", 1, 1.0)
    assert await store.get_profile(tiny.key(ANALYTIC)) is not None
    assert sorted(plan.allocation) == ["small", "tiny"]
    # the planner called both services: their own RPC counters say so
    placed = await rpc_count(suite.placer, "scepsy.v1.Placer", "Place")
    profiled = await rpc_count(suite.profiler, "scepsy.v1.Profiler", "Profile")
    assert placed >= 1 and profiled == sum(sum(s.values()) for s in sources.values())

    # planned again: every profile is now read from the store, through the Profiler
    again = await suite.stub.Plan(
        planner_pb2.PlanRequest(spec_yaml=SPEC.format(rate=2.5), cluster_yaml=CLUSTER)
    )
    for m in plan_from_pb(again.plan).llms:
        assert set(m.profile_sources) == {f"stored {ANALYTIC}"}, m


async def test_the_placer_stopped_gives_unavailable_within_the_deadline(
    redis_url: str, namespace: str, store: Store
) -> None:
    s = await start_suite(redis_url, namespace, store, timeout_s=3.0)
    try:
        placer_address = s.placer.address
        await s.placer.stop()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await s.stub.Plan(
                planner_pb2.PlanRequest(spec_yaml=SPEC.format(rate=2.0), cluster_yaml=CLUSTER),
                timeout=30,
            )
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"placer at {placer_address}" in (caught.value.details() or "")
        assert elapsed < 3.0 + 5.0  # its own deadline, not the caller's 30 s
        assert await store.current_plan_id() is None  # nothing half-made was stored
    finally:
        await s.channel.close()
        await s.planner.stop()
        await s.profiler.stop()


async def test_a_workflow_takes_its_statistics_from_the_routers_recorded_trace(
    suite: Suite, store: Store
) -> None:
    now = time.time()
    lines = []
    for r in range(40):  # 40 requests: 3 calls to small (2 at once), then 1 to tiny
        t0 = now - 60 + r
        calls = [
            ("small", t0, t0 + 0.4),
            ("small", t0, t0 + 0.4),
            ("small", t0 + 0.4, t0 + 0.6),
            ("tiny", t0 + 0.6, t0 + 0.7),
        ]
        for i, (model, s, e) in enumerate(calls):
            call = TraceCall("chat", f"r{r}", f"c{i}", model, s, e, 300, 40, 0.05, "ok", "x/0")
            lines.append(dumps(call))
    await store.append_trace(lines, max_len=10_000)
    text = """
version: 1
fraction_unit: 2
models: {small: Qwen/Qwen2.5-0.5B, tiny: Qwen/Qwen3-0.6B}
workflows:
  - {name: chat, rate: 1.0, trace: router}
"""
    response = await suite.stub.Plan(planner_pb2.PlanRequest(spec_yaml=text, cluster_yaml=CLUSTER))
    plan = plan_from_pb(response.plan)
    loads = {m.model: m.load_cps for m in plan.llms}
    # n_small = 3 and n_tiny = 1 calls per request, at 1 request/s
    assert loads == pytest.approx({"small": 3.0, "tiny": 1.0})

    # a window that ends before the calls: nothing recorded, a clear error naming the window
    old = planner_pb2.PlanRequest(spec_yaml=text, cluster_yaml=CLUSTER, trace_window_s=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.stub.Plan(old)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no calls in the last 1 s" in (caught.value.details() or "")


async def test_a_bad_spec_is_invalid_argument_with_the_field_in_the_details(suite: Suite) -> None:
    text = SPEC.format(rate=-1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await suite.stub.Plan(planner_pb2.PlanRequest(spec_yaml=text, cluster_yaml=CLUSTER))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = error_from_rpc(caught.value)
    assert isinstance(error, InvalidInputError)
    assert error.field == "spec_yaml.workflows[0].rate"
    assert error.value == "-1"


async def test_placement_feedback_reads_the_placers_refusals_across_the_wire(
    suite: Suite, store: Store
) -> None:
    # the search's optimum (A 3/4, B 3/4, D 1/2 on 2 GPUs) does not pack; the placer says why,
    # the planner's client rebuilds the refusal and feedback finds the same plan as in-process
    problem = Problem(
        (serial("w", ("B", 1, 1), ("D", 2, 1), ("A", 0.5, 1)),), {"w": 0.75}, gpus=2, max_tp=1
    )
    nodes = parse_cluster(
        {
            "version": 1,
            "nodes": [{"name": "n", "gpu_type": "L40S", "gpus": 2, "interconnect": "pcie"}],
        }
    )
    client = PlacerClient(suite.placer.address, 10.0, nodes, 4)
    try:
        remote = await asyncio.to_thread(search_placed, problem, synthetic, client.place)
    finally:
        client.close()
    local = search_placed(problem, synthetic, placer_for(nodes, 4))
    assert remote.rounds == local.rounds > 1 and client.calls > 1  # refused, then placed
    assert remote.result.allocation == local.result.allocation
    assert remote.constraints.notes == local.constraints.notes
    assert remote.constraints.notes[0].startswith("fractions_do_not_pack: D")


CLUSTER_DOC = {
    "version": 1,
    "nodes": [{"name": "box", "gpu_type": "L40S", "gpus": 2, "interconnect": "pcie"}],
}
