"""The systems Scepsy is compared with: how each one allocates GPUs to a workflow's LLMs.

All are pure functions of what that system knows (``docs/design.md``, Evaluation); the first
three are the hand-made allocations of ``services.core.planning.handmade``:

- ``even_split`` - the user-specified static allocation: the cluster's whole GPUs split evenly
  over the LLMs, the remainder one each to the largest models; TP 1, or the least TP whose
  instance fits; replicas = its GPUs // TP.
- ``independent`` - per-LLM optimisation without a workflow view: each LLM's share of the GPUs is
  proportional to its own demand, call rate x per-call cost in isolation (GPU-seconds per call at
  its smallest whole-GPU configuration, ``tp / T_m(tp)``), at least its smallest TP; inside its
  share each LLM picks the TP (whole GPUs) and replica count with the lowest per-call latency at
  its own call rate (its profile), ignoring how its calls combine into workflow latency
  (no n/p weighting, no stages, no GPU fractions).
- ``time_shares`` - GPUs in proportion to each LLM's share of traced LLM time, in whole GPUs or
  in fractions (what a user would do by hand with a trace).
- ``HpaAutoscaler`` - a reactive per-LLM autoscaler in the style of the Kubernetes HPA on ongoing
  requests per replica: desired = ceil(mean outstanding calls / target), within a tolerance;
  scale-ups at once (bounded by the free GPUs of the shared pool; the simulator adds the engine
  start delay), scale-downs only to the highest desired count of the stabilisation window, and
  only once a whole window of recommendations exists.
- ``oracle_candidates`` - every maximal allocation of a small cluster (for the oracle, which
  simulates them all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import product

from services.core.allocation import TP_DEGREES, Allocation
from services.core.errors import InvalidInputError
from services.core.planning.handmade import (
    Fits,
    Profiles,
    even_split,
    independent,
    least_tp,
    proportional_shares,
    time_shares,
)
from services.core.sim.control import ClusterView, ModelView, ScaleAction

__all__ = [
    "AutoscalerState",
    "Fits",
    "HpaAutoscaler",
    "Profiles",
    "even_split",
    "independent",
    "instance_options",
    "least_tp",
    "oracle_candidates",
    "proportional_shares",
    "time_shares",
]


# ------------------------------------------------------------------------------------ autoscaler
AutoscalerState = Mapping[str, tuple[tuple[float, int], ...]]  # model -> (time, desired) history


@dataclass(frozen=True, slots=True)
class HpaAutoscaler:
    """HPA-style reactive autoscaler (module docstring); a ``simulator.Controller``.

    ``targets``: outstanding calls per replica, per model (``target`` for models not listed);
    ``interval``: seconds between decisions (the HPA's sync period); ``tolerance``: no change
    while |metric / target - 1| <= tolerance;
    ``scale_down_window``: a scale-down goes only to the highest desired count of this window;
    a scale-up adds at most ``max(4, live replicas)`` (the HPA's default scale-up policy).
    """

    target: float = 16.0
    targets: Mapping[str, float] = field(default_factory=dict)
    interval: float = 15.0
    tolerance: float = 0.1
    scale_down_window: float = 60.0

    def __post_init__(self) -> None:
        targets = [self.target, *self.targets.values()]
        if not (min(targets) > 0 and self.interval > 0 and self.scale_down_window >= 0):
            raise InvalidInputError("autoscaler: target and interval must be > 0, window >= 0")

    def initial_state(self) -> AutoscalerState:
        return {}

    def desired(self, model: ModelView) -> int:
        """Replicas this model wants now (at least 1)."""
        live = len(model.replicas)
        target = self.targets.get(model.model, self.target)
        ratio = model.mean_outstanding / (max(live, 1) * target)
        if abs(ratio - 1) <= self.tolerance:
            return live
        return max(1, math.ceil(model.mean_outstanding / target))

    def decide(
        self, view: ClusterView, state: AutoscalerState
    ) -> tuple[tuple[ScaleAction, ...], AutoscalerState]:
        """Scale-downs first (they free GPUs only once drained), then scale-ups, the most
        overloaded model first."""
        history: dict[str, tuple[tuple[float, int], ...]] = {}
        downs: list[ScaleAction] = []
        ups: list[tuple[float, ScaleAction]] = []
        for model in view.models:
            want = self.desired(model)
            past = state.get(model.model, ())
            since = view.now - self.scale_down_window
            # a scale-down needs recommendations over the whole window (none at start-up)
            covered = bool(past) and past[0][0] <= since + 1e-9
            kept = tuple((t, d) for t, d in past if t >= since - 1e-9)
            history[model.model] = (*kept, (view.now, want))
            live = len(model.replicas)
            if want > live:
                step = min(want - live, max(4, live))
                ups.append((-want / max(live, 1), ScaleAction(model.model, step)))
                continue
            floor = max(d for _, d in history[model.model])
            if covered and floor < live:
                downs.append(ScaleAction(model.model, floor - live))
        ups.sort(key=lambda pair: (pair[0], pair[1].model))
        return (*downs, *(a for _, a in ups)), history


# ------------------------------------------------------------------------------------ oracle
def instance_options(model: str, k: int, max_tp: int, fits: Fits) -> list[tuple[int, int]]:
    """(tp, units per GPU) of every configuration of ``model`` that fits."""
    options = [(1, u) for u in range(1, k + 1)] + [(t, k) for t in TP_DEGREES if 1 < t <= max_tp]
    return [(tp, u) for tp, u in options if fits(model, tp, u / k)]


def oracle_candidates(
    models: list[str], gpus: int, k: int, fits: Fits, max_tp: int = 8
) -> Iterator[dict[str, Allocation]]:
    """Every allocation of ``models`` within ``gpus`` (units of 1/k) that is maximal: no LLM
    could add a replica of its configuration in the units left over."""
    budget = gpus * k
    per_model: list[list[tuple[int, int, int]]] = []  # (tp, units, replicas)
    for m in models:
        opts = [
            (tp, u, r)
            for tp, u in instance_options(m, k, max_tp, fits)
            for r in range(1, budget // (tp * u) + 1)
        ]
        per_model.append(opts)
    for combo in product(*per_model):
        used = sum(tp * u * r for tp, u, r in combo)
        if used > budget:
            continue
        if any(budget - used >= tp * u for tp, u, _ in combo):
            continue  # a replica more would fit
        yield {m: Allocation(u / k, tp, r) for m, (tp, u, r) in zip(models, combo, strict=True)}
