"""How a running simulation is controlled: what a controller sees and what it may do.

A ``Controller`` (e.g. ``baselines.HpaAutoscaler``) is called every ``interval`` seconds with a
``ClusterView`` and its own state, and returns ``ScaleAction``s and its new state (state passed
in and returned, so a decision is a function of its inputs). The simulator applies the actions
(``services.core.sim.simulator``) and records ``ScaleEvent``s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from services.core.allocation import Allocation


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica: str
    outstanding: int
    ready: bool  # serving (False while starting)


@dataclass(frozen=True, slots=True)
class ModelView:
    model: str
    allocation: Allocation  # the configuration new replicas get
    replicas: tuple[ReplicaView, ...]  # not stopping
    mean_outstanding: float  # time-averaged outstanding calls (all replicas) since the last view
    calls: int  # calls sent to the model since the last view


@dataclass(frozen=True, slots=True)
class ClusterView:
    now: float
    free_gpus: float
    models: tuple[ModelView, ...]


@dataclass(frozen=True, slots=True)
class ScaleAction:
    """Start (``delta`` > 0) or stop (< 0) ``abs(delta)`` replicas of ``model``."""

    model: str
    delta: int


class Controller(Protocol):
    """Changes replicas while the simulation runs (e.g. an autoscaler). State is the
    controller's own, passed in and returned, so a decision is a function of its inputs."""

    @property
    def interval(self) -> float: ...

    def initial_state(self) -> Any: ...

    def decide(self, view: ClusterView, state: Any) -> tuple[tuple[ScaleAction, ...], Any]: ...


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    time: float
    model: str
    replica: str
    event: str  # "start", "ready", "drain", "stop"
