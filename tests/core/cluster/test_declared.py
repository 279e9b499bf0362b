"""The declared cluster format: valid files build inventories, malformed ones name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.core.cluster.declared import load_cluster, parse_cluster
from services.core.cluster.hardware import GIB
from services.core.cluster.inventory import PcieLevel, Source
from services.core.errors import InventoryError

REPO = Path(__file__).resolve().parents[3]


def doc(**node: Any) -> dict[str, Any]:
    base = {"name": "n", "gpu_type": "H100-SXM", "gpus": 8}
    return {"version": 1, "nodes": [base | node]}


def test_example_two_node_h100() -> None:
    nodes = load_cluster(REPO / "deploy/examples/cluster-2xh100.yaml")
    assert [n.name for n in nodes] == ["h100-0", "h100-1"]
    for node in nodes:
        assert node.source is Source.DECLARED
        assert len(node.gpus) == 8
        assert node.domains == ((0, 1, 2, 3, 4, 5, 6, 7),)
        assert {g.gpu_type for g in node.gpus} == {"H100-SXM"}
        assert node.gpus[0].memory_total_bytes == 80 * GIB
        # numa_nodes: 2 puts GPUs 0-3 and 4-7 on different sockets
        assert [g.numa_node for g in node.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    link_0_4 = next(lk for lk in nodes[0].links if (lk.gpu_a, lk.gpu_b) == (0, 4))
    assert link_0_4.pcie_level is PcieLevel.SYSTEM
    # UUIDs are stable and distinct across nodes
    assert nodes[0].gpus[0].uuid != nodes[1].gpus[0].uuid
    assert (
        load_cluster(REPO / "deploy/examples/cluster-2xh100.yaml")[0].gpus[0].uuid
        == nodes[0].gpus[0].uuid
    )


@pytest.mark.parametrize(
    ("node", "domains"),
    [
        ({"interconnect": "nvswitch", "gpus": 4}, ((0, 1, 2, 3),)),
        (
            {"gpu_type": "A100-80GB-PCIe", "gpus": 4, "interconnect": "nvlink-pairs"},
            ((0, 1), (2, 3)),
        ),
        ({"gpu_type": "L40S", "gpus": 2}, ((0,), (1,))),  # no NVLink on L40S: PCIe by default
        ({"gpus": 4, "nvlink_domains": [[0, 2], [1, 3]]}, ((0, 2), (1, 3))),
    ],
)
def test_interconnects(node: dict[str, Any], domains: tuple[tuple[int, ...], ...]) -> None:
    (inv,) = parse_cluster(doc(**node))
    assert inv.domains == domains


def test_memory_override_and_count() -> None:
    nodes = parse_cluster(doc(memory_gib=40, count=3))
    assert [n.name for n in nodes] == ["n-0", "n-1", "n-2"]
    assert nodes[2].gpus[0].memory_total_bytes == 40 * GIB


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "top level: must be a mapping, got list"),
        ({"version": 2, "nodes": []}, "version: must be 1, got 2"),
        ({"version": 1, "nodes": []}, "nodes: must be a non-empty list"),
        ({"version": 1, "nodes": [], "extra": 1}, "extra: unknown field"),
        ({"version": 1, "nodes": ["x"]}, "nodes[0]: must be a mapping, got str"),
        (doc(gpus="eight"), "nodes[0].gpus: must be a positive integer, got 'eight'"),
        (doc(gpus=0), "nodes[0].gpus: must be a positive integer, got 0"),
        (doc(gpus=True), "nodes[0].gpus: must be a positive integer, got True"),
        (doc(gpus=2**31), "nodes[0].gpus: must be at most 64, got 2147483648"),
        (doc(count=2**63), "nodes[0].count: must be at most 1024, got 9223372036854775808"),
        (
            doc(gpus=64, count=1000),
            "nodes[0]: 1000 x 64 GPUs take the cluster past 16384 GPUs in all",
        ),
        (doc(name=""), "nodes[0].name: must be a non-empty string, got ''"),
        (doc(gpu_type="B300"), "nodes[0].gpu_type: gpu type 'B300' is not in the catalogue"),
        (doc(interconnect="infiniband"), "nodes[0].interconnect: must be one of"),
        (doc(gpu_type="L40S", interconnect="nvswitch"), "this GPU type has no NVLink"),
        (
            doc(gpus=3, interconnect="nvlink-pairs"),
            "nodes[0].gpus: nvlink-pairs needs an even GPU count",
        ),
        (
            doc(nvlink_domains=[[0, 8]]),
            "nodes[0].nvlink_domains[0]: GPU index must be in 0..7, got 8",
        ),
        (
            doc(nvlink_domains=[[0, 1], [1, 2]]),
            "nvlink_domains[1]: GPU 1 is in more than one domain",
        ),
        (doc(nvlink_domains="all"), "nodes[0].nvlink_domains: must be a list of lists"),
        (doc(memory_gib=-1), "nodes[0].memory_gib: must be a positive number, got -1"),
        (doc(numa_nodes=9), "nodes[0].numa_nodes: must be <= gpus (8), got 9"),
        (doc(gpuz=8), "nodes[0].gpuz: unknown field"),
        (
            {"version": 1, "nodes": [doc()["nodes"][0], doc()["nodes"][0]]},
            "nodes[1].name: duplicate node 'n'",
        ),
    ],
)
def test_malformed_inventories_name_the_field(document: Any, message: str) -> None:
    with pytest.raises(InventoryError) as err:
        parse_cluster(document, source="c.yaml")
    assert str(err.value).startswith("c.yaml: ")
    assert message in str(err.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read cluster file"):
        load_cluster(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [unclosed\n")
    with pytest.raises(InventoryError, match=r"bad.yaml: not valid YAML"):
        load_cluster(bad)
