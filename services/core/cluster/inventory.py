"""Node inventory: GPUs, the links between them, and the NVLink domains derived from the links.

These are the domain types the agent builds (from NVML or from a declared cluster) and that the
placer consumes. ``nvlink_domains`` is the rule that turns pairwise links into the sets of GPUs that
can run one tensor-parallel group at NVLink speed.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class PcieLevel(enum.IntEnum):
    """NVML's common-ancestor level between two GPUs; higher is farther apart."""

    INTERNAL = 1
    SINGLE = 2
    MULTIPLE = 3
    HOSTBRIDGE = 4
    NODE = 5
    SYSTEM = 6


class Source(enum.Enum):
    NVML = "nvml"
    DECLARED = "declared"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    uuid: str
    name: str  # product string as NVML reports it
    gpu_type: str  # catalogue name (services.core.cluster.hardware)
    memory_total_bytes: int
    memory_free_bytes: int
    compute_capability: str = ""
    mig_enabled: bool = False
    numa_node: int = -1
    cpu_affinity: str = ""
    pci_bus_id: str = ""


@dataclass(frozen=True, slots=True)
class Link:
    """Connection of one unordered GPU pair, gpu_a < gpu_b."""

    gpu_a: int
    gpu_b: int
    nvlink_count: int
    nvlink_p2p: bool
    pcie_level: PcieLevel


@dataclass(frozen=True, slots=True)
class NodeInventory:
    name: str
    hostname: str
    driver_version: str
    gpus: tuple[GpuInfo, ...]
    links: tuple[Link, ...]
    domains: tuple[tuple[int, ...], ...]
    source: Source
    agent_address: str = ""
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def largest_domain(self) -> int:
        return max((len(d) for d in self.domains), default=0)


def nvlink_domains(gpu_count: int, links: Iterable[Link]) -> tuple[tuple[int, ...], ...]:
    """Partition GPUs into NVLink domains.

    Two GPUs are NVLink-connected when NVML reports P2P over NVLink or at least one active NVLink
    between them. A domain must be a clique: every pair inside can talk at NVLink speed, because a
    tensor-parallel group all-reduces across all its members. Connected components that are cliques
    (an NVSwitch board, a bridged pair) are kept whole; any other component (e.g. a hybrid cube
    mesh) is split greedily into the largest cliques first. GPUs without NVLink form domains of one.
    Domains are sorted by their first GPU index.
    """
    adjacent: list[set[int]] = [set() for _ in range(gpu_count)]
    for link in links:
        if link.nvlink_p2p or link.nvlink_count > 0:
            adjacent[link.gpu_a].add(link.gpu_b)
            adjacent[link.gpu_b].add(link.gpu_a)

    domains: list[tuple[int, ...]] = []
    seen: set[int] = set()
    for start in range(gpu_count):
        if start in seen:
            continue
        component = _component(start, adjacent)
        seen |= component
        domains.extend(_clique_cover(sorted(component), adjacent))
    return tuple(sorted(domains))


def _component(start: int, adjacent: Sequence[set[int]]) -> set[int]:
    stack, found = [start], {start}
    while stack:
        for nxt in adjacent[stack.pop()] - found:
            found.add(nxt)
            stack.append(nxt)
    return found


def _clique_cover(members: list[int], adjacent: Sequence[set[int]]) -> list[tuple[int, ...]]:
    remaining = list(members)
    cliques: list[tuple[int, ...]] = []
    while remaining:
        best: list[int] = []
        for seed in remaining:
            clique = [seed]
            for other in remaining:
                if other != seed and all(other in adjacent[c] for c in clique):
                    clique.append(other)
            if len(clique) > len(best):
                best = clique
        cliques.append(tuple(sorted(best)))
        remaining = [g for g in remaining if g not in best]
    return cliques
