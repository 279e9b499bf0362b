"""The allocation search: GPU fraction x TP degree x replicas per LLM, optimal under the ALP.

**Problem** (``docs/design.md``, Search). Every LLM m gets a configuration: TP degree t, a share of
u/k of each of its GPUs (u in 1..k; u < k only with t = 1) and r >= 1 replicas, costing
``r t u`` units of 1/k GPU. Minimise the weighted mean predicted latency
``J = sum_w omega_w L_w / sum_w omega_w`` (``services.core.planning.alp``: per stage the largest
term
``L_m(load_m / r) n / p``, summed over stages, plus tool time) subject to

* memory: every instance holds its weights plus a minimum KV cache (the profile lookup raises
  ``InfeasibleError`` for a configuration that does not fit, or the optional fit check says no);
* throughput: ``load_m / (r T_m) <= rho`` for every LLM, so every workflow reaches
  ``T_w >= lambda_w / rho`` (and ``load_m < r T_m``: the latency stays bounded);
* GPUs: the units of all LLMs fit the cluster (``gpus x k``); t at most the largest NVLink domain;
* the ``Constraints`` added by placement feedback (``services.core.planning.feedback``).

The problem, the constraints and the per-LLM candidates are defined in
``services.core.planning.space``; LLMs that no workflow calls get nothing.

**Method, exact.**

1. *Candidates per LLM* (``search_space``): for every allowed (t, u) and replica count r, the
   cost ``r t u`` and the call latency ``ell = L_m(load_m / r)``. Each LLM may use the budget
   less the cheapest candidates of the others. ``J`` is non-decreasing in every
   ``ell_m`` (terms are ``ell n / p`` combined by max and sum with positive weights), so a
   candidate that costs no less and is no faster than another never helps: each LLM keeps its
   Pareto frontier of (cost, latency).
2. *Components.* Stages couple their LLMs through the max; LLMs that share a stage in any
   workflow are joined into one component (union-find). Each stage lies inside one component, so
   ``J`` is a constant (tool time) plus a sum over components.
3. *Component frontiers.* Inside a component the LLMs are combined one at a time. A partial state
   keeps its cost, the value of the stages whose members are all chosen, and per open stage the
   largest term so far: a sufficient statistic, since a stage's value is the max of its members'
   terms. A state no better than another in every coordinate is dropped (exact: any completion of
   it is no better than the same completion of the other). What remains at the end is the
   component's (cost, value) frontier; a component of one LLM gives that LLM's weighted frontier.
4. *Knapsack.* A multiple-choice knapsack DP over the budget in units picks one frontier point
   per component: ``F_i(b) = min_j F_{i-1}(b - c_j) + v_j`` (numpy over b). Among optimal
   allocations the one with the fewest units is returned. With a latency objective
   (``Problem.latency_slo``) the same table gives the fewest units b with ``F(b) <= SLO``:
   the fewest GPUs that meet it, the lowest latency among those (exact for the same reasons).

Tests compare the result with a brute-force enumeration of every allocation. When no allocation
meets the constraints, ``AllocationInfeasible`` says why and gives the best throughput these GPUs
can reach at the target mix (a bisection over the rate scale). The search counts GPU units only;
``services.core.planning.feedback`` searches again, with added constraints, until the result
places on the real nodes and domains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.core.allocation import Allocation
from services.core.errors import InfeasibleError
from services.core.perf.profile import Profile
from services.core.planning.alp import BurstLookup, FitCheck, Prediction, ProfileLookup, predict
from services.core.planning.space import (
    Candidate,
    Constraints,
    Problem,
    instance_profiles,
    llm_candidates,
    min_replicas,
    pareto,
)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The optimal allocation, its ALP prediction and what the search looked at."""

    allocation: dict[str, Allocation]
    objective: float  # weighted mean predicted latency, s
    units: int  # units of 1/k GPU used
    prediction: Prediction
    candidates: int  # (LLM, configuration, replicas) evaluated
    frontier: int  # of them kept on the per-LLM frontiers
    components: int  # groups of LLMs coupled by parallel stages
    seconds: float  # wall time of the search (profile lookups included)


