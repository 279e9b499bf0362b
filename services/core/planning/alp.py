"""The Aggregate LLM Pipeline (ALP): predicted workflow latency and throughput of an allocation.

``docs/design.md``, The ALP. For workflow w at target rate lambda_w:

* LLM m carries the summed load of every workflow calling it: ``load_m = sum_w lambda_w n_{w,m}``
  calls/s, split evenly over its r_m replicas (the router balances them);
* its per-call latency is ``L_m(load_m / r_m)`` read off m's profile for its (TP, fraction);
* w's term for m is ``L_m(load_m / r_m) * n_{w,m} / p_{w,m}``: the expected busy time of m per
  request (n calls, p of them in flight at once);
* terms compose **per stage**: LLMs observed active at the same time inside a request (a stage,
  see ``services.core.workload.stats``) overlap, so a stage costs the largest of its terms; stages
  run one
  after another, so ``L_w = sum over stages of max over m in stage + tool time``. With one LLM per
  stage this is the paper's serial sum. (``max`` is a lower bound on the union of overlapping busy
  times; it is exact when the shorter one is fully hidden.)
* throughput at the target mix: every workflow's rate scaled by the largest common factor ``s``
  that keeps every LLM within capacity, ``s = min_m r_m T_m / load_m``; ``T_w = s lambda_w``.
  For a single workflow this is the paper's ``min_m r_m T_m / n_m``.

Fan-outs and routing (``bursts`` given to ``predict`` and the search; the plan path does): a
workflow's p parallel calls reach the replicas together, p / r each, so the per-call latency
is not the profile's (Poisson arrivals of single calls). ``call_latency`` adds what the b = p/r
calls of one fan-out cost each other on an idle replica (the ``BurstTable``, from the analytic
engine simulation of the model's mix), grows the waiting part of the curve by (1 + b) / 2 as
for batch arrivals, and shrinks the wait for admission by the Erlang-C ratio of r / p replicas
pooled by least-outstanding routing. Measured against the workflow simulator by
``scripts/bench_alp.py`` (README, The ALP against the simulator).

An allocation is infeasible when an instance does not fit in memory (the ``fits`` callable, or a
profile lookup raising ``InfeasibleError``), when an LLM's load reaches its capacity
(``load_m >= r_m T_m``, latency unbounded), when it exceeds the utilisation cap ``rho`` or when it
needs more GPUs than available. The prediction says why, naming the LLM and the numbers.

Everything here is arithmetic on already computed profiles: cheap enough for search loops. The
per-LLM pieces (``llm_loads``, ``call_latency``, ``llm_term``) are exposed for planners that exploit
separability: only the stage ``max`` couples LLMs, and only inside one stage.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

from services.core.allocation import Allocation
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.model import FloatArray
from services.core.perf.profile import Profile
from services.core.workload.demand import LlmDemand, WorkflowDemand

# (model, tp, fraction) -> the profile of one instance of that configuration.
ProfileLookup = Callable[[str, int, float], Profile]
# (model, tp, fraction) -> None when an instance fits in its memory share, else the reason.
FitCheck = Callable[[str, int, float], str | None]


@dataclass(frozen=True, slots=True)
class BurstTable:
    """Mean per-call latency of ``b`` calls handed to an idle instance at once, for some b
    (``services.core.perf.analytic.burst_latencies``); ``sizes`` rise from 1."""

    sizes: tuple[float, ...]
    latencies: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or self.sizes[0] != 1 or len(self.sizes) != len(self.latencies):
            raise InvalidInputError("burst table: sizes must start at 1, one latency each")

    @classmethod
    def of(cls, pairs: Sequence[tuple[int, float]]) -> BurstTable:
        ordered = sorted(pairs)
        return cls(tuple(float(b) for b, _ in ordered), tuple(lat for _, lat in ordered))

    def extra(self, burst: float) -> float:
        """Added per-call latency of a burst of ``burst`` calls over a lone call (>= 0);
        linear between sizes, growing like the last step beyond the largest."""
        sizes, lats = self.sizes, self.latencies
        if burst <= 1 or len(sizes) == 1:
            return 0.0
        i = bisect_left(sizes, burst)
        if i >= len(sizes):
            slope = (lats[-1] - lats[-2]) / (sizes[-1] - sizes[-2])
            value = lats[-1] + slope * (burst - sizes[-1])
        else:
            lo, hi = sizes[i - 1], sizes[i]
            w = (burst - lo) / (hi - lo)
            value = lats[i - 1] + w * (lats[i] - lats[i - 1])
        return max(0.0, value - lats[0])


# (model, tp, fraction) -> the burst table of one instance of that configuration.
BurstLookup = Callable[[str, int, float], BurstTable]
# What stands in for an instance's burst table where none is read: every call reaches its
# replica alone or in a group its profile measured already (``call_latency`` reads a table
# only for bursts of b > ``Profile.group`` calls). Its ``extra`` is 0 for every burst.
NO_BURSTS = BurstTable((1.0,), (0.0,))


@dataclass(frozen=True, slots=True)
class LlmPrediction:
    model: str
    load: float  # calls/s over all replicas, summed over workflows
    replica_rate: float  # calls/s offered to one replica
    capacity: float  # calls/s, replicas x saturation rate (0 when it does not fit)
    utilization: float  # load / capacity (inf when capacity is 0)
    call_latency: float  # s per call at replica_rate (inf when saturated or not fitting)
    gpus: float


@dataclass(frozen=True, slots=True)
class WorkflowPrediction:
    workflow: str
    rate: float  # target requests/s
    latency: float  # s per request (inf when an LLM it calls is saturated or does not fit)
    throughput: float  # requests/s at the target mix


@dataclass(frozen=True, slots=True)
class Prediction:
    feasible: bool
    reasons: tuple[str, ...]  # empty when feasible
    workflows: tuple[WorkflowPrediction, ...]
    llms: tuple[LlmPrediction, ...]
    gpus: float  # total GPUs the allocation uses

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def workflow(self, name: str) -> WorkflowPrediction:
        for w in self.workflows:
            if w.workflow == name:
                return w
        raise KeyError(name)

    def llm(self, model: str) -> LlmPrediction:
        for m in self.llms:
            if m.model == model:
                return m
        raise KeyError(model)


def llm_loads(
    workflows: Sequence[WorkflowDemand], target_rates: Mapping[str, float]
) -> dict[str, float]:
    """Calls/s each LLM carries: ``sum_w lambda_w n_{w,m}``."""
    loads: dict[str, float] = {}
    for w in workflows:
        rate = target_rates[w.name]
        for d in w.llms:
            loads[d.model] = loads.get(d.model, 0.0) + rate * d.n
    return loads


def replica_burst(p: float, replicas: int) -> float:
    """Calls of one fan-out of ``p`` parallel calls that each replica gets: the router spreads
    calls handed over together evenly (least outstanding), at least one."""
    return max(1.0, p / replicas)


def call_latency(
    profile: Profile,
    replicas: int,
    load: float,
    burst: BurstTable | None = None,
    p: float = 1.0,
    *,
    pooled: bool = False,
) -> float:
    """Per-call latency of an LLM with ``replicas`` instances carrying ``load`` calls/s in all.

    Plain: the profile's latency at ``load / replicas`` (each replica a separate queue with
    Poisson arrivals). ``pooled``: the router sends each call to the least busy replica, so the
    replicas wait for admission like one queue of several servers; the growth of TTFT over the
    idle one (the wait) shrinks by ``pooling_factor`` of replicas / p servers (a fan-out reaches
    p replicas at once, so only calls arriving alone pool fully). With ``burst``, calls arrive in
    fan-outs of ``p`` spread over the replicas (``replica_burst``): the waiting part grows by
    (1 + b) / 2, as in a queue with batch arrivals of b, and the b calls share iterations
    (``burst.extra``). A profile measured in groups of g calls (``Profile.group``, a fan-out
    profile) has bursts of g in its curve: only the growth from g to b is added.
    """
    rate = load / replicas
    latency = profile.latency_at(rate)
    if not math.isfinite(latency) or not (pooled or (burst is not None and p > 1)):
        return latency
    idle = profile.points[0].mean_latency
    waiting = max(latency - idle, 0.0)
    if pooled:
        # only the wait for admission (the growth of TTFT) pools; larger batches slow every
        # replica alike. A fan-out of p occupies p replicas at once: only groups of p replicas
        # queue apart.
        queued = min(max(profile.ttft_at(rate) - profile.points[0].ttft, 0.0), waiting)
        groups = max(1, int(replicas // max(p, 1.0)))
        pooled_wait = queued * pooling_factor(groups, rate / profile.saturation_rate)
        waiting += pooled_wait - queued
    extra = 0.0
    if burst is not None and p > 1:
        b = replica_burst(p, replicas)
        g = profile.group  # bursts of g calls are in the profile's curve already
        if b > g:
            waiting *= (1 + b) / (1 + g)
            extra = max(burst.extra(b) - burst.extra(g), 0.0)
    return idle + waiting + extra


def call_latencies(
    profile: Profile,
    replicas: FloatArray,
    load: float,
    burst: BurstTable | None = None,
    p: float = 1.0,
    *,
    pooled: bool = False,
) -> FloatArray:
    """``call_latency`` for many replica counts at once (the search's candidates)."""
    bursts = None if burst is None else (burst,)
    latency: FloatArray = fanout_latencies(
        (profile,), (replicas,), load, bursts, (p,), pooled=pooled
    )[0]
    return latency


def fanout_latencies(
    profiles: Sequence[Profile],
    replicas: Sequence[FloatArray],
    load: float,
    bursts: Sequence[BurstTable] | None,
    fanouts: Sequence[float],
    *,
    pooled: bool = False,
) -> FloatArray:
    """``call_latencies`` of several configurations of one LLM carrying ``load``, each with its
    replica counts (``replicas[k]`` for ``profiles[k]``, its burst table ``bursts[k]``), for
    every fan-out p of ``fanouts`` (1: lone calls) at once: row j holds fan-out ``fanouts[j]``,
    the columns run through profile 0's replica counts, then profile 1's, and so on."""
    sizes = [len(x) for x in replicas]
    r = np.concatenate([np.asarray(x, dtype=np.float64) for x in replicas])
    which = np.repeat(np.arange(len(profiles)), sizes)  # each column's profile
    rate = load / r
    points = _Points.of(profiles)
    latency = points.curve(rate, which, points.latency)
    ps = np.array(fanouts, dtype=np.float64)[:, None]  # one row per fan-out
    bursty = ps[:, 0] > 1 if bursts is not None else np.zeros(len(fanouts), dtype=bool)
    if not (pooled or bursty.any()):
        return np.broadcast_to(latency, (len(fanouts), len(r)))
    finite = np.isfinite(latency)
    idle = points.latency[which, 0]
    waiting = np.maximum(np.where(finite, latency, idle) - idle, 0.0)
    wait = np.broadcast_to(waiting, (len(fanouts), len(r)))
    if pooled:
        ttft = points.curve(rate, which, points.ttft)
        first_ttft = points.ttft[which, 0]
        growth = np.where(finite, ttft, first_ttft) - first_ttft
        queued = np.minimum(np.maximum(growth, 0.0), waiting)
        groups = np.maximum(1, np.floor(r / np.maximum(ps, 1.0)).astype(np.int64))
        factor = _pooling_factors(groups, rate / points.saturation[which])
        wait = wait + queued * factor - queued
    extra = np.zeros_like(wait)
    if bursts is not None and bursty.any():
        wait = np.array(wait)
        g = points.group[which]  # bursts of g calls are in the profile's curve already
        base = [t.extra(p.group) for t, p in zip(bursts, profiles, strict=True)]
        for j in np.flatnonzero(bursty).tolist():
            b = np.maximum(1.0, ps[j, 0] / r)
            wait[j] = wait[j] * np.maximum(1 + b, 1 + g) / (1 + g)
            # a burst of one costs nothing extra (``BurstTable.extra``)
            for i in np.flatnonzero(b > 1).tolist():
                k = int(which[i])
                extra[j, i] = max(bursts[k].extra(float(b[i])) - base[k], 0.0)
    out = np.where(finite, idle + wait + extra, np.inf)
    keep = pooled | bursty
    return np.where(keep[:, None], out, latency)


@dataclass(frozen=True, slots=True)
class _Points:
    """The points of several profiles as rows (padded on the right: rates with inf, values
    with the last one), for ``fanout_latencies``."""

    rate: FloatArray
    latency: FloatArray
    ttft: FloatArray
    last: npt.NDArray[np.int64]  # index of each profile's last point
    saturation: FloatArray
    group: FloatArray

    @classmethod
    def of(cls, profiles: Sequence[Profile]) -> _Points:
        width = max(len(p.points) for p in profiles)

        def padded(values: list[float], fill: float) -> list[float]:
            return values + [fill] * (width - len(values))

        return cls(
            np.array([padded([q.rate for q in p.points], math.inf) for p in profiles]),
            np.array(
                [
                    padded([q.mean_latency for q in p.points], p.points[-1].mean_latency)
                    for p in profiles
                ]
            ),
            np.array([padded([q.ttft for q in p.points], p.points[-1].ttft) for p in profiles]),
            np.array([len(p.points) - 1 for p in profiles], dtype=np.int64),
            np.array([p.saturation_rate for p in profiles], dtype=np.float64),
            np.array([p.group for p in profiles], dtype=np.float64),
        )

    def curve(
        self, rate: FloatArray, which: npt.NDArray[np.int64], values: FloatArray
    ) -> FloatArray:
        """``Profile.latency_at`` (or ``ttft_at``) of the per-point ``values`` (rows of
        ``latency`` or ``ttft``) at ``rate[i]`` on profile ``which[i]``: linear between points
        as ``np.interp`` computes it (the same operations, so the same bits), the first point's
        value below the first rate, the M/M/1-like growth of the last point's beyond the last
        rate and inf from the saturation rate on."""
        xs, ys = self.rate[which], values[which]
        column = np.arange(len(rate))
        last = self.last[which]
        j = (xs <= rate[:, None]).sum(axis=1) - 1  # xs[j] <= rate < xs[j + 1]
        lo = np.clip(j, 0, None)
        hi = np.minimum(lo + 1, last)
        x0, x1 = xs[column, lo], xs[column, hi]
        y0, y1 = ys[column, lo], ys[column, hi]
        with np.errstate(divide="ignore", invalid="ignore"):
            between = (y1 - y0) / (x1 - x0) * (rate - x0) + y0
        inside = np.where((j < 0) | (j >= last) | (x0 == rate), y0, between)
        x_last, y_last = xs[column, last], ys[column, last]
        saturation = self.saturation[which]
        with np.errstate(divide="ignore", invalid="ignore"):
            beyond = y_last * (saturation - x_last) / (saturation - rate)
        out = np.where(rate > x_last, beyond, inside)
        return np.where(rate >= saturation, np.inf, out)


def _pooling_factors(servers: npt.NDArray[np.int64], utilization: FloatArray) -> FloatArray:
    """``pooling_factor`` elementwise."""
    c = np.minimum(servers, MAX_POOLED_SERVERS)
    u = np.asarray(utilization, dtype=np.float64)
    active = (c > 1) & (u > 0) & (u < 1)
    x = np.clip(u, 0.0, 1.0) * POOLING_STEPS
    i = np.minimum(x.astype(np.int64), POOLING_STEPS - 1)
    w = x - i
    table = _pooling_table()
    factor = table[c, i] * (1 - w) + table[c, i + 1] * w
    return np.where(active, factor, 1.0)


POOLING_STEPS = 1000  # the table's utilisation grid: 0, 0.001, ..., 1


@cache
def _pooling_table() -> FloatArray:
    """Exact Erlang-C ratios for 0..MAX_POOLED_SERVERS servers on the utilisation grid."""
    table = np.ones((MAX_POOLED_SERVERS + 1, POOLING_STEPS + 1))
    u = np.arange(1, POOLING_STEPS) / POOLING_STEPS
    for c in range(2, MAX_POOLED_SERVERS + 1):
        a = c * u
        erlang_b = np.ones_like(u)
        for k in range(1, c + 1):  # Erlang B by its recurrence
            erlang_b = a * erlang_b / (k + a * erlang_b)
        erlang_c = c * erlang_b / (c - a * (1 - erlang_b))
        table[c, 1:POOLING_STEPS] = erlang_c / a
    return table


MAX_POOLED_SERVERS = 32


def pooling_factor(servers: int, utilization: float) -> float:
    """Mean wait of an M/M/c queue over that of c separate M/M/1 queues at the same
    utilisation: C(c, c u) / (c u), with C the Erlang C probability of waiting (1 for c = 1).
    Servers are capped at ``MAX_POOLED_SERVERS`` (the wait is all but gone by then; erring
    towards more wait); read off a table on a 0.001 utilisation grid (linear between)."""
    found = _pooling_factors(np.array([servers]), np.array([utilization]))
    return float(found[0])


def llm_term(
    profile: Profile,
    replicas: int,
    load: float,
    demand: LlmDemand,
    burst: BurstTable | None = None,
    *,
    pooled: bool = False,
) -> float:
    """One workflow's latency term for one LLM: ``L_m(load / r, p) * n / p``."""
    latency = call_latency(profile, replicas, load, burst, demand.p, pooled=pooled)
    return latency * demand.n / demand.p


def compose(workflow: WorkflowDemand, terms: Mapping[str, float]) -> float:
    """``L_w``: per stage the largest term, summed over stages, plus tool time."""
    return workflow.tool_time + sum(max(terms[m] for m in stage) for stage in workflow.stages)


def predict(
    workflows: Sequence[WorkflowDemand],
    profiles: ProfileLookup,
    allocation: Mapping[str, Allocation],
    target_rates: Mapping[str, float],
    *,
    fits: FitCheck | None = None,
    rho: float = 1.0,
    gpus_available: float | None = None,
    bursts: BurstLookup | None = None,
) -> Prediction:
    """Predict every workflow's latency and throughput under ``allocation`` (module docstring).

    Raises ``InvalidInputError`` when a workflow has no target rate or calls an LLM that the
    allocation leaves out; everything else that goes wrong is an infeasible prediction.
    """
    if not 0 < rho <= 1:
        raise InvalidInputError(f"rho: must be in (0, 1], got {rho}")
    for w in workflows:
        if w.name not in target_rates:
            raise InvalidInputError(f"target_rates: no rate for workflow {w.name!r}")
        if not target_rates[w.name] >= 0:
            raise InvalidInputError(
                f"target_rates.{w.name}: must be >= 0, got {target_rates[w.name]}"
            )
        for d in w.llms:
            if d.model not in allocation:
                raise InvalidInputError(f"allocation: no entry for LLM {d.model!r} ({w.name})")
    loads = llm_loads(workflows, target_rates)
    reasons: list[str] = []
    llms: list[LlmPrediction] = []
    latency: dict[str, float] = {}
    profiled: dict[str, Profile | None] = {}
    scale = math.inf  # the common factor s of the module docstring
    for model in sorted(allocation):
        alloc = allocation[model]
        load = loads.get(model, 0.0)
        profile = _profile(model, alloc, profiles, fits, reasons)
        profiled[model] = profile
        capacity = alloc.replicas * profile.saturation_rate if profile is not None else 0.0
        utilization = load / capacity if capacity > 0 else math.inf
        latency[model] = (
            call_latency(profile, alloc.replicas, load) if profile is not None else math.inf
        )
        if profile is not None and load > 0:
            scale = min(scale, capacity / load)
            where = (
                f"{model}: {load:.4g} calls/s on {alloc.replicas} replica(s) of capacity "
                f"{profile.saturation_rate:.4g} calls/s each"
            )
            if load >= capacity:
                reasons.append(f"{where}: saturated (utilisation {utilization:.3g})")
            elif utilization > rho:
                reasons.append(f"{where}: utilisation {utilization:.3g} exceeds rho {rho:g}")
        elif profile is None and load > 0:
            scale = 0.0
        llms.append(
            LlmPrediction(
                model,
                load,
                load / alloc.replicas,
                capacity,
                utilization,
                latency[model],
                alloc.gpus,
            )
        )
    gpus = sum(a.gpus for a in allocation.values())
    if gpus_available is not None and gpus > gpus_available + 1e-9:
        reasons.append(f"allocation uses {gpus:g} GPUs, {gpus_available:g} available")

    def term(d: LlmDemand) -> float:
        profile = profiled[d.model]
        if profile is None:
            return math.inf
        alloc = allocation[d.model]
        table = None
        if bursts is not None:
            # the table is simulated only where it is read (``NO_BURSTS``)
            read = d.p > 1 and replica_burst(d.p, alloc.replicas) > profile.group
            table = bursts(d.model, alloc.tp, alloc.fraction) if read else NO_BURSTS
        return llm_term(
            profile, alloc.replicas, loads.get(d.model, 0.0), d, table, pooled=bursts is not None
        )

    predictions = tuple(
        WorkflowPrediction(
            w.name,
            target_rates[w.name],
            compose(w, {d.model: term(d) for d in w.llms}),
            target_rates[w.name] * scale if scale < math.inf else math.inf,
        )
        for w in workflows
    )
    return Prediction(not reasons, tuple(reasons), predictions, tuple(llms), gpus)


def _profile(
    model: str,
    alloc: Allocation,
    profiles: ProfileLookup,
    fits: FitCheck | None,
    reasons: list[str],
) -> Profile | None:
    """The instance profile, or None (with a reason appended) when the instance does not fit."""
    config = f"tp {alloc.tp}, fraction {alloc.fraction:g}"
    if fits is not None:
        problem = fits(model, alloc.tp, alloc.fraction)
        if problem is not None:
            reasons.append(f"{model}: does not fit ({config}): {problem}")
            return None
    try:
        return profiles(model, alloc.tp, alloc.fraction)
    except InfeasibleError as exc:
        reasons.append(f"{model}: does not fit ({config}): {exc}")
        return None
