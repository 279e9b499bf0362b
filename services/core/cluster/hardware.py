"""GPU facts: the accelerator catalogue every part agrees on.

Figures are vendor datasheet numbers for dense (non-sparse) BF16 tensor-core math. Bandwidths are
per direction. ``nvml_names`` lists the product strings NVML reports, so that an agent can map a
real device to its catalogue entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.core.errors import UnknownGpuError

GIB = 1024**3
GB = 1e9


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator type."""

    name: str
    peak_bf16_flops: float  # FLOP/s, dense
    hbm_bandwidth: float  # bytes/s
    memory_bytes: int
    nvlink_bandwidth: float  # bytes/s per direction per GPU; 0 when the part has no NVLink
    pcie_bandwidth: float  # bytes/s per direction
    nvml_names: tuple[str, ...] = ()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            name="H100-SXM",
            peak_bf16_flops=989e12,
            hbm_bandwidth=3.35e12,
            memory_bytes=80 * GIB,
            nvlink_bandwidth=450 * GB,
            pcie_bandwidth=64 * GB,
            nvml_names=("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
        ),
        GpuSpec(
            name="H200",
            peak_bf16_flops=989e12,
            hbm_bandwidth=4.8e12,
            memory_bytes=141 * GIB,
            nvlink_bandwidth=450 * GB,
            pcie_bandwidth=64 * GB,
            nvml_names=("NVIDIA H200", "NVIDIA H200 141GB HBM3e"),
        ),
        GpuSpec(
            name="A100-80GB-SXM",
            peak_bf16_flops=312e12,
            hbm_bandwidth=2.039e12,
            memory_bytes=80 * GIB,
            nvlink_bandwidth=300 * GB,
            pcie_bandwidth=32 * GB,
            nvml_names=("NVIDIA A100-SXM4-80GB",),
        ),
        GpuSpec(
            name="A100-40GB-SXM",
            peak_bf16_flops=312e12,
            hbm_bandwidth=1.555e12,
            memory_bytes=40 * GIB,
            nvlink_bandwidth=300 * GB,
            pcie_bandwidth=32 * GB,
            nvml_names=("NVIDIA A100-SXM4-40GB",),
        ),
        GpuSpec(
            name="A100-80GB-PCIe",
            peak_bf16_flops=312e12,
            hbm_bandwidth=1.935e12,
            memory_bytes=80 * GIB,
            nvlink_bandwidth=300 * GB,  # three NVLink bridges between a pair
            pcie_bandwidth=32 * GB,
            nvml_names=("NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-80GB"),
        ),
        GpuSpec(
            name="L40S",
            peak_bf16_flops=362e12,
            hbm_bandwidth=864 * GB,
            memory_bytes=48 * GIB,
            nvlink_bandwidth=0.0,
            pcie_bandwidth=32 * GB,
            nvml_names=("NVIDIA L40S",),
        ),
        # The local vLLM CPU engine (2 cores, fp32): lets the same models describe test engines.
        GpuSpec(
            name="cpu",
            peak_bf16_flops=0.2e12,
            hbm_bandwidth=20 * GB,
            memory_bytes=24 * GIB,
            nvlink_bandwidth=0.0,
            pcie_bandwidth=0.0,
        ),
    )
}

_ALIASES = {alias.lower(): spec.name for spec in GPUS.values() for alias in spec.nvml_names} | {
    "h100": "H100-SXM",
    "h100-sxm5": "H100-SXM",
    "a100": "A100-80GB-SXM",
    "a100-sxm": "A100-80GB-SXM",
    "a100-pcie": "A100-80GB-PCIe",
    "a100-40gb": "A100-40GB-SXM",
}


def gpu_spec(name: str) -> GpuSpec:
    """Look up a GPU type by catalogue name, NVML product string or common alias."""
    if name in GPUS:
        return GPUS[name]
    key = name.strip().lower()
    for spec_name, spec in GPUS.items():
        if spec_name.lower() == key:
            return spec
    if key in _ALIASES:
        return GPUS[_ALIASES[key]]
    raise UnknownGpuError(f"gpu type {name!r} is not in the catalogue (known: {', '.join(GPUS)})")


def gpu_type_of(nvml_name: str) -> str:
    """Catalogue name for an NVML product string; the product string itself when unknown."""
    try:
        return gpu_spec(nvml_name).name
    except UnknownGpuError:
        return nvml_name
