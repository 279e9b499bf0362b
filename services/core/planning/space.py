"""The search space of the allocation search: the problem, added constraints, per-LLM candidates.

A ``Problem`` is what to plan (workflows, target rates and weights, GPUs, k, the largest TP
degree, rho); ``Constraints`` narrow it (placement feedback adds them). Per LLM the candidates
are every allowed configuration (TP degree t and u/k of each GPU, u < k only with t = 1) with
every replica count r from the fewest that meet rho up to the budget, each with its cost
``r t u`` (units of 1/k GPU) and call latency ``L_m(load_m / r)``. The replica count stops
growing once the per-replica rate falls to the profile's first point: below it the latency is
flat, so more replicas only cost more. ``pareto`` keeps the candidates that no other beats on
both cost and latency; ``services.core.planning.search`` explains why that loses no optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from services.core.allocation import TP_DEGREES, Allocation
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.batching import IntArray
from services.core.perf.model import FloatArray
from services.core.perf.profile import Profile
from services.core.planning.alp import (
    NO_BURSTS,
    BurstLookup,
    BurstTable,
    FitCheck,
    ProfileLookup,
    fanout_latencies,
    llm_loads,
)
from services.core.workload.demand import WorkflowDemand
from services.core.workload.spec import DEFAULT_FRACTION_UNIT, DEFAULT_RHO

# (model, tp, units per GPU): one replica's configuration; units == k for whole GPUs.
Config = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Problem:
    """What to plan: workflows with target rates (requests/s) and weights, on ``gpus`` GPUs.

    ``max_tp`` is the largest NVLink domain (TP degrees above it are never tried); ``rho`` the
    utilisation cap; fractions are multiples of 1/``fraction_unit``. Weights default to 1.
    """

    workflows: tuple[WorkflowDemand, ...]
    rates: dict[str, float]
    gpus: int
    fraction_unit: int = DEFAULT_FRACTION_UNIT
    max_tp: int = 8
    rho: float = DEFAULT_RHO
    weights: dict[str, float] = field(default_factory=dict)
    # None: minimise the weighted latency on the GPUs. A number (s): use the fewest GPUs whose
    # weighted predicted latency is at most this, the lowest latency among those.
    latency_slo: float | None = None

    def __post_init__(self) -> None:
        if not self.workflows:
            raise InvalidInputError("workflows: at least one workflow is needed")
        for w in self.workflows:
            rate = self.rates.get(w.name)
            if rate is None or not rate > 0:
                raise InvalidInputError(f"rates.{w.name}: must be a positive rate, got {rate!r}")
            if not self.weight(w.name) > 0:
                raise InvalidInputError(f"weights.{w.name}: must be > 0, got {self.weight(w.name)}")
        _positive_int(self.gpus, "gpus")
        _positive_int(self.fraction_unit, "fraction_unit")
        _positive_int(self.max_tp, "max_tp")
        if not 0 < self.rho <= 1:
            raise InvalidInputError(f"rho: must be in (0, 1], got {self.rho}")
        if self.latency_slo is not None and not self.latency_slo > 0:
            raise InvalidInputError(f"latency_slo: must be > 0 s, got {self.latency_slo}")

    def weight(self, workflow: str) -> float:
        return self.weights.get(workflow, 1.0)

    @property
    def budget(self) -> int:
        """The cluster in units of 1/k GPU."""
        return self.gpus * self.fraction_unit

    @property
    def loads(self) -> dict[str, float]:
        """Calls/s per LLM, summed over workflows."""
        return llm_loads(self.workflows, self.rates)

    @property
    def fanouts(self) -> dict[str, tuple[float, ...]]:
        """Per LLM the distinct fan-outs ``p`` its workflows call it with, sorted."""
        found: dict[str, set[float]] = {}
        for w in self.workflows:
            for d in w.llms:
                found.setdefault(d.model, set()).add(d.p)
        return {m: tuple(sorted(ps)) for m, ps in found.items()}

    def scaled(self, factor: float) -> Problem:
        """The same problem with every target rate multiplied by ``factor``."""
        return replace(self, rates={w: r * factor for w, r in self.rates.items()})


@dataclass(frozen=True, slots=True)
class Constraints:
    """Restrictions on top of a ``Problem``, added by placement feedback (or by a caller).

    ``max_tp`` caps the TP degree, ``max_units`` the total units; ``max_replicas`` caps the
    replicas of one (model, tp, units) configuration (0 rules it out). ``notes`` say why each
    restriction was added, in order.
    """

    max_tp: int | None = None
    max_units: int | None = None
    max_replicas: dict[Config, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def replica_cap(self, config: Config) -> int | None:
        return self.max_replicas.get(config)

    def budget(self, units: int) -> int:
        """The units the search may use out of a cluster's ``units``."""
        return units if self.max_units is None else min(units, self.max_units)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One LLM's configuration with its cost and per-call latency."""

    model: str
    tp: int
    units: int  # per GPU, 1/k each
    replicas: int
    cost: int  # replicas x tp x units
    latency: float  # s per call at load / replicas (lone calls)
    # s per call when calls come in fan-outs of p, by p (the LLM's ``Problem.fanouts``)
    by_fanout: tuple[tuple[float, float], ...] = ()

    def allocation(self, k: int) -> Allocation:
        return Allocation(self.units / k, self.tp, self.replicas)

    def latency_at(self, p: float) -> float:
        """Per-call latency for calls in fan-outs of ``p`` (the lone-call one if not known)."""
        for fanout, latency in self.by_fanout:
            if fanout == p:
                return latency
        return self.latency

    @property
    def latencies(self) -> tuple[float, ...]:
        """Every latency the objective may read (dominance compares them all)."""
        return (self.latency, *(lat for _, lat in self.by_fanout))


