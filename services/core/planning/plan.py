"""The plan: a deployment spec searched, placed and recorded as one document; the one plan path.

``make_plan(PlanInputs)`` is the only way a plan is made: the planner service, the CLI's offline
``scepsy plan`` and the simulator's Scepsy system each fill ``PlanInputs`` (the spec, the nodes to
plan on, the running placement, a profile source, a clock) and call it. It does no I/O: the
profile source and the placement function are handed in (the planner binds them to the Profiler
and Placer services; the default places in-process). Re-planning passes the running placement,
and the default placement is the placer's incremental one (``place_allocation`` with
``current``), so a new plan keeps every running instance that its allocation still has.

A ``Plan`` records its inputs (the spec text as given, the cluster's nodes, k and rho), the result
(allocation per LLM, the ALP's predictions per workflow and per LLM, the placement), how it was
found (search time, rounds of placement feedback and the constraints they added) and where each
LLM's profiles came from. Its ``id`` is a content hash of inputs and result (``plan_id``): the
same spec planned on the same cluster gives the same id, so a plan stored under its id never
changes. ``created_at``, the search time and the profile sources are left out of the hash (they
differ between two runs that decide the same thing).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from services.core.allocation import Allocation
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.placement.heuristic import (
    Assignment,
    Placement,
    PlacementInfeasible,
    place_allocation,
)
from services.core.planning import handmade
from services.core.planning.alp import predict
from services.core.planning.feedback import DEFAULT_MAX_ROUNDS, PlacedResult, PlaceFn, search_placed
from services.core.planning.profiles import SpecProfiles
from services.core.planning.refine import Refiner, Trial, refine
from services.core.planning.search import search
from services.core.planning.space import Problem, max_tp_of
from services.core.workload.demand import LlmDemand, WorkflowDemand
from services.core.workload.spec import ModelServing, Spec, SpecFiles, parse_spec

ID_LENGTH = 16  # hex digits of the sha256 kept as the plan id


@dataclass(frozen=True, slots=True)
class WorkflowForecast:
    """The ALP's prediction for one workflow at its target rate."""

    workflow: str
    target_rps: float
    weight: float
    latency_s: float
    throughput_rps: float


@dataclass(frozen=True, slots=True)
class LlmForecast:
    """The ALP's prediction for one LLM: its summed load and how busy its replicas are."""

    model: str
    load_cps: float  # calls/s over all replicas
    utilization: float  # load / capacity
    call_latency_s: float
    gpus: float
    # where its profiles came from and how many: {"stored analytic-1": 3, "computed analytic-1": 9}
    profile_sources: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Plan:
    id: str  # plan_id of the other fields
    created_at: float  # unix seconds
    spec_text: str  # the deployment spec as given (YAML or JSON)
    nodes: tuple[NodeInventory, ...]  # the cluster planned for
    fraction_unit: int
    rho: float
    allocation: dict[str, Allocation]  # by model, sorted
    workflows: tuple[WorkflowForecast, ...]
    llms: tuple[LlmForecast, ...]
    objective_s: float  # weighted mean predicted latency
    placement: Placement
    search_seconds: float  # every round of search and placement, profiles included
    profile_seconds: float  # of search_seconds, computing profiles (0 when all were cached)
    rounds: int  # searches run (placement feedback)
    constraints: tuple[str, ...]  # the constraints placement feedback added, why each
    serving: tuple[ModelServing, ...] = ()  # what the engines serve, by model (from the spec)
    # refinement by simulation (``PlanInputs.refiner``): one line per candidate, the chosen first
    refinement: tuple[str, ...] = ()
    simulated_latency_s: float | None = None  # the chosen candidate's, when refined

    @property
    def gpus(self) -> float:
        return sum(a.gpus for a in self.allocation.values())


def problem_of(spec: Spec) -> Problem:
    """The search problem of a spec: its workflows, rates and weights on its cluster."""
    return Problem(
        workflows=tuple(w.demand for w in spec.workflows),
        rates=spec.target_rates,
        gpus=spec.gpu_count,
        fraction_unit=spec.fraction_unit,
        max_tp=max_tp_of(spec.nodes),
        rho=spec.rho,
        weights={w.name: w.weight for w in spec.workflows},
    )


def with_nodes(spec: Spec, nodes: tuple[NodeInventory, ...]) -> Spec:
    """``spec`` planned on ``nodes`` instead of its own cluster (e.g. the live one).

    Raises ``InvalidInputError`` when the nodes have no GPU or several GPU types.
    """
    gpu_type_of(nodes)
    return replace(spec, nodes=nodes)