class AllocationInfeasible(InfeasibleError):
    """Raised when no allocation meets the constraints.

    ``reasons`` say why; ``best_throughput`` is, per workflow, the highest throughput (requests/s,
    at the target mix) that any allocation within the GPUs and the constraints reaches; the
    highest target rate that can be planned is ``rho`` times it.

    Fields for a caller across gRPC: ``reason`` ``allocation_infeasible``; ``details`` hold
    ``best_throughput.<workflow>`` (floats) and ``reasons.<i>`` (text, i from 0 in order);
    ``from_fields`` rebuilds the error from them.
    """

    default_reason = "allocation_infeasible"
    _BEST = "best_throughput."
    _REASON = "reasons."

    def __init__(self, reasons: Sequence[str], best_throughput: Mapping[str, float]) -> None:
        best = ", ".join(f"{w} {t:.4g} req/s" for w, t in best_throughput.items())
        details: dict[str, str | float] = {f"{self._REASON}{i}": r for i, r in enumerate(reasons)}
        details.update({f"{self._BEST}{w}": float(t) for w, t in best_throughput.items()})
        super().__init__(
            f"{'; '.join(reasons)}; best achievable throughput with these GPUs: {best}",
            details=details,
        )
        self.reasons = tuple(reasons)
        self.best_throughput = dict(best_throughput)

    @classmethod
    def from_fields(
        cls,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        value: str = "",
        details: Mapping[str, str | float] | None = None,
    ) -> AllocationInfeasible:
        """Raises ``ValueError`` when a throughput or a reason index is not a number."""
        facts = details or {}
        numbered = {
            int(k.removeprefix(cls._REASON)): str(v)
            for k, v in facts.items()
            if k.startswith(cls._REASON)
        }
        best = {
            k.removeprefix(cls._BEST): float(v) for k, v in facts.items() if k.startswith(cls._BEST)
        }
        exc = cls([numbered[i] for i in sorted(numbered)], best)
        # Details cross the wire unordered, so the workflows of a rebuilt message could come in
        # another order; keep the sender's text.
        exc.args = (message,)
        return exc