# ------------------------------------------------------------------------------ candidates
def configurations(problem: Problem, constraints: Constraints) -> tuple[tuple[int, int], ...]:
    """Allowed (tp, units per GPU) pairs of ``problem`` under ``constraints``."""
    cap = min(problem.max_tp, constraints.max_tp or problem.max_tp)
    return instance_configs(problem.fraction_unit, cap)


def instance_configs(k: int, max_tp: int) -> tuple[tuple[int, int], ...]:
    """(tp, units per GPU) pairs: fractions 1/k .. 1 on one GPU, whole-GPU TP groups up to
    ``max_tp``."""
    fractions = tuple((1, u) for u in range(1, k + 1))
    return fractions + tuple((t, k) for t in TP_DEGREES if 1 < t <= max_tp)


def max_tp_of(nodes: tuple[NodeInventory, ...]) -> int:
    """The largest TP degree that fits one NVLink domain of the cluster (1 without NVLink)."""
    largest = max((n.largest_domain or 1 for n in nodes), default=1)
    return max(t for t in TP_DEGREES if t <= largest)


def instance_profiles(
    model: str,
    problem: Problem,
    constraints: Constraints,
    profiles: ProfileLookup,
    fits: FitCheck | None,
) -> tuple[dict[tuple[int, int], Profile], list[str]]:
    """Profiles of the configurations of ``model`` whose instance fits, and why the others don't."""
    k = problem.fraction_unit
    found: dict[tuple[int, int], Profile] = {}
    problems: list[str] = []
    for tp, units in configurations(problem, constraints):
        if constraints.replica_cap((model, tp, units)) == 0:
            continue
        fraction = units / k
        problem_text = fits(model, tp, fraction) if fits is not None else None
        if problem_text is not None:
            problems.append(f"tp {tp} x {fraction:g}: {problem_text}")
            continue
        try:
            found[(tp, units)] = profiles(model, tp, fraction)
        except InfeasibleError as exc:
            problems.append(f"tp {tp} x {fraction:g}: {exc}")
    return found, problems


def min_replicas(load: float, saturation: float, rho: float) -> int:
    """Fewest replicas with ``load / (r T) <= rho`` and ``load < r T`` (as ``predict`` checks)."""
    r = max(1, math.ceil(load / (rho * saturation)))
    while load / (r * saturation) > rho or load >= r * saturation:
        r += 1
    return r


@dataclass(frozen=True, slots=True)
class CandidateTable:
    """Candidates of one LLM as columns, one row each (``llm_candidates``; ``rows`` turns rows
    into ``Candidate`` objects, which the search needs only for the frontier).

    ``by_fanout[i, j]`` is row i's latency for calls in fan-outs of ``fanouts[j]``."""

    model: str
    tp: IntArray
    units: IntArray
    replicas: IntArray
    cost: IntArray
    latency: FloatArray
    fanouts: tuple[float, ...]
    by_fanout: FloatArray  # rows x fan-outs

    def __len__(self) -> int:
        return len(self.cost)

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> CandidateTable:
        """The rows of ``candidates`` (of one LLM, with the same fan-outs in the same order)."""
        fanouts = tuple(p for p, _ in candidates[0].by_fanout) if candidates else ()
        return cls(
            candidates[0].model if candidates else "",
            np.array([c.tp for c in candidates], dtype=np.int64),
            np.array([c.units for c in candidates], dtype=np.int64),
            np.array([c.replicas for c in candidates], dtype=np.int64),
            np.array([c.cost for c in candidates], dtype=np.int64),
            np.array([c.latency for c in candidates], dtype=np.float64),
            fanouts,
            np.array(
                [[lat for _, lat in c.by_fanout] for c in candidates], dtype=np.float64
            ).reshape(len(candidates), len(fanouts)),
        )

    def rows(self, index: Sequence[int]) -> list[Candidate]:
        tp, units, replicas = self.tp.tolist(), self.units.tolist(), self.replicas.tolist()
        cost, latency, fanned = self.cost.tolist(), self.latency.tolist(), self.by_fanout.tolist()
        return [
            Candidate(
                self.model,
                tp[i],
                units[i],
                replicas[i],
                cost[i],
                latency[i],
                tuple(zip(self.fanouts, fanned[i], strict=True)),
            )
            for i in index
        ]


