"""The declared cluster format (cluster YAML, version 1).

Used for offline planning and to run node agents on GPU-less hosts. Example::

    version: 1
    name: demo
    nodes:
      - name: node-a
        gpu_type: H100-SXM        # catalogue name (services.core.cluster.hardware) or NVML product
        string
        gpus: 8
        interconnect: nvswitch    # nvswitch | nvlink-pairs | pcie
      - name: pcie-box
        gpu_type: L40S
        gpus: 8
        interconnect: pcie
        numa_nodes: 2             # optional, GPUs split evenly in index order (default 1)
      - name: a100
        gpu_type: A100-80GB-PCIe
        gpus: 4
        nvlink_domains: [[0, 1], [2, 3]]   # optional, explicit; overrides interconnect
        memory_gib: 80            # optional, default from the catalogue
        count: 2                  # optional: expands to a100-0, a100-1

Every error names the file, the field path and the value, e.g.
``cluster.yaml: nodes[1].gpus: must be a positive integer, got 'eight'``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.core.cluster.hardware import GIB, gpu_spec
from services.core.cluster.inventory import (
    GpuInfo,
    Link,
    NodeInventory,
    PcieLevel,
    Source,
    nvlink_domains,
)
from services.core.errors import InventoryError, UnknownGpuError

FORMAT_VERSION = 1
# Bounds on what a file may declare, so that a typo or hostile file is a clear error instead of
# millions of devices built in memory: the largest NVLink/PCIe nodes hold 16 GPUs, a cpu node
# declares devices as shares of its cores.
MAX_NODE_GPUS = 64
MAX_NODE_COUNT = 1024
MAX_CLUSTER_GPUS = 16384
INTERCONNECTS = ("nvswitch", "nvlink-pairs", "pcie")
_NODE_FIELDS = {
    "name",
    "gpu_type",
    "gpus",
    "interconnect",
    "nvlink_domains",
    "numa_nodes",
    "memory_gib",
    "count",
}


def load_cluster(path: str | Path) -> tuple[NodeInventory, ...]:
    """Read and validate a cluster YAML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(f"{p}: cannot read cluster file: {exc.strerror}") from exc
    except ValueError as exc:  # a NUL byte, or characters the file system cannot encode
        raise InventoryError(f"{str(path)!r}: not a usable cluster file path: {exc}") from exc
    return cluster_from_text(text, source=p.name, where=str(p))


def cluster_from_text(
    text: str, *, source: str = "cluster", where: str | None = None
) -> tuple[NodeInventory, ...]:
    """Parse and validate cluster YAML text; errors name ``source`` (``where`` for bad YAML)."""
    import yaml  # only parsing text needs it

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{where or source}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise InventoryError(f"{where or source}: nested too deeply to be a cluster") from None
    return parse_cluster(doc, source=source)


def parse_cluster(doc: Any, *, source: str = "cluster") -> tuple[NodeInventory, ...]:
    """Validate a parsed cluster document and build one inventory per node."""
    if not isinstance(doc, Mapping):
        raise InventoryError(f"{source}: top level: must be a mapping, got {_kind(doc)}")
    unknown = set(doc) - {"version", "name", "nodes"}
    if unknown:
        raise InventoryError(f"{source}: {sorted(unknown)[0]}: unknown field")
    version = doc.get("version")
    if version != FORMAT_VERSION:
        raise InventoryError(f"{source}: version: must be {FORMAT_VERSION}, got {version!r}")
    nodes = doc.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise InventoryError(f"{source}: nodes: must be a non-empty list, got {nodes!r}")
    result: list[NodeInventory] = []
    seen: set[str] = set()
    total = 0
    for i, raw in enumerate(nodes):
        parsed = _parse_node(raw, f"{source}: nodes[{i}]", MAX_CLUSTER_GPUS - total)
        total += sum(len(node.gpus) for node in parsed)
        for node in parsed:
            if node.name in seen:
                raise InventoryError(f"{source}: nodes[{i}].name: duplicate node {node.name!r}")
            seen.add(node.name)
            result.append(node)
    return tuple(result)