# ------------------------------------------------------------------------------ components
@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of one workflow: its value is ``max over members of coef x latency``, where
    ``coef = omega_w n / p`` (omega_w the normalised workflow weight)."""

    coefficients: dict[str, float]
    fanouts: dict[str, float] = field(default_factory=dict)  # p per model (1 when missing)

    def term(self, model: str, candidate: Candidate) -> float:
        return self.coefficients[model] * candidate.latency_at(self.fanouts.get(model, 1.0))


@dataclass(frozen=True, slots=True)
class Component:
    """LLMs coupled by stages, in the order they are combined, and the stages among them."""

    models: tuple[str, ...]
    stages: tuple[Stage, ...]


def objective_structure(problem: Problem) -> tuple[float, tuple[Component, ...]]:
    """(constant term, components): ``J = constant + sum of component values``."""
    total = sum(problem.weight(w.name) for w in problem.workflows)
    constant = 0.0
    stages: list[Stage] = []
    for w in problem.workflows:
        omega = problem.weight(w.name) / total
        constant += omega * w.tool_time
        demand = {d.model: d for d in w.llms}
        for members in w.stages:
            stages.append(
                Stage(
                    {m: omega * demand[m].n / demand[m].p for m in members},
                    {m: demand[m].p for m in members},
                )
            )
    return constant, _components(stages)


def _components(stages: Sequence[Stage]) -> tuple[Component, ...]:
    parent: dict[str, str] = {}

    def root(m: str) -> str:
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    for s in stages:
        members = list(s.coefficients)
        for m in members:
            parent.setdefault(m, m)
        for m in members[1:]:
            a, b = root(members[0]), root(m)
            if a != b:
                parent[max(a, b)] = min(a, b)
    order = list(dict.fromkeys(m for s in stages for m in s.coefficients))
    groups: dict[str, list[str]] = {}
    for m in order:
        groups.setdefault(root(m), []).append(m)
    return tuple(
        Component(tuple(g), tuple(s for s in stages if root(next(iter(s.coefficients))) == r))
        for r, g in groups.items()
    )


# A partial state: (cost, value of closed stages, max term of each open stage, choices).
_State = tuple[int, float, tuple[float, ...], tuple[Candidate, ...]]


def component_frontier(
    component: Component, frontiers: Mapping[str, Sequence[Candidate]], cap: int
) -> list[tuple[int, float, tuple[Candidate, ...]]]:
    """(cost, value, one candidate per model) points of ``component`` within ``cap`` units, by
    increasing cost with strictly falling value (module docstring, step 3)."""
    position = {m: i for i, m in enumerate(component.models)}
    last = [max(position[m] for m in s.coefficients) for s in component.stages]
    states: list[_State] = [(0, 0.0, (), ())]
    open_ids: list[int] = []
    for i, model in enumerate(component.models):
        touching = [j for j, s in enumerate(component.stages) if model in s.coefficients]
        next_open = sorted({*open_ids, *touching} - {j for j in touching if last[j] == i})
        grown: list[_State] = []
        for cost, closed, partial, picks in states:
            current = dict(zip(open_ids, partial, strict=True))
            for cand in frontiers[model]:
                if cost + cand.cost > cap:
                    break
                values = dict(current)
                for j in touching:
                    term = component.stages[j].term(model, cand)
                    values[j] = max(values.get(j, 0.0), term)
                shut = sum(values[j] for j in touching if last[j] == i)
                grown.append(
                    (
                        cost + cand.cost,
                        closed + shut,
                        tuple(values[j] for j in next_open),
                        (*picks, cand),
                    )
                )
        states, open_ids = _undominated(grown), next_open
    return [(cost, closed, picks) for cost, closed, _, picks in states]


def _undominated(states: list[_State]) -> list[_State]:
    """States that no other state matches or beats in cost, closed value and every open max."""
    states.sort(key=lambda s: (s[0], s[1], s[2]))
    kept: list[_State] = []
    if states and not states[0][2]:  # no open stage: a plain 2-D frontier
        for s in states:
            if not kept or s[1] < kept[-1][1]:
                kept.append(s)
        return kept
    for s in states:
        if not any(
            k[1] <= s[1] and all(a <= b for a, b in zip(k[2], s[2], strict=True)) for k in kept
        ):
            kept.append(s)
    return kept


# ------------------------------------------------------------------------------ knapsack
def knapsack(
    frontiers: Sequence[Sequence[tuple[int, float]]], budget: int, limit: float | None = None
) -> tuple[float, list[int]] | None:
    """Pick one (cost, value) point per group minimising the value sum within ``budget``.

    Returns (optimal sum, chosen index per group) with the fewest units among optimal picks, or
    None when even the cheapest points exceed the budget. With ``limit``: the fewest units whose
    best sum is at most ``limit`` (and that sum), None when no pick reaches it.
    """
    best = np.zeros(budget + 1)  # best[b]: optimum of the groups so far within b units
    choices: list[np.ndarray] = []
    for points in frontiers:
        nxt = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int64)
        for j, (cost, value) in enumerate(points):
            if cost > budget:
                break
            trial = best[: budget + 1 - cost] + value
            better = trial < nxt[cost:]
            nxt[cost:][better] = trial[better]
            pick[cost:][better] = j
        best = nxt
        choices.append(pick)
    if not math.isfinite(best[budget]):
        return None
    if limit is not None:
        # best[b] is the optimum within b units: non-increasing in b
        reaching = best <= limit
        if not reaching.any():
            return None
        b = int(np.argmax(reaching))
        optimum = float(best[b])
    else:
        optimum = float(best[budget])
        b = int(np.argmax(best <= optimum * (1 + 1e-12) + 1e-15))  # fewest units reaching it
    chosen: list[int] = []
    for pick, points in zip(reversed(choices), reversed(frontiers), strict=True):
        j = int(pick[b])
        chosen.append(j)
        b -= points[j][0]
    chosen.reverse()
    return optimum, chosen


# ------------------------------------------------------------------------------ search
def search(
    problem: Problem,
    profiles: ProfileLookup,
    *,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    clock: Callable[[], float] = time.perf_counter,
    bursts: BurstLookup | None = None,
) -> SearchResult:
    """The allocation with the lowest weighted predicted latency (module docstring); with
    ``bursts``, calls in fan-outs pay for sharing a replica (``alp.call_latency``).

    Raises ``AllocationInfeasible`` when none meets memory, rho, the GPUs and ``constraints``.
    """
    started = clock()
    cons = constraints or Constraints()
    budget = cons.budget(problem.budget)
    frontiers, evaluated = llm_frontiers(problem, profiles, fits, cons, budget, bursts)
    constant, components = objective_structure(problem)
    fronts = _component_fronts(frontiers, components, budget)
    points = [[(cost, value) for cost, value, _ in f] for f in fronts]
    limit = None if problem.latency_slo is None else problem.latency_slo - constant
    solved = knapsack(points, budget, limit)
    if solved is None and limit is not None:
        fastest = knapsack(points, budget)
        best_latency = constant + fastest[0] if fastest is not None else math.inf
        raise infeasible(
            problem,
            profiles,
            fits,
            cons,
            [
                f"latency objective {problem.latency_slo:.4g} s: the lowest predicted latency "
                f"on {budget / problem.fraction_unit:g} GPUs is {best_latency:.4g} s"
            ],
        )
    if solved is None:  # cannot happen: llm_frontiers checked that the cheapest points fit
        raise InfeasibleError("internal: the cheapest configurations exceed the budget")
    value, chosen = solved
    picks = [cand for f, j in zip(fronts, chosen, strict=True) for cand in f[j][2]]
    allocation = {c.model: c.allocation(problem.fraction_unit) for c in picks}
    prediction = predict(
        problem.workflows,
        profiles,
        allocation,
        problem.rates,
        fits=fits,
        rho=problem.rho,
        bursts=bursts,
    )
    return SearchResult(
        allocation=dict(sorted(allocation.items())),
        objective=constant + value,
        units=sum(c.cost for c in picks),
        prediction=prediction,
        candidates=evaluated,
        frontier=sum(len(f) for f in frontiers.values()),
        components=len(components),
        seconds=clock() - started,
    )


def _component_fronts(
    frontiers: Mapping[str, Sequence[Candidate]], components: Sequence[Component], budget: int
) -> list[list[tuple[int, float, tuple[Candidate, ...]]]]:
    floor = {c.models: sum(frontiers[m][0].cost for m in c.models) for c in components}
    spare = budget - sum(floor.values())
    return [component_frontier(c, frontiers, floor[c.models] + spare) for c in components]


def ranked(
    problem: Problem,
    profiles: ProfileLookup,
    count: int,
    *,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    bursts: BurstLookup | None = None,
) -> list[tuple[float, dict[str, Allocation]]]:
    """Up to ``count`` distinct allocations by rising predicted objective: the optimum, then
    for every component and every point of its frontier the best allocation that uses that
    point (a knapsack over the others). So the second entry is the best allocation of frontier
    points that differs from the optimum (allocations with a dominated candidate, no cheaper
    and no faster than another, are left out); later ones are the best of their
    neighbourhoods, not necessarily the k-th best. For
    refining by simulation (``services.core.planning.refine``); the minimum-latency objective
    only.

    Raises ``AllocationInfeasible`` as ``search`` does.
    """
    cons = constraints or Constraints()
    budget = cons.budget(problem.budget)
    frontiers, _ = llm_frontiers(problem, profiles, fits, cons, budget, bursts)
    constant, components = objective_structure(problem)
    fronts = _component_fronts(frontiers, components, budget)
    points = [[(cost, value) for cost, value, _ in f] for f in fronts]
    found: dict[tuple[int, ...], float] = {}
    solved = knapsack(points, budget)
    if solved is None:
        raise InfeasibleError("internal: the cheapest configurations exceed the budget")
    found[tuple(solved[1])] = solved[0]
    for i, front in enumerate(points):
        for j, point in enumerate(front):
            fixed = [*points[:i], [point], *points[i + 1 :]]
            alt = knapsack(fixed, budget)
            if alt is None:
                continue
            key = (*alt[1][:i], j, *alt[1][i + 1 :])
            found.setdefault(key, alt[0])
    best = sorted(found.items(), key=lambda kv: (kv[1], kv[0]))[:count]
    out = []
    for key, value in best:
        picks = [cand for f, j in zip(fronts, key, strict=True) for cand in f[j][2]]
        allocation = {c.model: c.allocation(problem.fraction_unit) for c in picks}
        out.append((constant + value, allocation))
    return out


def llm_frontiers(
    problem: Problem,
    profiles: ProfileLookup,
    fits: FitCheck | None,
    constraints: Constraints,
    budget: int,
    bursts: BurstLookup | None = None,
) -> tuple[dict[str, list[Candidate]], int]:
    """Per LLM its Pareto frontier (module docstring, step 1) and the number of candidates
    evaluated. Each LLM may use the budget less the cheapest configurations of the others.

    Raises ``AllocationInfeasible`` when an LLM has no candidate or the cheapest ones together
    exceed the budget.
    """
    loads = problem.loads
    configs: dict[str, dict[tuple[int, int], Profile]] = {}
    cheapest: dict[str, int] = {}
    reasons: list[str] = []
    for model in sorted(loads):
        configs[model], misfits = instance_profiles(model, problem, constraints, profiles, fits)
        costs = [
            tp * units * fewest
            for (tp, units), p in configs[model].items()
            if _within_cap(
                constraints.replica_cap((model, tp, units)),
                fewest := min_replicas(loads[model], p.saturation_rate, problem.rho),
            )
        ]
        if costs:
            cheapest[model] = min(costs)
        elif configs[model]:
            reasons.append(f"{model}: every configuration that fits is ruled out by constraints")
        else:
            reasons.append(f"{model}: no configuration fits in memory ({'; '.join(misfits)})")
    spare = budget - sum(cheapest.values())
    if not reasons and spare < 0:
        k = problem.fraction_unit
        need = ", ".join(f"{m} {c / k:g}" for m, c in cheapest.items())
        reasons.append(
            f"meeting rho {problem.rho:g} needs at least {(budget - spare) / k:g} GPUs "
            f"({need}); {budget / k:g} available"
        )
    if reasons:
        raise infeasible(problem, profiles, fits, constraints, reasons)
    frontiers: dict[str, list[Candidate]] = {}
    evaluated = 0
    fanouts = problem.fanouts
    for model, found in configs.items():
        own = cheapest[model] + spare
        cands = llm_candidates(
            model,
            loads[model],
            found,
            own,
            problem.rho,
            constraints,
            fanouts.get(model, ()),
            bursts,
            problem.fraction_unit,
        )
        evaluated += len(cands)
        frontiers[model] = pareto(cands, lone=any(p <= 1 for p in fanouts.get(model, (1.0,))))
    return frontiers, evaluated


def weighted_latency(problem: Problem, prediction: Prediction) -> float:
    """``J`` of a prediction: the weighted mean of the workflows' predicted latencies."""
    total = sum(problem.weight(w.name) for w in problem.workflows)
    return (
        sum(problem.weight(w.name) * prediction.workflow(w.name).latency for w in problem.workflows)
        / total
    )