def llm_candidates(
    model: str,
    load: float,
    configs: Mapping[tuple[int, int], Profile],
    budget: int,
    rho: float,
    constraints: Constraints,
    fanouts: Sequence[float] = (),
    bursts: BurstLookup | None = None,
    fraction_unit: int = 1,
) -> CandidateTable:
    """Every (configuration, replicas) of ``model`` meeting rho within ``budget`` units, up to
    the replica count where the latency stops falling (module docstring, step 1). With
    ``bursts``, each candidate also carries its latency for calls in fan-outs of each of
    ``fanouts`` (configurations are (tp, units of 1/``fraction_unit``))."""
    fanned = tuple(p for p in fanouts if p > 1) if bursts is not None else ()
    chosen: list[tuple[int, int, Profile, IntArray, BurstTable]] = []
    for (tp, units), profile in configs.items():
        per_replica = tp * units
        most = budget // per_replica
        cap = constraints.replica_cap((model, tp, units))
        if cap is not None:
            most = min(most, cap)
        floor_rate = profile.points[0].rate
        rs = np.arange(min_replicas(load, profile.saturation_rate, rho), most + 1)
        if not rs.size:
            continue
        # up to the first count where more replicas stop helping (then included)
        flat = load / rs <= floor_rate
        if bursts is not None:
            for p in fanned:
                flat &= p <= rs
        stop = int(np.argmax(flat)) + 1 if flat.any() else rs.size
        rs = rs[:stop]
        table = NO_BURSTS
        if fanned and bursts is not None and int(rs[0]) < max(fanned):
            # a replica gets more than one call of a fan-out only with fewer replicas than
            # calls; otherwise no table is read and none is simulated (``alp.NO_BURSTS``)
            table = bursts(model, tp, units / fraction_unit)
        chosen.append((tp, units, profile, rs.astype(np.int64), table))
    if not chosen:
        empty = np.zeros(0, dtype=np.int64)
        return CandidateTable(
            model, empty, empty, empty, empty, np.zeros(0), fanned, np.zeros((0, len(fanned)))
        )
    replicas = [rs for _, _, _, rs, _ in chosen]
    latencies = fanout_latencies(
        [profile for _, _, profile, _, _ in chosen],
        [rs.astype(np.float64) for rs in replicas],
        load,
        [table for *_, table in chosen] if fanned else None,
        (1.0, *fanned),
        pooled=bursts is not None,
    )
    counts = np.concatenate(replicas)
    tp_column = np.concatenate([np.full(len(rs), t, dtype=np.int64) for t, _, _, rs, _ in chosen])
    unit_column = np.concatenate([np.full(len(rs), u, dtype=np.int64) for _, u, _, rs, _ in chosen])
    return CandidateTable(
        model,
        tp_column,
        unit_column,
        counts,
        counts * tp_column * unit_column,
        np.array(latencies[0]),
        fanned,
        np.array(latencies[1:].T),
    )


def pareto(candidates: Sequence[Candidate] | CandidateTable, lone: bool = True) -> list[Candidate]:
    """Candidates no other beats on cost and on every latency the objective reads, by
    increasing cost (ties: the first in (cost, latency, tp, units) order): the lone-call
    latency when ``lone`` (some workflow calls the LLM without fan-out) and one per fan-out
    (``Candidate.by_fanout``)."""
    table = candidates if isinstance(candidates, CandidateTable) else CandidateTable.of(candidates)
    if not len(table):
        return []
    # stable, so rows equal in all four keep their order (as ``sorted`` would)
    order = np.lexsort((table.units, table.tp, table.latency, table.cost))
    columns = ([table.latency] if lone else []) + list(table.by_fanout.T)
    rows = np.stack(columns or [table.latency], axis=1)[order]
    if rows.shape[1] == 1:
        # kept: faster than every row before it (the earlier minimum, kept or not)
        value = rows[:, 0]
        before = np.concatenate(([math.inf], np.minimum.accumulate(value)[:-1]))
        return table.rows(order[value < before].tolist())
    # A row is dropped when an earlier row is no worse in every latency (an earlier dropped row
    # is itself matched by a kept one): keep the first open row, drop what it matches, repeat.
    kept: list[int] = []
    open_rows = np.arange(len(rows))
    while open_rows.size:
        first = open_rows[0]
        kept.append(int(order[first]))
        rest = open_rows[1:]
        open_rows = rest[~(rows[first] <= rows[rest]).all(axis=1)]
    return table.rows(kept)


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{name}: must be a positive integer, got {value!r}")
