"""NVLink domain derivation from pairwise links."""

from __future__ import annotations

import itertools

import pytest

from services.core.cluster.inventory import Link, PcieLevel, nvlink_domains


def links(n: int, connected: set[tuple[int, int]], *, p2p_only: bool = False) -> list[Link]:
    return [
        Link(
            gpu_a=a,
            gpu_b=b,
            nvlink_count=0 if p2p_only or (a, b) not in connected else 4,
            nvlink_p2p=(a, b) in connected,
            pcie_level=PcieLevel.SYSTEM,
        )
        for a, b in itertools.combinations(range(n), 2)
    ]


def all_pairs(gpus: range) -> set[tuple[int, int]]:
    return set(itertools.combinations(gpus, 2))


# Hybrid cube mesh (DGX-1 V100): two fully connected quads 0-3 and 4-7 plus i <-> i+4.
CUBE_MESH = all_pairs(range(4)) | all_pairs(range(4, 8)) | {(i, i + 4) for i in range(4)}


@pytest.mark.parametrize(
    ("n", "connected", "expected"),
    [
        # NVSwitch: every pair connected -> one domain of 8
        (8, all_pairs(range(8)), ((0, 1, 2, 3, 4, 5, 6, 7),)),
        # NVLink bridges in pairs -> two domains of 2
        (4, {(0, 1), (2, 3)}, ((0, 1), (2, 3))),
        # PCIe only -> every GPU alone
        (3, set(), ((0,), (1,), (2,))),
        # a component that is not a clique is split: the cube mesh's quads are its largest cliques
        (8, CUBE_MESH, ((0, 1, 2, 3), (4, 5, 6, 7))),
        # a chain 0-1-2: {0,1} is the first largest clique, 2 is left alone
        (3, {(0, 1), (1, 2)}, ((0, 1), (2,))),
        # no GPUs
        (0, set(), ()),
    ],
)
def test_domains(
    n: int, connected: set[tuple[int, int]], expected: tuple[tuple[int, ...], ...]
) -> None:
    assert nvlink_domains(n, links(n, connected)) == expected


def test_p2p_without_link_count_still_connects() -> None:
    # NVSwitch systems report the links as ending on switches; P2P status alone must suffice.
    assert nvlink_domains(2, links(2, {(0, 1)}, p2p_only=True)) == ((0, 1),)