def gpu_type_of(nodes: tuple[NodeInventory, ...]) -> str:
    """The one GPU type of ``nodes``; ``InvalidInputError`` when there are none or several."""
    types = sorted({g.gpu_type for n in nodes for g in n.gpus})
    if len(types) != 1:
        raise InvalidInputError(f"cluster: must have GPUs of exactly one type, got {types}")
    return types[0]


def spec_from_text(
    text: str,
    nodes: tuple[NodeInventory, ...] | None = None,
    *,
    source: str = "spec",
    files: SpecFiles | None = None,
) -> Spec:
    """A spec from its YAML (or JSON) text, planned on ``nodes`` when given (its own ``cluster``
    entry is then ignored and may be left out).

    Raises ``InvalidInputError`` naming ``source`` and the field; a spec that refers to files
    (traces, a cluster path) needs ``files`` to read them (the planner's reads the router's
    recorded trace, ``trace: router``).
    """
    import yaml  # only parsing text needs it

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidInputError(f"{source}: nested too deeply to be a spec") from None
    if nodes is None:
        return parse_spec(doc, source=source, files=files)
    gpu_type = gpu_type_of(nodes)
    if isinstance(doc, Mapping):
        gpus = sum(len(n.gpus) for n in nodes)
        doc = {**doc, "cluster": {"gpu_type": gpu_type, "gpus": gpus}}
    return with_nodes(parse_spec(doc, source=source, files=files), nodes)


def placer_for(
    nodes: Sequence[NodeInventory], k: int, running: Sequence[Assignment] = ()
) -> PlaceFn:
    """Place allocations in-process with the placer's heuristic on ``nodes``, keeping what it
    can of the ``running`` placement (its memory counts as free: it is being replaced)."""
    return lambda allocation: place_allocation(allocation, k, nodes, current=running).placement


@dataclass(frozen=True, slots=True)
class PlanInputs:
    """Everything a plan is made from (module docstring)."""

    spec_text: str  # the deployment spec as given (recorded in the plan, part of its id)
    spec: Spec
    nodes: tuple[NodeInventory, ...]  # the cluster to plan on (replaces the spec's own)
    profiles: SpecProfiles  # the profile source
    running: tuple[Assignment, ...] = ()  # the running placement, kept where it can be
    place: PlaceFn | None = None  # default: ``placer_for(nodes, k, running)``
    clock: Callable[[], float] = time.time  # reads the plan's creation time
    max_rounds: int = DEFAULT_MAX_ROUNDS
    # when given, the closed form's best candidates are simulated and the best kept (``refine``)
    refiner: Refiner | None = None
    # when given, called first with the profile source and the spec on ``nodes`` (to fetch or
    # compute every profile the search may ask for at once: worker processes, concurrent
    # calls); its time counts in the plan's search and profile seconds
    prefetch: Callable[[SpecProfiles, Spec], object] | None = None


def make_plan(inputs: PlanInputs) -> Plan:
    """Search and place the spec (``search_placed``) and record the plan.

    Raises ``InvalidInputError`` when the nodes' GPU type differs from the profile source's,
    ``AllocationInfeasible`` (why, and the best throughput these GPUs reach) or
    ``InfeasibleError`` when no allocation places.
    """
    spec = with_nodes(inputs.spec, inputs.nodes)
    profiles = inputs.profiles
    if profiles.gpu.name != spec.gpu_type:
        raise InvalidInputError(
            f"cluster: profiles are for {profiles.gpu.name}, the nodes have {spec.gpu_type}"
        )
    place = inputs.place or placer_for(spec.nodes, spec.fraction_unit, inputs.running)
    before = profiles.seconds
    started = time.perf_counter()
    if inputs.prefetch is not None:
        inputs.prefetch(profiles, spec)
    prefetched = time.perf_counter() - started
    problem = problem_of(spec)
    placed = search_placed(
        problem, profiles.profile, place, max_rounds=inputs.max_rounds, bursts=profiles.burst
    )
    notes: tuple[str, ...] = ()
    simulated: float | None = None
    if inputs.refiner is not None:
        placed, notes, simulated = refine_placed(problem, profiles, place, placed, inputs.refiner)
    plan = assemble(
        inputs.spec_text, spec, problem, placed, inputs.clock(), profiles.seconds - before
    )
    if prefetched:
        plan = replace(plan, search_seconds=plan.search_seconds + prefetched)
    if notes:
        plan = replace(plan, refinement=notes, simulated_latency_s=simulated)
        plan = replace(plan, id=plan_id(plan))
    origins = profiles.origins()
    llms = tuple(replace(m, profile_sources=origins.get(m.model, {})) for m in plan.llms)
    return replace(plan, llms=llms)


