"""Hand-made allocations: how a user splits GPUs over a workflow's LLMs without a planner.

Pure functions of what they are given; the simulator's baselines (``services.core.sim.baselines``)
are these, and a refined plan is checked against them (``planning.plan.handmade_candidates``):

- ``even_split`` - the cluster's whole GPUs split evenly over the LLMs, the remainder one each to
  the largest models; TP 1, or the least TP whose instance fits; replicas = its GPUs // TP.
- ``independent`` - per-LLM sizing without a workflow view: each LLM's share of the GPUs is
  proportional to its own demand, call rate x per-call cost in isolation (GPU-seconds per call at
  its smallest whole-GPU configuration, ``tp / T_m(tp)``), at least its smallest TP; inside its
  share each LLM picks the TP (whole GPUs) and replica count with the lowest per-call latency at
  its own call rate (its profile).
- ``time_shares`` - GPUs in proportion to each LLM's share of the LLM time, in whole GPUs or in
  fractions (what a user would do by hand with a trace).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from services.core.allocation import TP_DEGREES, Allocation
from services.core.cluster.models import ModelSpec
from services.core.errors import InfeasibleError
from services.core.perf.profile import Profile

# (model, tp, fraction) -> whether one instance fits (weights, minimum KV cache, the longest call)
Fits = Callable[[str, int, float], bool]
# (model, tp, fraction) -> the instance's profile; raises InfeasibleError when it does not fit
Profiles = Callable[[str, int, float], Profile]


def least_tp(model: str, fits: Fits, max_tp: int) -> int:
    """The smallest whole-GPU TP degree (<= ``max_tp``) whose instance of ``model`` fits."""
    for tp in TP_DEGREES:
        if tp <= max_tp and fits(model, tp, 1.0):
            return tp
    raise InfeasibleError(f"{model}: fits on no TP degree up to {max_tp}")


# ------------------------------------------------------------------------------------ static
def even_split(
    models: Mapping[str, ModelSpec], gpus: int, fits: Fits, max_tp: int = 8
) -> dict[str, Allocation]:
    """The user-specified static allocation (module docstring).

    Raises ``InfeasibleError`` when an LLM's even share is smaller than its least TP.
    """
    names = sorted(models)
    if gpus < len(names):
        raise InfeasibleError(f"even split: {gpus} GPUs for {len(names)} LLMs")
    share = dict.fromkeys(names, gpus // len(names))
    by_size = sorted(names, key=lambda m: (-models[m].param_count, m))
    for m in by_size[: gpus % len(names)]:
        share[m] += 1
    out: dict[str, Allocation] = {}
    for m in names:
        tp = least_tp(m, fits, max_tp)
        if tp > share[m]:
            raise InfeasibleError(f"even split: {m} needs TP {tp}, its share is {share[m]} GPUs")
        out[m] = Allocation(1.0, tp, share[m] // tp)
    return out


# ------------------------------------------------------------------------------------ independent
def proportional_shares(
    demand: Mapping[str, float], minimum: Mapping[str, int], gpus: int
) -> dict[str, int]:
    """Whole GPUs proportional to ``demand``, each at least ``minimum``: start every LLM at its
    minimum, then give one GPU at a time to the LLM furthest below its proportional target
    ``gpus x demand_m / sum(demand)`` (ties: by name). Raises ``InfeasibleError`` when the
    minimums exceed ``gpus``."""
    if sum(minimum.values()) > gpus:
        raise InfeasibleError(f"independent: the LLMs need {sum(minimum.values())} GPUs at least")
    total = sum(demand.values())
    target = {m: gpus * d / total if total > 0 else 0.0 for m, d in demand.items()}
    share = dict(minimum)
    for _ in range(gpus - sum(share.values())):
        m = min(sorted(share), key=lambda m: share[m] - target[m])
        share[m] += 1
    return share


def independent(
    loads: Mapping[str, float], profiles: Profiles, fits: Fits, gpus: int, max_tp: int = 8
) -> dict[str, Allocation]:
    """Independent per-LLM sizing (module docstring). ``loads`` are calls/s per LLM."""
    smallest = {m: least_tp(m, fits, max_tp) for m in loads}
    cost = {m: tp / profiles(m, tp, 1.0).saturation_rate for m, tp in smallest.items()}
    shares = proportional_shares({m: loads[m] * cost[m] for m in loads}, smallest, gpus)
    return {m: _own_best(m, loads[m], shares[m], profiles, fits, max_tp) for m in sorted(loads)}


def _own_best(
    model: str, load: float, gpus: int, profiles: Profiles, fits: Fits, max_tp: int
) -> Allocation:
    """The whole-GPU (TP, replicas) within ``gpus`` with the lowest per-call latency at
    ``load``; when every option saturates, the one with the most capacity (ties: smaller TP)."""
    options: list[tuple[float, float, int, int]] = []  # (latency, -capacity, tp, replicas)
    for tp in TP_DEGREES:
        if tp > min(gpus, max_tp) or not fits(model, tp, 1.0):
            continue
        replicas = gpus // tp
        profile = profiles(model, tp, 1.0)
        latency = profile.latency_at(load / replicas)
        options.append((latency, -replicas * profile.saturation_rate, tp, replicas))
    if all(math.isinf(o[0]) for o in options):
        options = [(0.0, cap, tp, r) for _, cap, tp, r in options]
    _, _, tp, replicas = min(options)
    return Allocation(1.0, tp, replicas)


# ------------------------------------------------------------------------------------ traced shares
def time_shares(
    shares: Mapping[str, float],
    gpus: int,
    fits: Fits,
    max_tp: int = 8,
    fraction_unit: int = 1,
) -> dict[str, Allocation]:
    """GPUs in proportion to each LLM's share of a request's traced LLM time (the obvious hand-made
    allocation once a trace is there). ``fraction_unit`` 1: whole GPUs (``proportional_shares``,
    each LLM at least its least TP; replicas = its GPUs // TP). k > 1: units of 1/k GPU in
    proportion, each LLM at least its smallest fraction that fits (TP 1), replicas of that
    fraction as many as its units hold (an LLM that fits on no fraction gets whole GPUs).
    Raises ``InfeasibleError`` when the minimums exceed the GPUs."""
    if fraction_unit <= 1:
        smallest = {m: least_tp(m, fits, max_tp) for m in shares}
        whole = proportional_shares(shares, smallest, gpus)
        return {m: Allocation(1.0, smallest[m], whole[m] // smallest[m]) for m in sorted(shares)}
    k = fraction_unit
    unit: dict[str, int] = {}  # units of one instance
    config: dict[str, tuple[float, int]] = {}
    for m in shares:
        u = next((u for u in range(1, k + 1) if fits(m, 1, u / k)), None)
        if u is None:
            tp = least_tp(m, fits, max_tp)
            unit[m], config[m] = tp * k, (1.0, tp)
        else:
            unit[m], config[m] = u, (u / k, 1)
    units = proportional_shares(shares, unit, gpus * k)
    return {m: Allocation(config[m][0], config[m][1], units[m] // unit[m]) for m in sorted(shares)}
