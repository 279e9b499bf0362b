"""Placement: hard rules on the recorded topologies and on multi-node clusters, the heuristic
against the exact MILP on hand-checked cases, incremental re-placement, infeasibility reasons.

Keys are ``Fragmentation.key()`` = (stranded units, -largest free TP group, broken domains, partly
used GPUs); the comments derive each expected key by hand.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import pytest

from services.agent.fake_nvml import FakeNvml
from services.agent.sources import NvmlSource
from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError
from services.core.placement.heuristic import (
    Assignment,
    ClusterState,
    InfeasibleKind,
    Instance,
    Placement,
    PlacementInfeasible,
    cluster_state,
    enforcement,
    instances_of,
    make_assignment,
    place,
    place_allocation,
    replace_running,
    validate,
)
from services.core.placement.milp import place_exact


def recorded(name: str) -> NodeInventory:
    return NvmlSource(FakeNvml.recorded(name), "n").read()


def cluster(
    gpu_type: str = "H100-SXM", gpus: int = 8, count: int = 1, **extra: Any
) -> tuple[NodeInventory, ...]:
    node = {"name": "n", "gpu_type": gpu_type, "gpus": gpus, "count": count} | extra
    return parse_cluster({"version": 1, "nodes": [node]})


def busy(node: str, gpu: int, units: int, k: int = 4) -> Assignment:
    """An engine of someone else, taking ``units`` of one GPU."""
    return make_assignment("other", gpu, node, [gpu], units, k, 0.05)


def where(p: Placement) -> dict[tuple[str, int], tuple[str, tuple[int, ...]]]:
    return {(a.model, a.replica): (a.node, a.gpus) for a in p.assignments}


def placed_ok(p: Placement, state: ClusterState, inst: Sequence[Instance]) -> Placement:
    assert validate(p, state, inst) == ()
    return p


# ------------------------------------------------------------------------ recorded topologies
def test_h100_nvswitch_tp_groups_fill_numa_nodes_then_fractions_pack() -> None:
    node = recorded("dgx-h100-nvswitch")  # one domain of 8; GPUs 0-3 on NUMA 0, 4-7 on NUMA 1
    state = cluster_state([node], 4)
    alloc = {"big": Allocation(1.0, 4, 1), "mid": Allocation(1.0, 2, 1), "s": Allocation(0.5, 1, 2)}
    inst = instances_of(alloc, 4)
    p = placed_ok(place(inst, state), state, inst)
    # TP4 takes a whole NUMA node; TP2 half of the other; both halves share GPU 6
    assert where(p) == {
        ("big", 0): ("n", (0, 1, 2, 3)),
        ("mid", 0): ("n", (4, 5)),
        ("s", 0): ("n", (6,)),
        ("s", 1): ("n", (6,)),
    }
    assert [(a.mps_percentage, a.memory_fraction) for a in p.assignments] == [
        (100, 0.95),
        (100, 0.95),
        (50, 0.475),
        (50, 0.475),
    ]
    # GPU 7 alone stays free: nothing stranded, TP 1 still fits, the domain is broken
    assert p.fragmentation.key() == (0, -1, 1, 0)
    assert p.fragmentation.free_gpus == 1


def test_a100_nvlink_pairs() -> None:
    node = recorded("a100-pcie-nvlink-pairs")  # domains (0, 1), (2, 3)
    state = cluster_state([node], 4)
    inst = instances_of({"tp2": Allocation(1.0, 2, 1), "q": Allocation(0.75, 1, 2)}, 4)
    p = placed_ok(place(inst, state), state, inst)
    tp2 = next(a for a in p.assignments if a.model == "tp2")
    assert tp2.gpus in ((0, 1), (2, 3))
    # the 3/4s need two GPUs of the other pair: 1/4 stranded on each
    assert p.fragmentation.key() == (2, 0, 0, 2)
    with pytest.raises(PlacementInfeasible) as err:
        place(instances_of({"tp4": Allocation(1.0, 4, 1)}, 4), state)
    assert err.value.kind is InfeasibleKind.TP_EXCEEDS_DOMAIN
    assert (err.value.model, err.value.needed, err.value.available) == ("tp4", 4, 2)
    assert str(err.value).startswith("tp_exceeds_domain: tp4: TP 4 ")


def test_l40s_pcie_has_no_tp_groups_but_packs_fractions() -> None:
    node = recorded("l40s-pcie-2numa")  # no NVLink: eight domains of one GPU
    state = cluster_state([node], 4)
    inst = instances_of({"a": Allocation(0.25, 1, 5), "b": Allocation(0.75, 1, 3)}, 4)
    p = placed_ok(place(inst, state), state, inst)
    # 3/4 + 1/4 three times fill three GPUs; the last two 1/4s share a fourth
    assert p.fragmentation.key() == (2, -1, 0, 1)
    assert len({a.gpus for a in p.assignments}) == 4
    with pytest.raises(PlacementInfeasible) as err:
        place(instances_of({"tp2": Allocation(1.0, 2, 1)}, 4), state)
    assert (err.value.kind, err.value.available) == (InfeasibleKind.TP_EXCEEDS_DOMAIN, 1)


def test_multi_node_cluster_of_mixed_topologies() -> None:
    nodes = parse_cluster(
        {
            "version": 1,
            "nodes": [
                {"name": "h", "gpu_type": "H100-SXM", "gpus": 8, "count": 2, "numa_nodes": 2},
                {
                    "name": "a",
                    "gpu_type": "A100-80GB-PCIe",
                    "gpus": 4,
                    "interconnect": "nvlink-pairs",
                },
                {"name": "l", "gpu_type": "L40S", "gpus": 8, "numa_nodes": 2},
            ],
        }
    )
    state = cluster_state(nodes, 4)
    alloc = {
        "tp8": Allocation(1.0, 8, 1),
        "tp4": Allocation(1.0, 4, 2),
        "tp2": Allocation(1.0, 2, 2),
        "w": Allocation(1.0, 1, 3),
        "f": Allocation(0.25, 1, 6),
    }
    inst = instances_of(alloc, 4)
    p = placed_ok(place(inst, state), state, inst)
    by_model = {a.model: a for a in p.assignments}
    assert by_model["tp8"].node.startswith("h-")
    # TP2s best-fit into the A100 pairs, keeping the second H100 whole for the two TP4s
    assert {a.node for a in p.assignments if a.model == "tp2"} == {"a"}
    assert {a.node for a in p.assignments if a.model == "tp4"} == {"h-1"}
    assert p.fragmentation.stranded_units == 2  # six 1/4s on two GPUs


# ------------------------------------------------------------------------ hard rules, property
def random_case(rng: random.Random) -> tuple[ClusterState, tuple[Instance, ...]]:
    k = rng.choice([2, 4, 8])
    kind = rng.choice(
        [("H100-SXM", 8, "nvswitch"), ("A100-80GB-PCIe", 4, "nvlink-pairs"), ("L40S", 8, "pcie")]
    )
    nodes = cluster(kind[0], kind[1], rng.randint(1, 5), interconnect=kind[2], numa_nodes=2)
    reserved = [
        busy(n.name, g.index, rng.randint(1, k), k)
        for n in nodes
        for g in n.gpus
        if rng.random() < 0.25
    ]
    state = cluster_state(nodes, k, reserved=reserved)
    budget = sum(g.free_units for g in state.gpus) / k * rng.uniform(0.3, 1.1)
    alloc = {}
    for m in range(rng.randint(1, 6)):
        tp = rng.choice([t for t in (1, 1, 2, 4, 8) if t <= state.largest_domain])
        a = Allocation(1.0 if tp > 1 else rng.randint(1, k) / k, tp, rng.randint(1, 6))
        if a.gpus <= budget:
            budget -= a.gpus
            alloc[f"m{m}"] = a
    return state, instances_of(alloc, k)


def test_random_placements_never_break_a_hard_rule() -> None:
    rng = random.Random(7)
    placed = 0
    for _ in range(300):
        state, inst = random_case(rng)
        try:
            p = place(inst, state)
        except PlacementInfeasible as exc:
            assert exc.kind in InfeasibleKind
            continue
        placed += 1
        assert validate(p, state, inst) == ()
    assert placed > 200  # the sample exercises the packing, not just the errors


def test_validator_names_each_broken_rule() -> None:
    nodes = cluster(count=2, numa_nodes=2)
    state = cluster_state(nodes, 4, reserved=[busy("n-1", 3, 2)])
    inst = instances_of({"t": Allocation(1.0, 2, 1), "f": Allocation(0.5, 1, 2)}, 4)
    good = place(inst, state)
    assert validate(good, state, inst) == ()

    def broken(**change: Any) -> set[str]:
        a = dataclasses.replace(good.assignments[0], **change)
        p = dataclasses.replace(good, assignments=(a, *good.assignments[1:]))
        return {v.rule for v in validate(p, state, inst)}

    def rules(*assignments: Assignment) -> set[str]:
        p = dataclasses.replace(good, assignments=assignments)
        return {v.rule for v in validate(p, state)}

    tp = next(a for a in good.assignments if a.model == "t")
    assert rules(dataclasses.replace(tp, node="n-0", gpus=(0, 8))) == {"unknown_gpu"}
    assert rules(dataclasses.replace(tp, node="zz")) == {"unknown_node"}
    two_nodes = cluster_state(cluster("A100-80GB-PCIe", 4, interconnect="nvlink-pairs"), 4)
    pair = make_assignment("t", 0, "n", [1, 2], 4, 4, 0.05)
    assert {
        v.rule for v in validate(dataclasses.replace(good, assignments=(pair,)), two_nodes)
    } == {"tp_across_domains"}
    half = make_assignment("f", 0, "n-0", [5], 2, 4, 0.05)
    assert rules(half, half) == {"duplicate_instance"}
    on_busy = dataclasses.replace(half, node="n-1", gpus=(3,))  # 2 of its 4 units are taken
    assert rules(on_busy) == set()
    assert rules(on_busy, dataclasses.replace(on_busy, replica=1)) == {
        "compute_overcommit",
        "memory_overcommit",
    }
    assert rules(dataclasses.replace(half, gpus=(3, 4))) == {"fraction_on_many_gpus"}
    assert rules(dataclasses.replace(half, memory_fraction=0.9)) == {"enforcement"}
    assert rules(make_assignment("x", 0, "n-0", [0], 5, 4, 0.05)) >= {"units_out_of_range"}
    assert broken(model="zz") == {"instances"}


def test_memory_used_by_others_is_not_overcommitted() -> None:
    (node,) = cluster()
    gpus = list(node.gpus)
    total = gpus[0].memory_total_bytes
    gpus[0] = dataclasses.replace(gpus[0], memory_free_bytes=total // 2)  # someone uses half
    gpus[1] = dataclasses.replace(gpus[1], memory_free_bytes=int(total * 0.99))  # the driver
    gpus[2] = dataclasses.replace(gpus[2], mig_enabled=True)
    node = dataclasses.replace(node, gpus=tuple(gpus))
    state = cluster_state([node], 4)
    # share = 0.95 - (0.5 - 0.05) = 0.5 -> floor(4 * 0.5 / 0.95) = 2 units; 1% fits the margin
    assert [g.free_units for g in state.gpus[:4]] == [2, 4, 0, 4]
    # our own running engine's memory is free for us: 1/2 capped at 0.475 of the GPU
    ours = make_assignment("m", 0, "n", [0], 2, 4, 0.05)
    # used 0.5 - ours 0.475 = 0.025 of others: within the margin
    assert cluster_state([node], 4, current=[ours]).gpus[0].free_units == 4
    inst = instances_of({"m": Allocation(0.75, 1, 1)}, 4)
    p = place(inst, state)
    assert validate(p, state, inst) == ()
    assert p.assignments[0].gpus != (0,)


def test_enforcement_values() -> None:
    assert enforcement(4, 4, 0.05) == (100, 0.95)
    assert enforcement(1, 3, 0.05) == (33, 0.316667)
    assert enforcement(2, 3, 0.0) == (66, 0.666667)
    assert enforcement(1, 200, 0.0) == (1, 0.005)


# ------------------------------------------------------------------------ heuristic vs optimum
def nodes_a100(count: int) -> tuple[NodeInventory, ...]:
    return cluster("A100-80GB-PCIe", 4, count, interconnect="nvlink-pairs", numa_nodes=2)


CASES: list[
    tuple[str, tuple[NodeInventory, ...], int, list[Assignment], dict[str, Allocation], Any]
] = [
    # 3 TP4 on 2 nodes: node 0 full, node 1 half: largest free TP 4, node 1 broken
    ("tp4x3", cluster(count=2), 4, [], {"t": Allocation(1.0, 4, 3)}, (0, -4, 1, 0)),
    # 3/4+1/4 and 1/2+1/2 fill two GPUs of one pair; the other pair stays whole (TP 2)
    (
        "pairs",
        nodes_a100(1),
        4,
        [],
        {"a": Allocation(0.75, 1, 1), "b": Allocation(0.25, 1, 1), "c": Allocation(0.5, 1, 2)},
        (0, -2, 0, 0),
    ),
    # free units [8,8,6,8 | 8,2,8,8]: 3/8+3/8 fill the 6; 5/8+3/8 fill GPU 3 (its pair-mate is
    # busy); n-1 GPU 1 keeps 2 units stranded, its pair is broken; two whole pairs remain
    (
        "busy-k8",
        nodes_a100(2),
        8,
        [busy("n-0", 2, 2, 8), busy("n-1", 1, 6, 8)],
        {"big": Allocation(0.625, 1, 1), "small": Allocation(0.375, 1, 3)},
        (2, -2, 1, 1),
    ),
    # node 0 has a busy GPU 7 (3 units free): four TP2 complete node 1, the fifth goes to node 0,
    # which keeps 5 whole GPUs (TP 4); only node 0 is broken
    (
        "complete",
        cluster(count=2),
        4,
        [busy("n-0", 7, 1)],
        {"t": Allocation(1.0, 2, 5)},
        (3, -4, 1, 1),
    ),
    # busy GPU 7 on nodes 0 and 2: filling them (3 + 2 TP2) keeps node 1 whole: TP 8 still fits
    (
        "keep-tp8",
        cluster(count=3),
        4,
        [busy("n-0", 7, 1), busy("n-2", 7, 1)],
        {"t": Allocation(1.0, 2, 5)},
        (6, -8, 2, 2),
    ),
]


@pytest.mark.parametrize(
    ("name", "nodes", "k", "reserved", "alloc", "key"), CASES, ids=[c[0] for c in CASES]
)
def test_heuristic_reaches_the_hand_derived_optimum(
    name: str,
    nodes: tuple[NodeInventory, ...],
    k: int,
    reserved: list[Assignment],
    alloc: dict[str, Allocation],
    key: Any,
) -> None:
    pytest.importorskip("highspy")
    state = cluster_state(nodes, k, reserved=reserved)
    inst = instances_of(alloc, k)
    heuristic = placed_ok(place(inst, state), state, inst)
    exact = place_exact(inst, state)
    assert exact.optimal
    placed_ok(exact.placement, state, inst)
    assert exact.placement.fragmentation.key() == key
    assert heuristic.fragmentation.key() == key


def test_exact_reports_why_it_cannot_place() -> None:
    pytest.importorskip("highspy")
    (node,) = cluster("L40S", 8)
    state = cluster_state([node], 4, reserved=[busy("n", g, 1) for g in range(8)])
    inst = instances_of({"h": Allocation(0.5, 1, 9)}, 4)  # 18 units of 24, one half per GPU
    for solver in (place, lambda i, s: place_exact(i, s).placement):
        with pytest.raises(PlacementInfeasible) as err:
            solver(inst, state)
        assert err.value.kind is InfeasibleKind.FRACTIONS_DO_NOT_PACK
    two = cluster_state(cluster(count=2), 4, reserved=[busy("n-0", 0, 1), busy("n-1", 0, 1)])
    tp8 = instances_of({"t": Allocation(1.0, 8, 1)}, 4)
    for solver in (place, lambda i, s: place_exact(i, s).placement):
        with pytest.raises(PlacementInfeasible) as err:
            solver(tp8, two)
        assert (err.value.kind, err.value.available) == (InfeasibleKind.TP_GROUP_DOES_NOT_FIT, 7)


# ------------------------------------------------------------------------ spreading
def test_replicas_spread_over_nodes_when_it_costs_nothing() -> None:
    # GPUs 0 and 1 of both nodes have 1 unit free: four equally tight slots
    reserved = [busy(n, g, 3) for n in ("n-0", "n-1") for g in (0, 1)]
    state = cluster_state(cluster(count=2), 4, reserved=reserved)
    inst = instances_of({"a": Allocation(0.25, 1, 2), "b": Allocation(0.25, 1, 2)}, 4)
    p = placed_ok(place(inst, state), state, inst)
    for model in ("a", "b"):
        assert {a.node for a in p.assignments if a.model == model} == {"n-0", "n-1"}
    whole = cluster_state(cluster("L40S", 8, 2), 4)
    inst = instances_of({"w": Allocation(1.0, 1, 2)}, 4)
    assert {a.node for a in place(inst, whole).assignments} == {"n-0", "n-1"}


def test_spreading_never_breaks_a_second_domain() -> None:
    # both nodes have 4 whole GPUs; two TP2 replicas share one node so the other stays intact
    reserved = [busy(n, g, 4) for n in ("n-0", "n-1") for g in (4, 5, 6, 7)]
    state = cluster_state(cluster(count=2), 4, reserved=reserved)
    p = place(instances_of({"t": Allocation(1.0, 2, 2)}, 4), state)
    assert {a.node for a in p.assignments} == {"n-0"}


# ------------------------------------------------------------------------ incremental
def first_placement() -> tuple[tuple[NodeInventory, ...], dict[str, Allocation], Placement]:
    nodes = cluster(count=2, numa_nodes=2)
    alloc = {
        "big": Allocation(1.0, 4, 2),
        "mid": Allocation(1.0, 1, 2),
        "s": Allocation(0.25, 1, 3),
    }
    return nodes, alloc, place(instances_of(alloc, 4), cluster_state(nodes, 4))


def test_same_allocation_keeps_everything() -> None:
    nodes, alloc, first = first_placement()
    r = place_allocation(alloc, 4, nodes, current=first.assignments)
    assert (len(r.kept), len(r.started), len(r.stopped), len(r.moved)) == (7, 0, 0, 0)
    assert r.placement.assignments == first.assignments


def test_more_fewer_and_changed_replicas() -> None:
    nodes, _, first = first_placement()
    alloc = {
        "big": Allocation(1.0, 4, 3),
        "mid": Allocation(0.5, 1, 2),
        "s": Allocation(0.25, 1, 1),
    }
    r = place_allocation(alloc, 4, nodes, current=first.assignments)
    state = cluster_state(nodes, 4, current=first.assignments)
    assert validate(r.placement, state, instances_of(alloc, 4)) == ()
    kept = {(a.model, a.replica) for a in r.kept}
    assert kept == {("big", 0), ("big", 1), ("s", 0)}  # lowest replica ids stay
    assert {(a.model, a.replica) for a in r.stopped} == {("mid", 0), ("mid", 1), ("s", 1), ("s", 2)}
    # new ids never reuse a running (or just stopped) id of the model
    assert {(a.model, a.replica) for a in r.started} == {("big", 2), ("mid", 2), ("mid", 3)}
    old = where(first)
    assert all(old[(a.model, a.replica)] == (a.node, a.gpus) for a in r.kept)
    assert r.moved == ()


def test_instances_on_a_lost_node_move_with_their_ids() -> None:
    nodes, alloc, first = first_placement()
    alloc = {"mid": alloc["mid"], "s": alloc["s"]}
    lost = {a.node for a in first.assignments if a.model == "s"}.pop()
    survivors = tuple(n for n in nodes if n.name != lost)
    current = tuple(a for a in first.assignments if a.model != "big")
    r = place_allocation(alloc, 4, survivors, current=current)
    moved = {(old.model, old.replica) for old, _ in r.moved}
    assert moved == {(a.model, a.replica) for a in current if a.node == lost}
    assert all(new.node != lost and new.replica == old.replica for old, new in r.moved)
    assert len(r.kept) + len(r.moved) == len(current)
    assert validate(r.placement, cluster_state(survivors, 4), instances_of(alloc, 4)) == ()


def test_a_newly_busy_gpu_moves_its_fraction() -> None:
    nodes, alloc, first = first_placement()
    s0 = next(a for a in first.assignments if a.model == "s")
    state = cluster_state(
        nodes, 4, reserved=[busy(s0.node, s0.gpus[0], 4)], current=first.assignments
    )
    r = replace_running(instances_of(alloc, 4), state, first.assignments)
    assert {old.gpus for old, _ in r.moved} == {s0.gpus}
    assert len(r.moved) == 3 and not r.started and not r.stopped
    assert validate(r.placement, state, instances_of(alloc, 4)) == ()


def test_when_keeping_blocks_the_new_plan_it_is_placed_afresh() -> None:
    nodes = cluster(count=2)
    spread = (
        make_assignment("w", 0, "n-0", [0], 4, 4, 0.05),
        make_assignment("w", 1, "n-1", [0], 4, 4, 0.05),
    )
    alloc = {"w": Allocation(1.0, 1, 2), "t": Allocation(1.0, 8, 1)}
    r = place_allocation(alloc, 4, nodes, current=spread)
    assert validate(r.placement, cluster_state(nodes, 4), instances_of(alloc, 4)) == ()
    assert len(r.started) == 1 and r.started[0].model == "t"
    assert len(r.kept) == 1 and len(r.moved) == 1  # one w had to leave the TP8's node


# ------------------------------------------------------------------------ bad inputs
def test_not_enough_gpus_says_how_many() -> None:
    state = cluster_state(cluster(), 4)
    with pytest.raises(PlacementInfeasible) as err:
        place(instances_of({"a": Allocation(1.0, 4, 2), "b": Allocation(0.5, 1, 1)}, 4), state)
    assert (err.value.kind, err.value.needed, err.value.available) == (
        InfeasibleKind.NOT_ENOUGH_GPUS,
        8.5,
        8,
    )
    with pytest.raises(PlacementInfeasible, match="no nodes"):
        place_allocation({"a": Allocation(1.0, 1, 1)}, 4, [])


def test_malformed_inputs_are_invalid_not_infeasible() -> None:
    with pytest.raises(InvalidInputError, match=r"x\.fraction: must be a multiple of 1/4"):
        instances_of({"x": Allocation(0.3, 1, 1)}, 4)
    with pytest.raises(InvalidInputError, match="fraction_unit"):
        instances_of({"x": Allocation(1.0, 1, 1)}, 0)
    with pytest.raises(InvalidInputError, match="a fraction needs tp 1"):
        place([Instance("x", 0, 2, 2)], cluster_state(cluster(), 4))
    with pytest.raises(InvalidInputError, match="duplicate node"):
        cluster_state(cluster() + cluster(), 4)