def _parse_node(raw: Any, where: str, budget: int) -> list[NodeInventory]:
    """The node entry's nodes; ``budget``: GPUs the cluster may still declare."""
    if not isinstance(raw, Mapping):
        raise InventoryError(f"{where}: must be a mapping, got {_kind(raw)}")
    unknown = set(raw) - _NODE_FIELDS
    if unknown:
        raise InventoryError(f"{where}.{sorted(unknown)[0]}: unknown field")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InventoryError(f"{where}.name: must be a non-empty string, got {name!r}")
    gpu_type = raw.get("gpu_type")
    if not isinstance(gpu_type, str):
        raise InventoryError(f"{where}.gpu_type: must be a string, got {gpu_type!r}")
    try:
        spec = gpu_spec(gpu_type)
    except UnknownGpuError as exc:
        raise InventoryError(f"{where}.gpu_type: {exc}") from exc
    gpus = _positive_int(raw.get("gpus"), f"{where}.gpus", MAX_NODE_GPUS)
    numa = _positive_int(raw.get("numa_nodes", 1), f"{where}.numa_nodes", MAX_NODE_GPUS)
    if numa > gpus:
        raise InventoryError(f"{where}.numa_nodes: must be <= gpus ({gpus}), got {numa}")
    count = _positive_int(raw.get("count", 1), f"{where}.count", MAX_NODE_COUNT)
    if gpus * count > budget:
        raise InventoryError(
            f"{where}: {count} x {gpus} GPUs take the cluster past {MAX_CLUSTER_GPUS} GPUs in all"
        )
    memory_gib = raw.get("memory_gib", spec.memory_gib)
    if isinstance(memory_gib, bool) or not isinstance(memory_gib, int | float) or memory_gib <= 0:
        raise InventoryError(f"{where}.memory_gib: must be a positive number, got {memory_gib!r}")
    domains = _declared_domains(raw, gpus, spec.nvlink_bandwidth > 0, where)

    names = [name] if count == 1 else [f"{name}-{i}" for i in range(count)]
    return [
        _build_node(n, spec.name, spec.nvml_names, gpus, numa, int(memory_gib * GIB), domains)
        for n in names
    ]


def _declared_domains(
    raw: Mapping[str, Any], gpus: int, has_nvlink: bool, where: str
) -> list[list[int]]:
    if "nvlink_domains" in raw:
        value = raw["nvlink_domains"]
        if not isinstance(value, list):
            raise InventoryError(f"{where}.nvlink_domains: must be a list of lists, got {value!r}")
        used: set[int] = set()
        domains: list[list[int]] = []
        for j, dom in enumerate(value):
            field_name = f"{where}.nvlink_domains[{j}]"
            if not isinstance(dom, list) or not dom:
                raise InventoryError(f"{field_name}: must be a non-empty list, got {dom!r}")
            for g in dom:
                if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < gpus:
                    raise InventoryError(
                        f"{field_name}: GPU index must be in 0..{gpus - 1}, got {g!r}"
                    )
                if g in used:
                    raise InventoryError(f"{field_name}: GPU {g} is in more than one domain")
                used.add(g)
            domains.append(sorted(dom))
        return domains
    interconnect = raw.get("interconnect", "nvswitch" if has_nvlink else "pcie")
    if interconnect not in INTERCONNECTS:
        raise InventoryError(
            f"{where}.interconnect: must be one of {', '.join(INTERCONNECTS)}, got {interconnect!r}"
        )
    if interconnect != "pcie" and not has_nvlink:
        raise InventoryError(
            f"{where}.interconnect: {interconnect!r} but this GPU type has no NVLink"
        )
    if interconnect == "nvswitch":
        return [list(range(gpus))]
    if interconnect == "nvlink-pairs":
        if gpus % 2:
            raise InventoryError(f"{where}.gpus: nvlink-pairs needs an even GPU count, got {gpus}")
        return [[g, g + 1] for g in range(0, gpus, 2)]
    return []


def _build_node(
    name: str,
    gpu_type: str,
    nvml_names: tuple[str, ...],
    gpus: int,
    numa_nodes: int,
    memory_bytes: int,
    domains: list[list[int]],
) -> NodeInventory:
    per_numa = -(-gpus // numa_nodes)
    numa_of = [g // per_numa for g in range(gpus)]
    domain_of = {g: k for k, dom in enumerate(domains) for g in dom}
    gpu_infos = tuple(
        GpuInfo(
            index=g,
            uuid="GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"scepsy-declared/{name}/{g}")),
            name=nvml_names[0] if nvml_names else gpu_type,
            gpu_type=gpu_type,
            memory_total_bytes=memory_bytes,
            memory_free_bytes=memory_bytes,
            numa_node=numa_of[g],
        )
        for g in range(gpus)
    )
    links = tuple(
        Link(
            gpu_a=a,
            gpu_b=b,
            nvlink_count=0,
            nvlink_p2p=a in domain_of and domain_of.get(a) == domain_of.get(b),
            pcie_level=PcieLevel.NODE if numa_of[a] == numa_of[b] else PcieLevel.SYSTEM,
        )
        for a in range(gpus)
        for b in range(a + 1, gpus)
    )
    return NodeInventory(
        name=name,
        hostname=name,
        driver_version="declared",
        gpus=gpu_infos,
        links=links,
        domains=nvlink_domains(gpus, links),
        source=Source.DECLARED,
    )


def _positive_int(value: Any, where: str, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InventoryError(f"{where}: must be a positive integer, got {value!r}")
    if value > most:
        raise InventoryError(f"{where}: must be at most {most}, got {value}")
    return value


def _kind(value: Any) -> str:
    return type(value).__name__
