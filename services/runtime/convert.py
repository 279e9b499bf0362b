"""Conversion between core domain types and scepsy.v1 protobuf messages (the only module, with the
servicers, that imports generated code)."""

from __future__ import annotations

from protos.scepsy.v1 import types_pb2 as pb
from services.core.inventory import GpuInfo, Link, NodeInventory, PcieLevel, Source
from services.core.profile import Profile, ProfileKey, ProfilePoint

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
    )
