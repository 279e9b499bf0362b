"""Conversion between core domain types and scepsy.v1 protobuf messages (the only module, with the
servicers, that imports generated code)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from protos.scepsy.v1 import planner_pb2 as planner_pb
from protos.scepsy.v1 import types_pb2 as pb
from services.core.allocation import Allocation
from services.core.cluster.inventory import GpuInfo, Link, NodeInventory, PcieLevel, Source
from services.core.cluster.models import ModelSpec
from services.core.errors import InvalidInputError
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.placement.heuristic import Assignment, Fragmentation, Placement
from services.core.planning.plan import LlmForecast, Plan, WorkflowForecast
from services.core.workload.spec import ModelServing

_SOURCE_TO_PB = {
    Source.NVML: pb.INVENTORY_SOURCE_NVML,
    Source.DECLARED: pb.INVENTORY_SOURCE_DECLARED,
}
_SOURCE_FROM_PB = {v: k for k, v in _SOURCE_TO_PB.items()}


def node_to_pb(node: NodeInventory) -> pb.Node:
    return pb.Node(
        name=node.name,
        hostname=node.hostname,
        driver_version=node.driver_version,
        gpus=[gpu_to_pb(g) for g in node.gpus],
        topology=topology_to_pb(node),
        source=_SOURCE_TO_PB[node.source],
        agent_address=node.agent_address,
        started_at=node.started_at,
        heartbeat_at=node.heartbeat_at,
    )


def topology_to_pb(node: NodeInventory) -> pb.Topology:
    return pb.Topology(
        links=[
            pb.Link(
                gpu_a=link.gpu_a,
                gpu_b=link.gpu_b,
                nvlink_count=link.nvlink_count,
                nvlink_p2p=link.nvlink_p2p,
                pcie_level=pb.PcieLevel.Value(f"PCIE_LEVEL_{link.pcie_level.name}"),
            )
            for link in node.links
        ],
        domains=[pb.NvlinkDomain(gpus=list(d)) for d in node.domains],
    )


def gpu_to_pb(gpu: GpuInfo) -> pb.Gpu:
    return pb.Gpu(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name,
        gpu_type=gpu.gpu_type,
        memory_total_bytes=gpu.memory_total_bytes,
        memory_free_bytes=gpu.memory_free_bytes,
        compute_capability=gpu.compute_capability,
        mig_enabled=gpu.mig_enabled,
        numa_node=gpu.numa_node,
        cpu_affinity=gpu.cpu_affinity,
        pci_bus_id=gpu.pci_bus_id,
    )


def node_from_pb(msg: pb.Node) -> NodeInventory:
    return NodeInventory(
        name=msg.name,
        hostname=msg.hostname,
        driver_version=msg.driver_version,
        gpus=tuple(
            GpuInfo(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                gpu_type=g.gpu_type,
                memory_total_bytes=g.memory_total_bytes,
                memory_free_bytes=g.memory_free_bytes,
                compute_capability=g.compute_capability,
                mig_enabled=g.mig_enabled,
                numa_node=g.numa_node,
                cpu_affinity=g.cpu_affinity,
                pci_bus_id=g.pci_bus_id,
            )
            for g in msg.gpus
        ),
        links=tuple(
            Link(
                gpu_a=link.gpu_a,
                gpu_b=link.gpu_b,
                nvlink_count=link.nvlink_count,
                nvlink_p2p=link.nvlink_p2p,
                pcie_level=PcieLevel[pb.PcieLevel.Name(link.pcie_level).removeprefix("PCIE_LEVEL_")]
                if link.pcie_level
                else PcieLevel.SYSTEM,
            )
            for link in msg.topology.links
        ),
        domains=tuple(tuple(d.gpus) for d in msg.topology.domains),
        source=_SOURCE_FROM_PB.get(msg.source, Source.DECLARED),
        agent_address=msg.agent_address,
        started_at=msg.started_at,
        heartbeat_at=msg.heartbeat_at,
    )


def profile_key_to_pb(key: ProfileKey) -> pb.ProfileKey:
    return pb.ProfileKey(
        model=key.model,
        gpu_type=key.gpu_type,
        tp=key.tp,
        fraction=key.fraction,
        engine=key.engine,
        mix=key.mix,
    )


def profile_key_from_pb(msg: pb.ProfileKey) -> ProfileKey:
    return ProfileKey(
        model=msg.model,
        gpu_type=msg.gpu_type,
        tp=msg.tp,
        fraction=msg.fraction,
        engine=msg.engine,
        mix=msg.mix,
    )


def profile_to_pb(profile: Profile) -> pb.Profile:
    return pb.Profile(
        key=profile_key_to_pb(profile.key),
        points=[
            pb.ProfilePoint(
                rate=p.rate,
                mean_latency_s=p.mean_latency,
                p50_latency_s=p.p50_latency,
                p99_latency_s=p.p99_latency,
                ttft_s=p.ttft,
                tpot_s=p.tpot,
            )
            for p in profile.points
        ],
        saturation_rate=profile.saturation_rate,
    )


def profile_from_pb(msg: pb.Profile) -> Profile:
    """A stored profile; one measured in fan-out groups (``method_json``: ``mode: fanout``)
    carries its group size, so that the ALP does not count the fan-out twice."""
    return Profile(
        key=profile_key_from_pb(msg.key),
        points=tuple(
            ProfilePoint(
                rate=p.rate,
                mean_latency=p.mean_latency_s,
                p50_latency=p.p50_latency_s,
                p99_latency=p.p99_latency_s,
                ttft=p.ttft_s,
                tpot=p.tpot_s,
            )
            for p in msg.points
        ),
        saturation_rate=msg.saturation_rate,
        group=_measured_group(msg.method_json),
    )


def _measured_group(method_json: str) -> float:
    if not method_json:
        return 1.0
    try:
        method = json.loads(method_json)
    except ValueError:
        return 1.0
    if not isinstance(method, dict) or method.get("mode") != "fanout":
        return 1.0
    group = method.get("fanout", 1)
    return float(group) if isinstance(group, int | float) and group >= 1 else 1.0


# ---------------------------------------------------------------- allocation and placement
def allocation_to_pb(allocation: Mapping[str, Allocation], k: int) -> pb.Allocation:
    """Fractions travel as whole units of 1/k (``fraction_units``)."""
    return pb.Allocation(
        fraction_unit=k,
        llms=[
            pb.LlmAllocation(
                model=model,
                fraction_units=round(a.fraction * k),
                tp=a.tp,
                replicas=a.replicas,
            )
            for model, a in sorted(allocation.items())
        ],
    )


def allocation_from_pb(msg: pb.Allocation) -> tuple[dict[str, Allocation], int]:
    """(allocation by model, k). Raises ``InvalidInputError`` naming the field."""
    k = msg.fraction_unit
    if k < 1:
        raise InvalidInputError(f"allocation.fraction_unit: must be >= 1, got {k}")
    out: dict[str, Allocation] = {}
    for i, llm in enumerate(msg.llms):
        where = f"allocation.llms[{i}]"
        if not llm.model:
            raise InvalidInputError(f"{where}.model: must not be empty")
        if llm.model in out:
            raise InvalidInputError(f"{where}.model: {llm.model!r} is listed twice")
        if not 1 <= llm.fraction_units <= k:
            raise InvalidInputError(
                f"{where}.fraction_units: must be in 1..{k}, got {llm.fraction_units}"
            )
        try:
            out[llm.model] = Allocation(llm.fraction_units / k, llm.tp, llm.replicas)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where} ({llm.model}): {exc}") from None
    return out, k


def assignment_to_pb(a: Assignment) -> pb.Assignment:
    return pb.Assignment(
        model=a.model,
        replica=a.replica,
        node=a.node,
        gpus=list(a.gpus),
        mps_percentage=a.mps_percentage,
        memory_fraction=a.memory_fraction,
        units=a.units,
    )


def assignment_from_pb(msg: pb.Assignment, k: int) -> Assignment:
    """``units`` when the sender set it; otherwise from the MPS percentage,
    ``floor(100 u / k)``: ``u = ceil(mps k / 100)``, exact for k <= 100 (0 or 100: a whole GPU)."""
    mps = msg.mps_percentage
    units = msg.units or (k if mps in (0, 100) else min(k, max(1, math.ceil(mps * k / 100 - 1e-9))))
    return Assignment(
        model=msg.model,
        replica=msg.replica,
        node=msg.node,
        gpus=tuple(msg.gpus),
        units=units,
        mps_percentage=mps or 100,
        memory_fraction=msg.memory_fraction,
    )


def fragmentation_to_pb(f: Fragmentation) -> pb.Fragmentation:
    return pb.Fragmentation(
        partly_used_gpus=f.partly_used_gpus,
        stranded_fraction=f.stranded_fraction,
        largest_free_tp=f.largest_free_tp,
        stranded_units=f.stranded_units,
        largest_free_block=f.largest_free_block,
        free_gpus=f.free_gpus,
        broken_domains=f.broken_domains,
    )


def fragmentation_from_pb(f: pb.Fragmentation) -> Fragmentation:
    return Fragmentation(
        partly_used_gpus=f.partly_used_gpus,
        stranded_units=f.stranded_units,
        stranded_fraction=f.stranded_fraction,
        largest_free_tp=f.largest_free_tp,
        largest_free_block=f.largest_free_block,
        free_gpus=f.free_gpus,
        broken_domains=f.broken_domains,
    )


def placement_to_pb(placement: Placement) -> pb.Placement:
    """Lossless: units per assignment, k, the memory margin and every fragmentation metric."""
    return pb.Placement(
        assignments=[assignment_to_pb(a) for a in placement.assignments],
        fragmentation=fragmentation_to_pb(placement.fragmentation),
        fraction_unit=placement.k,
        memory_margin=placement.memory_margin,
    )


def placement_from_pb(msg: pb.Placement, k: int) -> Placement:
    """Inverse of ``placement_to_pb``; ``k`` applies when the message does not carry one."""
    k = msg.fraction_unit or k
    return Placement(
        k=k,
        memory_margin=msg.memory_margin,
        assignments=assignments_from_pb(msg, k),
        fragmentation=fragmentation_from_pb(msg.fragmentation),
    )


def assignments_from_pb(msg: pb.Placement, k: int) -> tuple[Assignment, ...]:
    return tuple(assignment_from_pb(a, msg.fraction_unit or k) for a in msg.assignments)


# ---------------------------------------------------------------- model
def model_to_pb(model: ModelSpec) -> pb.Model:
    return pb.Model(
        name=model.name,
        layers=model.layers,
        hidden_size=model.hidden,
        attention_heads=model.heads,
        kv_heads=model.kv_heads,
        head_dim=model.head_dim,
        intermediate_size=model.intermediate,
        vocab_size=model.vocab,
        experts=model.experts,
        active_experts=model.active_experts,
        dtype_bytes=model.dtype_bytes,
        gated_mlp=model.gated_mlp,
        tied_embeddings=model.tied_embeddings,
        max_position=model.max_position,
    )


def model_from_pb(msg: pb.Model) -> ModelSpec:
    """Inverse of ``model_to_pb``; raises ``InvalidInputError`` naming the first bad field."""
    for name in (
        "layers",
        "hidden_size",
        "attention_heads",
        "kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "dtype_bytes",
    ):
        if getattr(msg, name) < 1:
            raise InvalidInputError(f"model_spec.{name}: must be >= 1, got {getattr(msg, name)}")
    if not msg.name:
        raise InvalidInputError("model_spec.name: must not be empty")
    return ModelSpec(
        name=msg.name,
        layers=msg.layers,
        hidden=msg.hidden_size,
        heads=msg.attention_heads,
        kv_heads=msg.kv_heads,
        head_dim=msg.head_dim,
        intermediate=msg.intermediate_size,
        vocab=msg.vocab_size,
        experts=msg.experts or 1,
        active_experts=msg.active_experts or 1,
        dtype_bytes=msg.dtype_bytes,
        gated_mlp=msg.gated_mlp if msg.HasField("gated_mlp") else True,
        tied_embeddings=msg.tied_embeddings,
        max_position=msg.max_position or 4096,
    )


# ---------------------------------------------------------------- plan
def plan_to_pb(plan: Plan) -> planner_pb.Plan:
    return planner_pb.Plan(
        id=plan.id,
        created_at=plan.created_at,
        spec_yaml=plan.spec_text,
        allocation=allocation_to_pb(plan.allocation, plan.fraction_unit),
        predictions=[
            planner_pb.WorkflowPrediction(
                workflow=w.workflow,
                latency_s=w.latency_s,
                throughput_rps=w.throughput_rps,
                target_rps=w.target_rps,
                weight=w.weight,
            )
            for w in plan.workflows
        ],
        placement=placement_to_pb(plan.placement),
        search_seconds=plan.search_seconds,
        nodes=[node_to_pb(n) for n in plan.nodes],
        rho=plan.rho,
        llms=[
            planner_pb.LlmPrediction(
                model=m.model,
                load_cps=m.load_cps,
                utilization=m.utilization,
                call_latency_s=m.call_latency_s,
                gpus=m.gpus,
                profile_sources=m.profile_sources,
            )
            for m in plan.llms
        ],
        objective_s=plan.objective_s,
        rounds=plan.rounds,
        constraints=list(plan.constraints),
        profile_seconds=plan.profile_seconds,
        serving=[
            planner_pb.ModelServing(
                model=m.model,
                weights=m.weights,
                served_name=m.served_name,
                max_model_len=m.max_model_len or 0,
                engine_args=list(m.engine_args),
            )
            for m in plan.serving
        ],
        refinement=list(plan.refinement),
        simulated_latency_s=plan.simulated_latency_s,
    )


def plan_from_pb(msg: planner_pb.Plan) -> Plan:
    """Inverse of ``plan_to_pb``; raises ``InvalidInputError`` for a malformed allocation."""
    allocation, k = allocation_from_pb(msg.allocation)
    return Plan(
        id=msg.id,
        created_at=msg.created_at,
        spec_text=msg.spec_yaml,
        nodes=tuple(node_from_pb(n) for n in msg.nodes),
        fraction_unit=k,
        rho=msg.rho,
        allocation=allocation,
        workflows=tuple(
            WorkflowForecast(w.workflow, w.target_rps, w.weight, w.latency_s, w.throughput_rps)
            for w in msg.predictions
        ),
        llms=tuple(
            LlmForecast(
                m.model,
                m.load_cps,
                m.utilization,
                m.call_latency_s,
                m.gpus,
                dict(sorted(m.profile_sources.items())),
            )
            for m in msg.llms
        ),
        objective_s=msg.objective_s,
        placement=placement_from_pb(msg.placement, k),
        search_seconds=msg.search_seconds,
        profile_seconds=msg.profile_seconds,
        rounds=msg.rounds,
        constraints=tuple(msg.constraints),
        serving=tuple(
            ModelServing(
                m.model, m.weights, m.served_name, m.max_model_len or None, tuple(m.engine_args)
            )
            for m in msg.serving
        ),
        refinement=tuple(msg.refinement),
        simulated_latency_s=(
            msg.simulated_latency_s if msg.HasField("simulated_latency_s") else None
        ),
    )
