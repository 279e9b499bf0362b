"""The agent's NVML code path, run unchanged against the fake NVML's recorded machines."""

from __future__ import annotations

import pynvml
import pytest

from services.agent.fake_nvml import RECORDINGS, FakeNvml
from services.agent.nvml_reader import read_node
from services.agent.sources import NvmlSource
from services.core.cluster.inventory import PcieLevel
from services.core.errors import UnavailableError


@pytest.mark.parametrize(
    ("recording", "gpus", "gpu_type", "domains", "cc", "mig"),
    [
        ("dgx-h100-nvswitch", 8, "H100-SXM", ((0, 1, 2, 3, 4, 5, 6, 7),), "9.0", False),
        ("a100-pcie-nvlink-pairs", 4, "A100-80GB-PCIe", ((0, 1), (2, 3)), "8.0", False),
        ("l40s-pcie-2numa", 8, "L40S", tuple((g,) for g in range(8)), "8.9", False),
    ],
)
def test_recorded_topologies(
    recording: str,
    gpus: int,
    gpu_type: str,
    domains: tuple[tuple[int, ...], ...],
    cc: str,
    mig: bool,
) -> None:
    source = NvmlSource(FakeNvml.recorded(recording), node_name="n1", hostname="host")
    node = source.read()
    source.close()
    assert node.name == "n1" and node.hostname == "host"
    assert len(node.gpus) == gpus
    assert {g.gpu_type for g in node.gpus} == {gpu_type}
    assert node.domains == domains
    assert {g.compute_capability for g in node.gpus} == {cc}
    assert {g.mig_enabled for g in node.gpus} == {mig}
    assert len({g.uuid for g in node.gpus}) == gpus
    assert len(node.links) == gpus * (gpus - 1) // 2
    assert node.driver_version


def test_h100_links_and_affinity() -> None:
    nvml = FakeNvml.recorded("dgx-h100-nvswitch")
    nvml.nvmlInit()
    node = read_node(nvml, node_name="dgx", hostname="dgx")
    # 18 NVLinks per GPU, all to NVSwitches: every pair counts the smaller side's 18
    assert {lk.nvlink_count for lk in node.links} == {18}
    assert all(lk.nvlink_p2p for lk in node.links)
    # GPUs 0-3 on socket 0, 4-7 on socket 1
    assert [g.numa_node for g in node.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert node.gpus[0].cpu_affinity == "0-55,112-167"
    assert node.gpus[7].cpu_affinity == "56-111,168-223"
    by_pair = {(lk.gpu_a, lk.gpu_b): lk for lk in node.links}
    assert by_pair[(0, 3)].pcie_level is PcieLevel.NODE
    assert by_pair[(3, 4)].pcie_level is PcieLevel.SYSTEM
    # memory straight from NVML's MemoryInfo
    assert node.gpus[0].memory_total_bytes == 81559 * 1024**2
    assert node.gpus[0].memory_free_bytes < node.gpus[0].memory_total_bytes


def test_a100_bridge_pairs() -> None:
    nvml = FakeNvml.recorded("a100-pcie-nvlink-pairs")
    nvml.nvmlInit()
    by_pair = {
        (lk.gpu_a, lk.gpu_b): lk for lk in read_node(nvml, node_name="a", hostname="a").links
    }
    # three bridges = 12 direct links between 0-1 and 2-3, seen once per pair
    assert by_pair[(0, 1)].nvlink_count == 12 and by_pair[(0, 1)].nvlink_p2p
    assert by_pair[(2, 3)].nvlink_count == 12
    assert by_pair[(1, 2)].nvlink_count == 0 and not by_pair[(1, 2)].nvlink_p2p
    assert by_pair[(1, 2)].pcie_level is PcieLevel.SYSTEM


def test_l40s_pcie_levels() -> None:
    nvml = FakeNvml.recorded("l40s-pcie-2numa")
    nvml.nvmlInit()
    by_pair = {
        (lk.gpu_a, lk.gpu_b): lk for lk in read_node(nvml, node_name="l", hostname="l").links
    }
    assert by_pair[(0, 1)].pcie_level is PcieLevel.SINGLE  # same PCIe switch
    assert by_pair[(1, 2)].pcie_level is PcieLevel.NODE  # same socket
    assert by_pair[(3, 4)].pcie_level is PcieLevel.SYSTEM  # across sockets
    assert not any(lk.nvlink_p2p or lk.nvlink_count for lk in by_pair.values())


def test_fake_behaves_like_nvml_before_init() -> None:
    nvml = FakeNvml.recorded("l40s-pcie-2numa")
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


def test_every_recording_loads() -> None:
    assert set(RECORDINGS) == {"dgx-h100-nvswitch", "a100-pcie-nvlink-pairs", "l40s-pcie-2numa"}


def test_real_nvml_without_gpu_is_a_clear_error() -> None:
    # On this GPU-less machine the real library is absent: the agent says what to do instead.
    with pytest.raises(UnavailableError, match="--cluster FILE --node-name NAME"):
        NvmlSource(pynvml, node_name="x")


@pytest.mark.gpu
def test_real_nvml_on_a_gpu_host() -> None:
    source = NvmlSource(pynvml, node_name="gpu-host")
    node = source.read()
    source.close()
    assert node.gpus and all(g.memory_total_bytes > 0 for g in node.gpus)
    assert sorted(g for d in node.domains for g in d) == list(range(len(node.gpus)))