def refine_placed(
    problem: Problem,
    profiles: SpecProfiles,
    place: PlaceFn,
    placed: PlacedResult,
    refiner: Refiner,
) -> tuple[PlacedResult, tuple[str, ...], float | None]:
    """The best simulated candidate that places (``refine``) instead of the closed-form
    optimum, one note per candidate and the chosen one's simulated latency."""
    started = time.perf_counter()
    # the fewest-GPUs objective compares plans by GPUs: hand-made splits use them all
    extra = handmade_candidates(problem, profiles) if problem.latency_slo is None else []
    refined = refine(
        problem,
        profiles.profile,
        refiner,
        constraints=placed.constraints,
        bursts=profiles.burst,
        extra=extra,
    )
    for trial in refined.order:
        try:
            placement = (
                placed.placement
                if trial.allocation == placed.result.allocation
                else place(trial.allocation)
            )
        except PlacementInfeasible:
            continue
        prediction = predict(
            problem.workflows,
            profiles.profile,
            trial.allocation,
            problem.rates,
            rho=problem.rho,
            bursts=profiles.burst,
        )
        units = round(sum(a.gpus for a in trial.allocation.values()) * problem.fraction_unit)
        result = replace(
            placed.result,
            allocation=dict(sorted(trial.allocation.items())),
            objective=trial.objective,
            units=units,
            prediction=prediction,
        )
        seconds = placed.seconds + time.perf_counter() - started
        notes = tuple(_note(t, t is trial) for t in refined.trials)
        simulated = trial.scored.latency if trial.scored is not None else None
        done = replace(placed, result=result, placement=placement, seconds=seconds)
        return done, notes, simulated
    return placed, (), None


def handmade_candidates(
    problem: Problem, profiles: SpecProfiles
) -> list[tuple[str, dict[str, Allocation]]]:
    """The allocations a user would make by hand, scored beside the closed form's candidates
    when a plan is refined (so a refined plan is never one the simulation finds worse than
    these): GPUs in proportion to each LLM's share of the LLM time (its calls/s x its idle call
    latency on its smallest whole-GPU instance), in whole GPUs and in fractions of 1/k; the even
    split; each LLM sized alone for its calls/s (``services.core.planning.handmade``); the search's
    optimum when every call is taken to be alone (no fan-out, stages or tool time). One that does
    not fit the GPUs is left out."""
    loads: dict[str, float] = {}
    for w in problem.workflows:
        for d in w.llms:
            loads[d.model] = loads.get(d.model, 0.0) + problem.rates[w.name] * d.n
    fits, gpus = profiles.fits, problem.gpus
    max_tp = min(problem.max_tp, gpus)

    def time_shares(k: int) -> dict[str, Allocation]:
        shares = {}
        for m, load in loads.items():
            tp = handmade.least_tp(m, fits, max_tp)
            shares[m] = load * profiles.profile(m, tp, 1.0).latency_at(0.0)
        return handmade.time_shares(shares, gpus, fits, max_tp, k)

    def blind() -> dict[str, Allocation]:
        # the same search sizing each LLM for its own calls as if each were alone
        workflows = tuple(
            WorkflowDemand(
                w.name,
                tuple(LlmDemand(d.model, d.n, 1.0) for d in w.llms),
                0.0,
                tuple((d.model,) for d in w.llms),
            )
            for w in problem.workflows
        )
        return search(replace(problem, workflows=workflows), profiles.profile).allocation

    makers: list[tuple[str, Callable[[], dict[str, Allocation]]]] = [
        ("time shares", lambda: time_shares(1)),
        ("even split", lambda: handmade.even_split(
            {m: profiles.spec.models[m] for m in loads}, gpus, fits, max_tp)),
        ("per-LLM sizing", lambda: handmade.independent(
            loads, profiles.profile, fits, gpus, max_tp)),
        ("per-LLM search", blind),
    ]  # fmt: skip
    if problem.fraction_unit > 1:
        makers.insert(1, ("time shares in fractions", lambda: time_shares(problem.fraction_unit)))
    out: list[tuple[str, dict[str, Allocation]]] = []
    for origin, make in makers:
        try:
            allocation = make()
        except (InfeasibleError, InvalidInputError):
            continue
        if all(a.replicas > 0 for a in allocation.values()) and set(allocation) == set(loads):
            out.append((origin, allocation))
    return out