def _within_cap(cap: int | None, replicas: int) -> bool:
    return cap is None or replicas <= cap


# ------------------------------------------------------------------------------ infeasible
def infeasible(
    problem: Problem,
    profiles: ProfileLookup,
    fits: FitCheck | None,
    constraints: Constraints,
    reasons: Sequence[str],
) -> AllocationInfeasible:
    """The error for ``reasons``, with the best throughput these GPUs reach."""
    scale = best_scale(problem, profiles, fits, constraints)
    best = {w.name: problem.rates[w.name] * scale for w in problem.workflows}
    return AllocationInfeasible(reasons, best)


def best_scale(
    problem: Problem,
    profiles: ProfileLookup,
    fits: FitCheck | None = None,
    constraints: Constraints | None = None,
    *,
    iterations: int = 60,
) -> float:
    """The largest s such that some allocation within the GPUs and constraints has capacity
    ``r T_m >= s load_m`` for every LLM: the throughput at the target mix is s x the target
    rates. 0 when an LLM fits on no configuration."""
    cons = constraints or Constraints()
    budget = cons.budget(problem.budget)
    loads = problem.loads
    options: dict[str, list[tuple[int, float, int | None]]] = {}
    for model in loads:
        configs, _ = instance_profiles(model, problem, cons, profiles, fits)
        options[model] = [
            (tp * units, p.saturation_rate, cons.replica_cap((model, tp, units)))
            for (tp, units), p in configs.items()
        ]
        if not options[model]:
            return 0.0

    def units_needed(s: float) -> float:
        total = 0.0
        for model, opts in options.items():
            costs = [
                cost * max(1, math.ceil(s * loads[model] / sat - 1e-12))
                for cost, sat, cap in opts
                if cap is None or math.ceil(s * loads[model] / sat - 1e-12) <= cap
            ]
            total += min(costs, default=math.inf)
        return total

    lo, hi = 0.0, 1.0
    while units_needed(hi) <= budget and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if units_needed(mid) <= budget else (lo, mid)
    return lo
