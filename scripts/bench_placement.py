"""Placement benchmark: the heuristic against the exact MILP, and the heuristic at 8,000 GPUs.

    .venv/bin/python scripts/bench_placement.py            # tables
    .venv/bin/python scripts/bench_placement.py --json     # one JSON document

1. Gap to the optimum: for each topology (8x H100 SXM NVSwitch, 4x A100 PCIe with NVLink pairs,
   8x L40S PCIe; two NUMA nodes each) on 1, 2 and 4 nodes and each fraction unit k, ``--seeds``
   random allocations (models with TP 1-8, fractions of 1/k, 1-5 replicas, filling 50-100% of the
   free GPUs); every second case starts on a busy cluster (about 20% of the GPUs partly used by
   other engines). Both placements are checked against the hard rules; the gap is counted per
   term of ``Fragmentation.key`` (stranded GPUs, largest free TP group, broken NVLink domains,
   partly used GPUs).
2. Scale: 1,000 nodes x 8 H100 (8,000 GPUs), an allocation using about 90% of them (TP 8/4/2/1
   and fractions), fresh and on a busy cluster, and an incremental re-placement after the
   replica counts change; the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.placement.heuristic import (
    ClusterState,
    Placement,
    PlacementInfeasible,
    cluster_state,
    instances_of,
    make_assignment,
    place,
    replace_running,
    validate,
)
from services.core.placement.milp import place_exact

TOPOLOGIES = {
    "h100-nvswitch": {"gpu_type": "H100-SXM", "gpus": 8, "interconnect": "nvswitch"},
    "a100-nvlink-pairs": {"gpu_type": "A100-80GB-PCIe", "gpus": 4, "interconnect": "nvlink-pairs"},
    "l40s-pcie": {"gpu_type": "L40S", "gpus": 8, "interconnect": "pcie"},
}


def nodes_of(topology: str, count: int) -> tuple[NodeInventory, ...]:
    node = {"name": "n", "numa_nodes": 2, "count": count, **TOPOLOGIES[topology]}
    return parse_cluster({"version": 1, "nodes": [node]})


def busy(nodes: Sequence[NodeInventory], k: int, rng: random.Random, share: float) -> list[Any]:
    """Engines of someone else on about ``share`` of the GPUs, each 1..k-1 units."""
    out = []
    for node in nodes:
        for gpu in node.gpus:
            if rng.random() < share:
                units = rng.randint(1, k - 1)
                out.append(
                    make_assignment("other", len(out), node.name, [gpu.index], units, k, 0.05)
                )
    return out


def random_allocation(state: ClusterState, rng: random.Random) -> dict[str, Allocation]:
    k = state.k
    budget = sum(g.free_units for g in state.gpus) / k * rng.uniform(0.5, 1.0)
    tps = [t for t in (1, 1, 2, 4, 8) if t <= state.largest_domain]
    out: dict[str, Allocation] = {}
    for m in range(rng.randint(2, 6)):
        tp = rng.choice(tps)
        fraction = 1.0 if tp > 1 else rng.randint(1, k) / k
        replicas = rng.randint(1, 5)
        if tp * fraction * replicas <= budget:
            budget -= tp * fraction * replicas
            out[f"m{m}"] = Allocation(fraction, tp, replicas)
    return out or {"m0": Allocation(1 / k, 1, 1)}


@dataclass
class Case:
    topology: str
    nodes: int
    k: int
    busy: bool
    heuristic: tuple[int, ...] | str  # Fragmentation.key() or the infeasibility kind
    exact: tuple[int, ...] | str
    heuristic_s: float
    exact_s: float
    proven: bool


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    try:
        result = fn()
    except PlacementInfeasible as exc:
        result = exc
    return result, time.perf_counter() - start


def key_or_kind(result: Placement | PlacementInfeasible, state: ClusterState, inst: Any) -> Any:
    if isinstance(result, PlacementInfeasible):
        return result.kind.value
    problems = validate(result, state, inst)
    if problems:
        raise SystemExit(f"hard rule violated: {problems}")
    return result.fragmentation.key()


def gap_cases(seeds: int, units: Sequence[int], time_limit: float) -> list[Case]:
    cases = []
    for topology in TOPOLOGIES:
        for count in (1, 2, 4):
            nodes = nodes_of(topology, count)
            for k in units:
                rng = random.Random(f"{topology}/{count}/{k}")
                for seed in range(seeds):
                    is_busy = seed % 2 == 1
                    reserved = busy(nodes, k, rng, 0.2) if is_busy else []
                    state = cluster_state(nodes, k, reserved=reserved)
                    inst = instances_of(random_allocation(state, rng), k)
                    h, h_s = timed(lambda: place(inst, state))  # noqa: B023
                    e, e_s = timed(lambda: place_exact(inst, state, time_limit_s=time_limit))  # noqa: B023
                    exact = e if isinstance(e, PlacementInfeasible) else e.placement
                    cases.append(
                        Case(
                            topology,
                            count,
                            k,
                            is_busy,
                            key_or_kind(h, state, inst),
                            key_or_kind(exact, state, inst),
                            h_s,
                            e_s,
                            isinstance(e, PlacementInfeasible) or e.optimal,
                        )
                    )
    return cases


def summarize(cases: list[Case]) -> list[dict[str, Any]]:
    rows = []
    groups: dict[tuple[str, int], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.topology, c.nodes), []).append(c)
    for (topology, count), group in groups.items():
        both = [c for c in group if isinstance(c.heuristic, tuple) and isinstance(c.exact, tuple)]
        gaps = [_diff(c) for c in both]
        rows.append(
            {
                "topology": topology,
                "nodes": count,
                "gpus": count * int(TOPOLOGIES[topology]["gpus"]),
                "cases": len(group),
                "placed": len(both),
                "infeasible_both": sum(
                    1 for c in group if isinstance(c.exact, str) and c.heuristic == c.exact
                ),
                "only_exact_places": sum(
                    1 for c in group if isinstance(c.heuristic, str) and isinstance(c.exact, tuple)
                ),
                "optimal": sum(1 for g in gaps if not any(g)),
                "stranded_gap": max((g[0] for g in gaps), default=0) / max(c.k for c in group),
                "free_tp_gap": max((g[1] for g in gaps), default=0),
                "broken_gap": max((g[2] for g in gaps), default=0),
                "partly_gap_mean": statistics.fmean([g[3] for g in gaps]) if gaps else 0.0,
                "partly_gap_max": max((g[3] for g in gaps), default=0),
                "heur_ms_mean": 1000 * statistics.fmean(c.heuristic_s for c in group),
                "heur_ms_max": 1000 * max(c.heuristic_s for c in group),
                "ilp_ms_mean": 1000 * statistics.fmean(c.exact_s for c in group),
                "ilp_ms_max": 1000 * max(c.exact_s for c in group),
                "ilp_proven": sum(c.proven for c in group),
            }
        )
    return rows


def _diff(c: Case) -> tuple[int, int, int, int]:
    h, e = c.heuristic, c.exact
    assert isinstance(h, tuple) and isinstance(e, tuple)
    # key = (stranded units, -largest free tp, broken domains, partly used): gaps >= 0 is worse
    return (h[0] - e[0], e[1] - h[1], h[2] - e[2], h[3] - e[3])


def scale(repeat: int) -> list[dict[str, Any]]:
    nodes = parse_cluster(
        {
            "version": 1,
            "nodes": [
                {"name": "h", "gpu_type": "H100-SXM", "gpus": 8, "count": 1000, "numa_nodes": 2}
            ],
        }
    )
    k = 4
    mix = [
        (1.0, 8, 150),
        (1.0, 4, 300),
        (1.0, 2, 600),
        (1.0, 1, 1200),
        (0.75, 1, 800),
        (0.5, 1, 1000),
        (0.25, 1, 1200),
    ]
    allocation = {f"m{i}-tp{tp}-f{f:g}": Allocation(f, tp, r) for i, (f, tp, r) in enumerate(mix)}
    rows = []
    rng = random.Random(1)
    for label, reserved in (("fresh", []), ("busy 20%", busy(nodes, k, rng, 0.2))):
        state = cluster_state(nodes, k, reserved=reserved)
        inst = instances_of(allocation if label == "fresh" else _scaled(allocation, 0.8), k)
        best, placement = _best(lambda: place(inst, state), repeat)  # noqa: B023
        assert validate(placement, state, inst) == ()
        rows.append(_scale_row(label, len(nodes), inst, best, placement, {}))
    state = cluster_state(nodes, k)
    first = place(instances_of(allocation, k), state)
    changed = {
        m: Allocation(a.fraction, a.tp, max(1, a.replicas + (-1) ** i * a.replicas // 10))
        for i, (m, a) in enumerate(allocation.items())
    }
    inst = instances_of(changed, k)
    current = cluster_state(nodes, k, current=first.assignments)
    best, result = _best(lambda: replace_running(inst, current, first.assignments), repeat)
    assert validate(result.placement, current, inst) == ()
    changes = {
        "kept": len(result.kept),
        "started": len(result.started),
        "stopped": len(result.stopped),
        "moved": len(result.moved),
    }
    rows.append(_scale_row("incremental", len(nodes), inst, best, result.placement, changes))
    return rows


def _scaled(allocation: dict[str, Allocation], factor: float) -> dict[str, Allocation]:
    return {
        m: Allocation(a.fraction, a.tp, max(1, int(a.replicas * factor)))
        for m, a in allocation.items()
    }


def _best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _scale_row(
    label: str,
    nodes: int,
    inst: Sequence[Any],
    seconds: float,
    p: Placement,
    changes: dict[str, int],
) -> dict[str, Any]:
    f = p.fragmentation
    return {
        "case": label,
        "nodes": nodes,
        "gpus": nodes * 8,
        "instances": len(inst),
        "gpus_placed": sum(i.tp * i.units for i in inst) / p.k,
        "seconds": seconds,
        "stranded_gpus": f.stranded_fraction,
        "partly_used_gpus": f.partly_used_gpus,
        "largest_free_tp": f.largest_free_tp,
        "broken_domains": f.broken_domains,
        **changes,
    }


def quiet_highs() -> None:
    """highspy prints a banner on stdout when the first solver is made: send it to stderr."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=10, help="random allocations per topology, node count and k"
    )
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8], help="fraction units to run")
    parser.add_argument(
        "--time-limit", type=float, default=60.0, help="MILP time limit per case (s)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="scale runs; the best is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    quiet_highs()
    cases = gap_cases(args.seeds, args.k, args.time_limit)
    gap = summarize(cases)
    big = scale(args.repeat)
    if args.json:
        print(json.dumps({"gap": gap, "scale": big, "cases": [c.__dict__ for c in cases]}))
        return
    print(f"heuristic vs exact MILP (HiGHS): k in {args.k}, {args.seeds} allocations each")
    print(
        table(
            gap,
            [
                "topology",
                "nodes",
                "gpus",
                "cases",
                "placed",
                "infeasible_both",
                "only_exact_places",
                "optimal",
                "stranded_gap",
                "free_tp_gap",
                "broken_gap",
                "partly_gap_mean",
                "partly_gap_max",
                "heur_ms_mean",
                "heur_ms_max",
                "ilp_ms_mean",
                "ilp_ms_max",
                "ilp_proven",
            ],
        )
    )
    print()
    print("scale: 1,000 nodes x 8 H100 (NVSwitch), best of", args.repeat)
    print(
        table(
            big,
            [
                "case",
                "gpus",
                "instances",
                "gpus_placed",
                "seconds",
                "stranded_gpus",
                "partly_used_gpus",
                "largest_free_tp",
                "broken_domains",
            ],
        )
    )
    inc = big[-1]
    changes = ", ".join(f"{inc[c]} {c}" for c in ("kept", "started", "stopped", "moved"))
    print(f"incremental: {changes}")


if __name__ == "__main__":
    main()