def _note(trial: Trial, chosen: bool) -> str:
    alloc = ", ".join(
        f"{m} {a.replicas}x {'tp' + str(a.tp) if a.fraction == 1 else f'{a.fraction:g}'}"
        for m, a in sorted(trial.allocation.items())
    )
    mark = "chosen " if chosen else ""
    head = f"{mark}{trial.origin}: {alloc}: closed form {trial.objective:.4g} s"
    s = trial.scored
    if s is None:
        return f"{head}, not simulated (time budget)"
    steady = "steady" if s.steady else "falling behind"
    return f"{head}, simulated {s.latency:.4g} s, {s.throughput:.4g} req/s, {steady}"


def assemble(
    spec_text: str,
    spec: Spec,
    problem: Problem,
    placed: PlacedResult,
    created_at: float,
    profile_seconds: float = 0.0,
) -> Plan:
    """The plan document of a placed search result, its id computed."""
    prediction = placed.result.prediction
    workflows = tuple(
        WorkflowForecast(w.workflow, w.rate, problem.weight(w.workflow), w.latency, w.throughput)
        for w in prediction.workflows
    )
    llms = tuple(
        LlmForecast(m.model, m.load, m.utilization, m.call_latency, m.gpus) for m in prediction.llms
    )
    plan = Plan(
        id="",
        created_at=created_at,
        spec_text=spec_text,
        nodes=spec.nodes,
        fraction_unit=spec.fraction_unit,
        rho=spec.rho,
        allocation=dict(sorted(placed.result.allocation.items())),
        workflows=workflows,
        llms=llms,
        objective_s=placed.result.objective,
        placement=placed.placement,
        search_seconds=placed.seconds,
        profile_seconds=profile_seconds,
        rounds=placed.rounds,
        constraints=placed.constraints.notes,
        serving=tuple(spec.serving[m] for m in sorted(spec.serving)),
    )
    return replace(plan, id=plan_id(plan))


def plan_id(plan: Plan) -> str:
    """The content hash: sha256 of the canonical JSON of ``content(plan)``, shortened."""
    text = json.dumps(content(plan), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


def content(plan: Plan) -> dict[str, Any]:
    """What the id covers: inputs and result, not the id, creation time or search time.

    Nodes count by their facts (GPUs, memory, domains), not by heartbeats or agent addresses.
    """
    return {
        "spec": plan.spec_text,
        "nodes": [cluster_facts(n) for n in plan.nodes],
        "fraction_unit": plan.fraction_unit,
        "rho": plan.rho,
        "allocation": {m: asdict(a) for m, a in plan.allocation.items()},
        "workflows": [asdict(w) for w in plan.workflows],
        "llms": [_forecast(m) for m in plan.llms],
        "objective_s": plan.objective_s,
        "placement": [asdict(a) for a in plan.placement.assignments],
        "rounds": plan.rounds,
        "constraints": list(plan.constraints),
    } | ({"refinement": list(plan.refinement)} if plan.refinement else {})


def _forecast(m: LlmForecast) -> dict[str, Any]:
    """An LLM's prediction without its profile sources (how profiles were got is no decision)."""
    doc = asdict(m)
    doc.pop("profile_sources")
    return doc


def cluster_facts(node: NodeInventory) -> dict[str, Any]:
    """A node's planning facts: name, GPU types and memory, NVLink domains."""
    return {
        "name": node.name,
        "gpus": [[g.index, g.gpu_type, g.memory_total_bytes, g.mig_enabled] for g in node.gpus],
        "domains": [list(d) for d in node.domains],
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    """JSON-ready summary for the command line (unbounded numbers become null)."""
    k = plan.fraction_unit
    return {
        "id": plan.id,
        "created_at": plan.created_at,
        "fraction_unit": k,
        "rho": plan.rho,
        "gpus": plan.gpus,
        "cluster_gpus": sum(len(n.gpus) for n in plan.nodes),
        "objective_s": _finite(plan.objective_s),
        "search_seconds": plan.search_seconds,
        "profile_seconds": plan.profile_seconds,
        "rounds": plan.rounds,
        "constraints": list(plan.constraints),
        "allocation": {
            m: {**asdict(a), "fraction_units": round(a.fraction * k), "gpus": a.gpus}
            for m, a in plan.allocation.items()
        },
        "workflows": [_finite_dict(asdict(w)) for w in plan.workflows],
        "llms": [_finite_dict(asdict(m)) for m in plan.llms],
        "placement": {
            "assignments": [asdict(a) for a in plan.placement.assignments],
            "fragmentation": asdict(plan.placement.fragmentation),
        },
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _finite_dict(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) if isinstance(v, float) else v for k, v in values.items()}
