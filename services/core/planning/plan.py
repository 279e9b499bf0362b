"""The plan: a deployment spec searched (``services.core.planning.search``) and placed, as one
document.

A ``Plan`` records its inputs (the spec text as given, the cluster's nodes, k and rho), the result
(allocation per LLM, the ALP's predictions per workflow and per LLM, the placement) and how it was
found (search time, rounds of placement feedback and the constraints they added). Its ``id`` is a
content hash of inputs and result (``plan_id``): the same spec planned on the same cluster gives
the same id, so a plan stored under its id never changes. ``created_at`` and the search time are
left out of the hash (they differ between two runs that decide the same thing).

``build_plan`` is pure: the caller hands in the profiles, the clock reading and, optionally, the
placement function; the default places with ``services.core.placement.place`` on the spec's nodes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.core.allocation import TP_DEGREES, Allocation
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError
from services.core.placement.heuristic import (
    Assignment,
    Placement,
    cluster_state,
    instances_of,
    place,
)
from services.core.planning.alp import FitCheck, ProfileLookup
from services.core.planning.feedback import DEFAULT_MAX_ROUNDS, PlacedResult, PlaceFn, search_placed
from services.core.planning.space import Problem
from services.core.workload.spec import Spec, parse_spec

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


def max_tp_of(nodes: tuple[NodeInventory, ...]) -> int:
    """The largest TP degree that fits one NVLink domain of the cluster (1 without NVLink)."""
    largest = max((n.largest_domain or 1 for n in nodes), default=1)
    return max(t for t in TP_DEGREES if t <= largest)


def with_nodes(spec: Spec, nodes: tuple[NodeInventory, ...]) -> Spec:
    """``spec`` planned on ``nodes`` instead of its own cluster (e.g. the live one).

    Raises ``InvalidInputError`` when the nodes have no GPU or several GPU types.
    """
    types = sorted({g.gpu_type for n in nodes for g in n.gpus})
    if len(types) != 1:
        raise InvalidInputError(f"cluster: must have GPUs of exactly one type, got {types}")
    return replace(spec, nodes=nodes)


def spec_from_text(
    text: str, nodes: tuple[NodeInventory, ...] | None = None, *, source: str = "spec"
) -> Spec:
    """A self-contained spec from its YAML (or JSON) text, planned on ``nodes`` when given (its
    own ``cluster`` entry is then ignored and may be left out).

    Raises ``InvalidInputError`` naming ``source`` and the field; a spec that refers to files
    (traces, a cluster path) is refused, since there is no directory to resolve them against.
    """
    import yaml  # only parsing text needs it

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{source}: not valid YAML: {exc}") from None
    if nodes is None:
        return parse_spec(doc, source=source)
    types = sorted({g.gpu_type for n in nodes for g in n.gpus})
    if len(types) != 1:
        raise InvalidInputError(f"cluster: must have GPUs of exactly one type, got {types}")
    if isinstance(doc, Mapping):
        gpus = sum(len(n.gpus) for n in nodes)
        doc = {**doc, "cluster": {"gpu_type": types[0], "gpus": gpus}}
    return with_nodes(parse_spec(doc, source=source), nodes)


def placer_for(
    nodes: tuple[NodeInventory, ...], k: int, current: Sequence[Assignment] = ()
) -> PlaceFn:
    """Place allocations with the placer's heuristic on the free capacity of ``nodes``;
    ``current``: the running placement, whose memory counts as free (it is being replaced)."""
    state = cluster_state(nodes, k, current=current)
    return lambda allocation: place(instances_of(allocation, k), state)


def build_plan(
    spec_text: str,
    spec: Spec,
    profiles: ProfileLookup,
    *,
    created_at: float,
    fits: FitCheck | None = None,
    placer: PlaceFn | None = None,
    profile_seconds: Callable[[], float] | None = None,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
) -> Plan:
    """Search and place ``spec`` (``search_placed``) and record the plan.

    ``profile_seconds`` reads the cumulative time the profile source has spent computing
    (e.g. ``AnalyticProfiles.seconds``); the plan records its growth during the search.
    Raises ``AllocationInfeasible`` (why, and the best throughput these GPUs reach) or
    ``InfeasibleError`` when no allocation places.
    """
    spent = profile_seconds or (lambda: 0.0)
    before = spent()
    problem = problem_of(spec)
    placed = search_placed(
        problem,
        profiles,
        placer or placer_for(spec.nodes, spec.fraction_unit),
        fits=fits,
        max_rounds=max_rounds,
    )
    return assemble(spec_text, spec, problem, placed, created_at, spent() - before)


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
        "llms": [asdict(m) for m in plan.llms],
        "objective_s": plan.objective_s,
        "placement": [asdict(a) for a in plan.placement.assignments],
        "rounds": plan.rounds,
        "constraints": list(plan.constraints),
    }


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
