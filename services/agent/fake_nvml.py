"""A stand-in for the ``pynvml`` module, for tests and GPU-less demos of the NVML code path.

It answers the NVML calls ``services.agent.nvml_reader`` makes, with ``pynvml``'s own constants and
error classes, from a recording of a real machine's topology (``recorded/*.json``: what
``nvidia-smi -q`` and ``nvidia-smi topo -m`` report). Unsupported calls raise ``NVMLError`` with the
code the real library uses, so the agent's error handling runs exactly as on hardware. Calls made
before ``nvmlInit`` raise ``NVMLError_Uninitialized``, as the real library does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

RECORDINGS_DIR = Path(__file__).parent / "recorded"
RECORDINGS = {p.stem: p for p in sorted(RECORDINGS_DIR.glob("*.json"))}

_TOPO = {
    "PIX": pynvml.NVML_TOPOLOGY_SINGLE,
    "PXB": pynvml.NVML_TOPOLOGY_MULTIPLE,
    "PHB": pynvml.NVML_TOPOLOGY_HOSTBRIDGE,
    "NODE": pynvml.NVML_TOPOLOGY_NODE,
    "SYS": pynvml.NVML_TOPOLOGY_SYSTEM,
}


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Pci:
    busId: str


@dataclass(frozen=True)
class _Handle:
    index: int


class FakeNvml:
    """Module-like object: ``FakeNvml.recorded("dgx-h100-nvswitch")`` replaces ``pynvml``."""

    def __init__(self, recording: dict[str, Any]) -> None:
        for name in dir(pynvml):
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, getattr(pynvml, name))
        self._rec = recording
        self._gpus: list[dict[str, Any]] = recording["gpus"]
        self._links = [self._expand_links(g.get("nvlinks")) for g in self._gpus]
        self._pcie = [row.split() for row in recording["pcie"]]
        self._initialised = 0

    @classmethod
    def recorded(cls, name: str) -> FakeNvml:
        if name not in RECORDINGS:
            raise KeyError(f"no recorded topology {name!r} (have: {', '.join(RECORDINGS)})")
        return cls(json.loads(RECORDINGS[name].read_text()))

    # --- library lifecycle -------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self._initialised += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self._initialised -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return str(self._rec["driver_version"])

    # --- devices -------------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self._gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return str(self._gpu(handle)["name"])

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return str(self._gpu(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> _Memory:
        gpu = self._gpu(handle)
        return _Memory(
            gpu["memory_total"], gpu["memory_free"], gpu["memory_total"] - gpu["memory_free"]
        )

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        major, minor = self._gpu(handle)["cc"]
        return int(major), int(minor)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        mode = self._gpu(handle)["mig"]
        if mode is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [int(mode), int(mode)]

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> _Pci:
        return _Pci(self._gpu(handle)["bus_id"])

    def nvmlDeviceGetNumaNodeId(self, handle: _Handle) -> int:
        return int(self._gpu(handle)["numa"])

    def nvmlDeviceGetCpuAffinity(self, handle: _Handle, cpu_set_size: int) -> list[int]:
        words = [0] * cpu_set_size
        for part in self._gpu(handle)["cpus"].split(","):
            lo, _, hi = part.partition("-")
            for cpu in range(int(lo), int(hi or lo) + 1):
                words[cpu // 64] |= 1 << (cpu % 64)
        return words

    # --- NVLink and topology -------------------------------------------------------------------
    def nvmlDeviceGetNvLinkState(self, handle: _Handle, link: int) -> int:
        links = self._nvlinks(handle)
        if not 0 <= link < pynvml.NVML_NVLINK_MAX_LINKS:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        enabled = link < len(links)
        return int(pynvml.NVML_FEATURE_ENABLED if enabled else pynvml.NVML_FEATURE_DISABLED)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: _Handle, link: int) -> int:
        kind, _ = self._active_link(handle, link)
        return int(
            pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH
            if kind == "switch"
            else pynvml.NVML_NVLINK_DEVICE_TYPE_GPU
        )

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: _Handle, link: int) -> _Pci:
        return _Pci(self._active_link(handle, link)[1])

    def nvmlDeviceGetP2PStatus(self, h1: _Handle, h2: _Handle, index: int) -> int:
        self._gpu(h1), self._gpu(h2)
        if index != pynvml.NVML_P2P_CAPS_INDEX_NVLINK:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        a, b = self._links[h1.index], self._links[h2.index]
        bus_a, bus_b = self._gpus[h1.index]["bus_id"], self._gpus[h2.index]["bus_id"]
        direct = any(remote == bus_b for _, remote in a) or any(remote == bus_a for _, remote in b)
        via_switch = any(k == "switch" for k, _ in a) and any(k == "switch" for k, _ in b)
        ok = h1.index != h2.index and (direct or via_switch)
        return int(pynvml.NVML_P2P_STATUS_OK if ok else pynvml.NVML_P2P_STATUS_NOT_SUPPORTED)

    def nvmlDeviceGetTopologyCommonAncestor(self, h1: _Handle, h2: _Handle) -> int:
        self._gpu(h1), self._gpu(h2)
        cell = self._pcie[h1.index][h2.index]
        return int(pynvml.NVML_TOPOLOGY_INTERNAL if cell == "X" else _TOPO[cell])

    # --- internals -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._initialised <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: _Handle) -> dict[str, Any]:
        self._check()
        return self._gpus[handle.index]

    def _nvlinks(self, handle: _Handle) -> list[tuple[str, str]]:
        self._gpu(handle)
        if self._gpus[handle.index].get("nvlinks") is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self._links[handle.index]

    def _active_link(self, handle: _Handle, link: int) -> tuple[str, str]:
        links = self._nvlinks(handle)
        if not 0 <= link < len(links):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return links[link]

    @staticmethod
    def _expand_links(spec: list[list[Any]] | None) -> list[tuple[str, str]]:
        return [(kind, remote) for kind, remote, count in spec or [] for _ in range(count)]
