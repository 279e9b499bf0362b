"""Read a node's inventory and topology through NVML.

``read_node`` takes the NVML binding as a parameter (the ``pynvml`` module in production, the fake
in ``services.agent.fake_nvml`` in tests): it uses only calls and constants that ``pynvml`` has, so
the same code runs against both. Calls a GPU does not support (NVLink on a PCIe card, MIG on an
L40S, NUMA queries on old drivers) raise ``NVMLError``; they are read as "absent", not as failures.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from services.core.cluster.hardware import gpu_type_of
from services.core.cluster.inventory import (
    GpuInfo,
    Link,
    NodeInventory,
    PcieLevel,
    Source,
    nvlink_domains,
)

_PCIE_LEVELS = {
    "NVML_TOPOLOGY_INTERNAL": PcieLevel.INTERNAL,
    "NVML_TOPOLOGY_SINGLE": PcieLevel.SINGLE,
    "NVML_TOPOLOGY_MULTIPLE": PcieLevel.MULTIPLE,
    "NVML_TOPOLOGY_HOSTBRIDGE": PcieLevel.HOSTBRIDGE,
    "NVML_TOPOLOGY_NODE": PcieLevel.NODE,
    "NVML_TOPOLOGY_SYSTEM": PcieLevel.SYSTEM,
}
_CPU_MASK_WORDS = 16  # 16 x 64 bits: room for 1024 logical CPUs


def read_node(nvml: Any, *, node_name: str, hostname: str) -> NodeInventory:
    """Inventory and topology of this host. NVML must already be initialised."""
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus = tuple(_read_gpu(nvml, i, h) for i, h in enumerate(handles))
    links = _read_links(nvml, handles, [g.pci_bus_id for g in gpus])
    return NodeInventory(
        name=node_name,
        hostname=hostname,
        driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
        gpus=gpus,
        links=links,
        domains=nvlink_domains(count, links),
        source=Source.NVML,
    )


def _read_gpu(nvml: Any, index: int, handle: Any) -> GpuInfo:
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=name,
        gpu_type=gpu_type_of(name),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        compute_capability=f"{major}.{minor}",
        mig_enabled=_optional(nvml, lambda: nvml.nvmlDeviceGetMigMode(handle)[0], 0)
        == nvml.NVML_DEVICE_MIG_ENABLE,
        numa_node=_optional(nvml, lambda: int(nvml.nvmlDeviceGetNumaNodeId(handle)), -1),
        cpu_affinity=_optional(
            nvml,
            lambda: _cpu_list(nvml.nvmlDeviceGetCpuAffinity(handle, _CPU_MASK_WORDS)),
            "",
        ),
        pci_bus_id=_bus_id(nvml.nvmlDeviceGetPciInfo(handle)),
    )


def _read_links(nvml: Any, handles: list[Any], bus_ids: list[str]) -> tuple[Link, ...]:
    index_of_bus = {bus: i for i, bus in enumerate(bus_ids)}
    direct: Counter[tuple[int, int]] = Counter()  # NVLinks that end on another GPU
    switch_links = [0] * len(handles)  # NVLinks that end on an NVSwitch
    for i, handle in enumerate(handles):
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            state = _optional(nvml, lambda h=handle, k=link: nvml.nvmlDeviceGetNvLinkState(h, k), 0)
            if state != nvml.NVML_FEATURE_ENABLED:
                continue
            kind = _optional(
                nvml,
                lambda h=handle, k=link: nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, k),
                nvml.NVML_NVLINK_DEVICE_TYPE_GPU,
            )
            if kind == nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH:
                switch_links[i] += 1
                continue
            remote = _bus_id(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
            j = index_of_bus.get(remote)
            if j is not None and j != i:
                direct[(min(i, j), max(i, j))] += 1

    links = []
    for a in range(len(handles)):
        for b in range(a + 1, len(handles)):
            p2p = _optional(
                nvml,
                lambda a=a, b=b: nvml.nvmlDeviceGetP2PStatus(
                    handles[a], handles[b], nvml.NVML_P2P_CAPS_INDEX_NVLINK
                ),
                -1,
            )
            nvlink_p2p = p2p == nvml.NVML_P2P_STATUS_OK
            # Each direct link is seen from both ends; through NVSwitch every GPU's switch links
            # carry its traffic to any peer, so the pair gets the smaller of the two counts.
            count = direct[(a, b)] // 2 if direct[(a, b)] else 0
            if not count and nvlink_p2p and switch_links[a] and switch_links[b]:
                count = min(switch_links[a], switch_links[b])
            level = nvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
            links.append(
                Link(
                    gpu_a=a,
                    gpu_b=b,
                    nvlink_count=count,
                    nvlink_p2p=nvlink_p2p,
                    pcie_level=_pcie_level(nvml, level),
                )
            )
    return tuple(links)


def _pcie_level(nvml: Any, value: int) -> PcieLevel:
    for const, level in _PCIE_LEVELS.items():
        if getattr(nvml, const) == value:
            return level
    return PcieLevel.SYSTEM


def _optional(nvml: Any, call: Any, default: Any) -> Any:
    try:
        return call()
    except nvml.NVMLError:
        return default


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bus_id(pci: Any) -> str:
    return _text(pci.busId).upper()


def _cpu_list(mask_words: Any) -> str:
    """Turn NVML's array of 64-bit CPU masks into a CPU list such as "0-55,112-167"."""
    cpus = [
        w * 64 + bit for w, word in enumerate(mask_words) for bit in range(64) if word >> bit & 1
    ]
    ranges: list[str] = []
    start = prev = None
    for cpu in cpus:
        if start is None:
            start = prev = cpu
        elif cpu == prev + 1:  # type: ignore[operator]
            prev = cpu
        else:
            ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = cpu
    if start is not None:
        ranges.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(ranges)
