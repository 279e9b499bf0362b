"""The search's vectorised pieces against their one-at-a-time definitions: the latencies of many
configurations read at once, the Pareto filter over candidate columns, and burst tables
simulated only where the ALP reads one."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.planning.alp import (
    NO_BURSTS,
    BurstTable,
    call_latency,
    fanout_latencies,
    predict,
)
from services.core.planning.space import Candidate, CandidateTable, pareto
from services.core.workload.demand import LlmDemand, WorkflowDemand


def rising(seed: int, points: int) -> Profile:
    """A profile with ``points`` points rising in rate, latency and TTFT (the saturation rate
    beyond the last point)."""
    rng = random.Random(seed)
    rate, latency, ttft = rng.uniform(0.1, 1.0), rng.uniform(0.2, 2.0), rng.uniform(0.01, 0.1)
    pts = []
    for _ in range(points):
        pts.append(ProfilePoint(rate, latency, latency, latency, ttft, 0.01))
        rate += rng.uniform(0.2, 2.0)
        latency += rng.uniform(0.0, 1.0)
        ttft += rng.uniform(0.0, 0.3)
    key = ProfileKey("m", "H100-SXM", 1, 1.0, "test", f"mix-{seed}")
    return Profile(key, tuple(pts), rate + rng.uniform(0.1, 1.0))


TABLE = BurstTable.of([(1, 1.0), (2, 1.2), (4, 1.7), (8, 2.9)])


@pytest.mark.parametrize("pooled", [False, True])
def test_many_profiles_at_once_match_each_call_latency(pooled: bool) -> None:
    # profiles with 2 to 8 points (padded to the widest inside), replica counts that put the
    # per-replica rate below the first point, between points, beyond the last point and at or
    # past saturation (inf)
    profiles = [rising(seed, n) for seed, n in enumerate((2, 5, 8, 3))]
    load = 6.0
    replicas = [np.arange(1.0, 13.0) for _ in profiles]
    fanouts = (1.0, 2.0, 8.0)
    got = fanout_latencies(profiles, replicas, load, [TABLE] * 4, fanouts, pooled=pooled)
    column = 0
    for profile, counts in zip(profiles, replicas, strict=True):
        for r in counts:
            for j, p in enumerate(fanouts):
                want = call_latency(profile, int(r), load, TABLE, p, pooled=pooled)
                assert got[j, column] == pytest.approx(want, rel=1e-12), (profile.key, r, p)
            column += 1
    assert column == got.shape[1]
    assert np.isinf(got[:, 0]).all()  # one replica of profile 0 is past its saturation


def vectors(c: Candidate) -> tuple[int, tuple[float, ...]]:
    return c.cost, (c.latency, *(lat for _, lat in c.by_fanout))


@pytest.mark.parametrize("seed", range(6))
def test_pareto_over_columns_keeps_exactly_the_undominated(seed: int) -> None:
    rng = random.Random(seed)
    # coarse values, so that ties in cost and in single latencies are common
    cands = [
        Candidate(
            "m",
            rng.choice([1, 2]),
            rng.choice([1, 4]),
            1,
            rng.randint(1, 8),
            rng.randint(1, 6) / 2,
            ((2.0, rng.randint(1, 6) / 2), (4.0, rng.randint(1, 6) / 2)),
        )
        for _ in range(40)
    ]
    kept = pareto(CandidateTable.of(cands))
    assert kept == pareto(cands)
    # by definition: kept unless an earlier candidate in (cost, latency, tp, units) order is
    # no worse in cost and every latency
    order = sorted(cands, key=lambda c: (c.cost, c.latency, c.tp, c.units))
    want = [
        c
        for i, c in enumerate(order)
        if not any(
            all(a <= b for a, b in zip(vectors(o)[1], vectors(c)[1], strict=True))
            for o in order[:i]
        )
    ]
    assert kept == want
    assert [c.cost for c in kept] == sorted(c.cost for c in kept)
    # lone calls only: a plain running minimum of the latency by cost
    lone = [Candidate(c.model, c.tp, c.units, c.replicas, c.cost, c.latency) for c in cands]
    best = [(c.cost, c.latency) for c in pareto(lone)]
    assert all(a[1] > b[1] for a, b in itertools.pairwise(best))


def test_burst_tables_are_looked_up_only_where_read() -> None:
    # A is called in fan-outs of 4 (bursts of 2 per replica on 2 replicas: its table is read),
    # B in fan-outs of 2 on 2 replicas (one call each: no table needed), C alone
    profile = rising(0, 4)
    asked: list[str] = []

    def bursts(model: str, tp: int, fraction: float) -> BurstTable:
        asked.append(model)
        return TABLE

    w = WorkflowDemand(
        "w",
        (LlmDemand("A", 4, 4), LlmDemand("B", 2, 2), LlmDemand("C", 1, 1)),
        stages=(("A",), ("B",), ("C",)),
    )
    two = Allocation(1.0, 1, 2)
    alloc = {"A": two, "B": two, "C": two}
    rates = {"w": 0.1}
    got = predict([w], lambda m, t, f: profile, alloc, rates, bursts=bursts)
    assert asked == ["A"]
    # the same prediction as with every table at hand
    full = predict([w], lambda m, t, f: profile, alloc, rates, bursts=lambda m, t, f: TABLE)
    assert got == full
    assert NO_BURSTS.extra(8.0) == 0.0
