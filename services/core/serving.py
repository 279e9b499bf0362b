"""The engines a plan asks for, and how the running engines change into them.

An engine is identified by what it is and how it runs: ``<model>-<hash>``, the hash covering the
node, the GPUs, the share (units, MPS percentage, memory cap) and what it serves (weights, served
name, context length, engine arguments); engines alike in all of that (two halves of one GPU) are
told apart by a suffix ``-1``, ``-2``, ... The replica number is a label the placement may
renumber, not part of the identity: an engine that runs where the new plan wants one keeps running.
The same plan always gives the same ids, so applying it again changes nothing; an engine whose
placement or serving changed gets a new id: a new engine starts and the old one stops (a "move"
when the model and replica number stay the same).

Node agents use ``intended_engines`` for their own node; ``scepsy apply`` uses ``rollout`` to
show the change before making a plan current. ``fits`` and ``blockers`` decide when a new engine
can start beside the old ones still running (new engines start before old ones stop where the
GPUs allow).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.core.placement.heuristic import Assignment
from services.core.planning.plan import Plan
from services.core.workload.spec import ModelServing

# memory caps are fractions rounded in the placement: allow for the rounding when summing them
_MEMORY_SLACK = 1e-6


@dataclass(frozen=True, slots=True)
class EngineIntent:
    """One engine the plan asks for."""

    id: str
    serving: ModelServing
    assignment: Assignment
    fraction_unit: int  # k: assignment units are 1/k of a GPU
    gpu_type: str

    @property
    def model(self) -> str:
        return self.assignment.model

    @property
    def replica(self) -> int:
        return self.assignment.replica

    @property
    def node(self) -> str:
        return self.assignment.node

    @property
    def weight(self) -> float:
        """Router capacity weight: the GPUs it holds (TP x share of each GPU)."""
        return self.assignment.tp * self.assignment.units / self.fraction_unit

    @property
    def shares_gpus(self) -> bool:
        return self.assignment.units < self.fraction_unit


@dataclass(frozen=True, slots=True)
class Occupant:
    """An engine that holds (part of) some GPUs of a node: running, starting or draining."""

    id: str
    model: str
    replica: int
    assignment: Assignment


def engine_id(serving: ModelServing, assignment: Assignment, ordinal: int = 0) -> str:
    """``<model>-<hash of how it runs>``, with ``-<ordinal>`` for the second and later of
    engines alike in everything."""
    facts = {
        "node": assignment.node,
        "gpus": list(assignment.gpus),
        "units": assignment.units,
        "mps": assignment.mps_percentage,
        "memory": round(assignment.memory_fraction, 6),
        "weights": serving.weights,
        "served_name": serving.served_name,
        "max_model_len": serving.max_model_len,
        "engine_args": list(serving.engine_args),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:8]
    base = f"{_safe(assignment.model)}-{digest}"
    return f"{base}-{ordinal}" if ordinal else base


def _safe(name: str) -> str:
    """A model name as a file-name-safe id part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def serving_of(plan: Plan, model: str) -> ModelServing:
    """The plan's serving entry of ``model``; a plan made without one serves the model's name."""
    for entry in plan.serving:
        if entry.model == model:
            return entry
    return ModelServing(model, model, model)


def intended_engines(plan: Plan, node: str | None = None) -> tuple[EngineIntent, ...]:
    """The engines ``plan`` places (on ``node`` only, when given), sorted by id."""
    gpu_type = plan.nodes[0].gpus[0].gpu_type if plan.nodes and plan.nodes[0].gpus else ""
    seen: dict[str, int] = {}
    intents = []
    for a in sorted(plan.placement.assignments, key=lambda a: (a.model, a.replica)):
        serving = serving_of(plan, a.model)
        base = engine_id(serving, a)
        ordinal = seen.get(base, 0)
        seen[base] = ordinal + 1
        if node is None or a.node == node:
            intents.append(
                EngineIntent(
                    engine_id(serving, a, ordinal), serving, a, plan.fraction_unit, gpu_type
                )
            )
    return tuple(sorted(intents, key=lambda e: e.id))


@dataclass(frozen=True, slots=True)
class Rollout:
    """How the running engines change into the intended ones."""

    started: tuple[EngineIntent, ...]  # new engines (moved ones included)
    stopped: tuple[Occupant, ...]  # running engines no longer intended (moved ones included)
    kept: tuple[EngineIntent, ...]
    moved: tuple[tuple[Occupant, EngineIntent], ...]  # same model and replica, placed anew

    @property
    def changes(self) -> bool:
        return bool(self.started or self.stopped)


def rollout(intended: Sequence[EngineIntent], running: Sequence[Occupant]) -> Rollout:
    running_ids = {r.id for r in running}
    intended_ids = {e.id for e in intended}
    started = tuple(e for e in intended if e.id not in running_ids)
    stopped = tuple(r for r in running if r.id not in intended_ids)
    by_replica = {(e.model, e.replica): e for e in started}
    moved = tuple(
        (r, by_replica[(r.model, r.replica)]) for r in stopped if (r.model, r.replica) in by_replica
    )
    kept = tuple(e for e in intended if e.id in running_ids)
    return Rollout(started, stopped, kept, moved)


def fits(intent: EngineIntent, occupants: Iterable[Occupant]) -> bool:
    """Whether ``intent`` fits on its GPUs beside ``occupants`` (compute units and memory)."""
    return not blockers(intent, occupants)


def blockers(intent: EngineIntent, occupants: Iterable[Occupant]) -> tuple[Occupant, ...]:
    """The occupants sharing a GPU with ``intent`` when together they exceed a GPU's compute
    units or memory; empty when ``intent`` fits beside all of them."""
    k = intent.fraction_unit
    mine = intent.assignment
    sharing = [
        o
        for o in occupants
        if o.id != intent.id
        and o.assignment.node == mine.node
        and set(o.assignment.gpus) & set(mine.gpus)
    ]
    for gpu in mine.gpus:
        on_gpu = [o for o in sharing if gpu in o.assignment.gpus]
        units = mine.units + sum(o.assignment.units for o in on_gpu)
        memory = mine.memory_fraction + sum(o.assignment.memory_fraction for o in on_gpu)
        if units > k or memory > 1.0 + _MEMORY_SLACK:
            return tuple(sharing)
    return ()
