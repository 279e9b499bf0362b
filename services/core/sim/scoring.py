"""Allocations scored by simulating a replay of the traced requests: what refinement runs.

The closed-form ALP misjudges fan-outs and per-round barriers; ``planning.refine`` re-ranks its
best candidates by a score, and ``ReplayScorer`` is that score: the traced requests, replayed wave
by wave (``services.core.sim.replay``) and drawn stratified by work, arriving as a Poisson
process that offers exactly the rate (``arrivals.poisson_at``), served by the candidate
allocation in the simulator, with a fixed seed so that every candidate serves the same
requests. It needs a trace and the spec's models, not the workflow's program, so the
simulator's Scepsy system and the planner service (on the router's recorded trace) refine the
same way.

- ``score(allocation, rate)``: mean request latency, completion rate and whether the run kept up
  (steady, and the backlog grew by at most ``max_backlog_growth``); remembered per allocation
  and rate;
- ``capacity(allocation, rate)``: the work rate (``measure.work_rate``) when offered ``rate``
  above what the allocation serves (the refined throughput prediction);
- ``refiner(rate)``: the ``planning.refine.Refiner`` of plans for ``rate``, its choice
  confirmed (``confirmation``) at ``confirm`` x ``rate`` and at ``rate`` on an independent
  draw of requests and arrivals, its budget the LLM calls simulated (``simulated``), so a plan
  does not depend on the host's speed.

Several workflows are replayed as one ``Mix``, each run holding each workflow at exactly its
share of the requests (``replay.StratifiedMix``).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

from services.core.allocation import Allocation
from services.core.cluster.hardware import GpuSpec
from services.core.cluster.models import ModelSpec
from services.core.errors import InvalidInputError
from services.core.planning.refine import Refiner, Scored
from services.core.sim.arrivals import poisson_at
from services.core.sim.measure import (
    IntArray,
    MeasureConfig,
    Point,
    clear,
    measure,
    work_rate,
)
from services.core.sim.program import Workflow
from services.core.sim.replay import StratifiedMix, StratifiedReplay, TraceReplay
from services.core.sim.simulator import Deployment, SimOptions, SimResult, simulate
from services.core.sim.workflows import Mix
from services.core.workload.trace import Trace

REFINE_MEASURE = MeasureConfig(min_span_latencies=6.0)


@dataclass(frozen=True, slots=True)
class RefineSettings:
    """How many closed-form candidates, the headroom plans, the budget per plan, and
    the size of each replay run (at least ``latency_multiple`` isolated latencies or
    ``min_seconds`` of arrivals, at least ``min_requests``, at most about ``calls`` LLM calls:
    shorter runs under-state latency near capacity, the queues have not built up; and at least
    the requests whose mean LLM time per request is within ``run_error`` (relative standard
    error, from the trace's spread: ``spread_requests``), up to about ``spread_calls`` LLM
    calls), and of the capacity run.

    The spread matters where a few requests carry most of the work: co-serving RAG with a 10%
    share of beam search (CV of LLM time per request 2.3), a 60 s run of about 360 requests drew
    beam's work within +-12% (one standard error), and the same allocation at the same rate
    scored 4.3 s or 5.2 s by seed where long runs of the program measure 5.4 s.

    A run keeps up when its backlog grew by at most ``max_backlog_growth``, the evaluation's
    strict steady state (2%), for several workflows each workflow's own backlog (``groups``;
    ``measure.measure``); 5% before, when free arrival draws and iid requests made a run's
    growth too noisy for it: RAG on 16 GPUs at 43 req/s, 8+8 replicas grew 4.0% in the replay
    and 5.0% in the program, and were kept.

    A run whose verdict is not clear (``measure.clear``, the evaluation's rule) is run again
    with twice the requests, up to ``doublings`` times: one too short for its own latencies
    (not settled: an arrival span under ``REFINE_MEASURE.min_span_latencies`` median
    latencies) unless its backlog grew by more than ``unsettled_growth`` (capacity under half
    the rate: no longer run would keep up), one whose backlog grew by a little more than the
    bound, one still draining. Near capacity the queue is still filling in a short run and its
    latency is under-stated: beam search on 8 GPUs at 1.85 req/s (0.85 of the ALP's capacity),
    capped at ~280 requests by ``calls``, every candidate's run was unsettled (~35 s latencies
    over a 150 s span), and the lowest of those latencies, 35.3 s, won; the program measured
    63.5 s. Run 4x longer the replay put that allocation at 53.8 s and another at 46.8 s (the
    program: 59.1 s and 53.3 s).

    The budget is ``budget_calls`` LLM calls simulated per plan (no further candidate is
    scored past it; 12-40 s on one core of the 2-core development host, which simulates
    16-48 k calls/s, ReAct the slowest: about what 20 s allowed there when the host was quiet;
    a whole refinement took 0.15 M calls for ReAct on 4 GPUs, up to 2 M for beam search), so
    the same plan comes out on any host; ``seconds`` of wall time caps it on a host far slower
    than that. With a wall-time budget alone (20 s) the simulated
    Scepsy's plan depended on the host's load: ReAct on 4 GPUs at 4.35 req/s scored every
    candidate on a quiet host and picked ``planner 7x 0.5, reviewer 1x 0.5``, beside the
    benchmark fewer and picked ``planner 3x tp1, reviewer 1x tp1``.

    The chosen candidate is confirmed (``ReplayScorer.confirmation``) at ``confirm`` x the
    rate on the scoring run's draws, and at the rate on an independent draw of requests,
    arrivals and simulation seeds (``score(..., draw=1)``). The first alone passed a plan that
    kept up on one lucky sample: beam search on 4 GPUs at 0.881 req/s, ``policy 3x 0.25, prm
    6x 0.5`` (the program, 4x the bench's requests, 5 seeds: 55.2-59.5 s); with the second
    ``policy 2x 0.5, prm 6x 0.5`` is chosen (37.4-39.9 s, all sustainable). The second alone
    passes plans at the edge of their capacity (RAG on 16 GPUs at 41.5 req/s: 8+8 replicas,
    long runs 8.7 s, backlog +1.6 %, against 6.9 s for 7+9); ``confirm`` x the rate on an
    independent draw refuted plans that keep up (RAG on 16 GPUs at 44.8 req/s: 7+9, long
    runs 9.4-9.9 s on 3 seeds, gave way to ``generator 9x 0.75, reranker 37x 0.25``, 11.5-12.1
    s)."""

    candidates: int = 4
    headroom: tuple[float, ...] = (1.15, 1.3)
    budget_calls: int = 600_000
    seconds: float = 120.0
    calls: int = 60_000
    min_requests: int = 100
    latency_multiple: float = 60.0
    min_seconds: float = 60.0
    max_backlog_growth: float = 0.02
    confirm: float = 1.05  # the chosen candidate keeps up at this x the rate too (0: no check)
    run_error: float = 0.05
    spread_calls: int = 120_000
    doublings: int = 2  # a run whose verdict is not clear: again with twice the requests
    unsettled_growth: float = 0.5  # an unsettled run that grew more is clearly overloaded
    seed: int = 4242
    capacity_calls: int = 250_000
    capacity_latencies: float = 60.0

    def __post_init__(self) -> None:
        if self.doublings < 0 or not self.unsettled_growth > 0:
            raise InvalidInputError(
                f"refine settings: need doublings >= 0 and unsettled_growth > 0, got "
                f"{self.doublings}, {self.unsettled_growth}"
            )
        if self.budget_calls < 1 or not self.seconds > 0:
            raise InvalidInputError(
                f"refine settings: need budget_calls >= 1 and seconds > 0, got "
                f"{self.budget_calls}, {self.seconds}"
            )


def describe(allocation: Mapping[str, Allocation]) -> str:
    """Compact text: ``generator 2x tp2, reranker 3x 0.5``."""
    parts = []
    for m, a in sorted(allocation.items()):
        config = f"tp{a.tp}" if a.fraction == 1 else f"{a.fraction:g}"
        parts.append(f"{m} {a.replicas}x {config}")
    return ", ".join(parts)


_DESCRIBED = re.compile(r"\s*([\w.-]+) (\d+)x (tp\d+|[\d.]+)\s*$")


def parse_described(
    text: str, field: str = "allocation", models: Collection[str] | None = None
) -> dict[str, Allocation]:
    """``describe``'s text back to allocations (``"generator 2x tp1, reranker 4x 0.5"``);
    raises ``InvalidInputError`` naming ``field`` for a part not in that form, or, with
    ``models``, when the text does not allocate exactly those models."""
    out: dict[str, Allocation] = {}
    for part in text.split(","):
        found = _DESCRIBED.match(part)
        if found is None:
            raise InvalidInputError(
                f"{field}: {part.strip()!r} is not 'MODEL Nx tpK' or 'MODEL Nx FRACTION'"
            )
        model, replicas, config = found.groups()
        if config.startswith("tp"):
            out[model] = Allocation(1.0, int(config[2:]), int(replicas))
        else:
            out[model] = Allocation(float(config), 1, int(replicas))
    if models is not None and set(out) != set(models):
        missing, unknown = sorted(set(models) - set(out)), sorted(set(out) - set(models))
        raise InvalidInputError(
            f"{field}: {text.strip()!r} must allocate exactly {sorted(models)} "
            f"(missing {missing}, unknown {unknown})"
        )
    return out


@dataclass
class ReplayScorer:
    """Scores of allocations on ``workflow`` (a replay, or a ``Mix`` of replays) served by
    ``models`` on ``gpu`` (module docstring). ``isolated_latency`` (s, a request served alone)
    and ``spread_requests`` (``spread_requests`` of the trace at ``settings.run_error``) size the
    runs. A ``Mix``'s runs hold each workflow at exactly its share (``run_workflow``), and
    each workflow's backlog counts on its own (``run_groups``, ``measure.measure``)."""

    workflow: Workflow
    gpu: GpuSpec
    models: Mapping[str, ModelSpec]  # deployment name -> architecture
    isolated_latency: float
    options: SimOptions = field(default_factory=SimOptions)
    settings: RefineSettings = field(default_factory=RefineSettings)
    spread_requests: int = 0
    scores: dict[tuple[str, float, int], Scored] = field(default_factory=dict)
    simulated: int = 0  # LLM calls simulated by ``score`` and ``capacity`` so far

    @classmethod
    def of_trace(
        cls,
        trace: Trace,
        shares: Mapping[str, float],
        gpu: GpuSpec,
        models: Mapping[str, ModelSpec],
        *,
        options: SimOptions | None = None,
        settings: RefineSettings | None = None,
    ) -> ReplayScorer:
        """The scorer of the workflows ``shares`` names (name -> rate; normalised to shares of
        the requests) replayed from ``trace``; the isolated latency is the median traced
        request's duration (an upper bound when the trace was taken under load, which only
        lengthens the runs). Raises ``InvalidInputError`` when a workflow has no successful
        call in the trace or calls a model ``models`` does not name."""
        total = sum(shares.values())
        if not shares or not total > 0:
            raise InvalidInputError(f"shares: need a workflow with a rate > 0, got {dict(shares)}")
        names = {m: spec.name for m, spec in models.items()}
        replays = [TraceReplay.of(trace, w, names) for w in sorted(shares)]
        workflow: Workflow = replays[0]
        if len(replays) > 1:
            parts = tuple(shares[r.name] / total for r in replays)
            workflow = Mix("+".join(r.name for r in replays), tuple(replays), parts)
        durations = [r.end - r.start for r in trace.requests if r.workflow in shares]
        if not durations:  # no request spans: the calls of each request, first start to last end
            durations = [_request_span(trace, w) for w in shares]
        isolated = max(statistics.median(durations), 1e-3)
        opts, cfg = options or SimOptions(), settings or RefineSettings()
        spread = spread_requests(trace, shares, cfg.run_error)
        return cls(workflow, gpu, dict(models), isolated, opts, cfg, spread)

    def deployment(self, allocation: Mapping[str, Allocation]) -> Deployment:
        return Deployment(self.gpu, self.models, dict(allocation))

    def _calls_per_request(self) -> float:
        wf = self.workflow
        parts = wf.parts if isinstance(wf, Mix) else (wf,)
        shares = wf.shares if isinstance(wf, Mix) else (1.0,)
        total = 0.0
        for part, share in zip(parts, shares, strict=True):
            if isinstance(part, TraceReplay):
                total += share * sum(part.mean_calls().values())
        return max(total, 1.0)

    def score(self, allocation: Mapping[str, Allocation], rate: float, draw: int = 0) -> Scored:
        """The replay served by ``allocation`` at ``rate`` requests/s (module docstring);
        ``draw`` numbers independent draws of the requests, arrivals and simulation seeds (0:
        the one every candidate is scored on)."""
        cfg = self.settings
        key = (describe(allocation), round(rate, 9), draw)
        found = self.scores.get(key)
        if found is not None:
            return found
        span = max(cfg.latency_multiple * self.isolated_latency, cfg.min_seconds)
        per_request = self._calls_per_request()
        most = max(cfg.min_requests, int(cfg.calls / per_request))
        spread = min(self.spread_requests, int(cfg.spread_calls / per_request))
        requests = max(cfg.min_requests, min(round(rate * span), most), spread)
        seed = cfg.seed + draw
        opts = replace(self.options, seed=self.options.seed + seed)
        for attempt in range(cfg.doublings + 1):
            run = self.run_workflow(requests, seed)
            result = simulate(
                run, self.deployment(allocation), poisson_at(rate, requests, seed), opts
            )
            self.simulated += result.calls
            point = measure(result, rate, REFINE_MEASURE, self.run_groups(run, opts.seed, requests))
            if clear(point, cfg.max_backlog_growth, cfg.unsettled_growth):
                break
            if attempt < cfg.doublings:
                requests *= 2
        scored = Scored(
            point.mean_latency,
            point.throughput,
            point.settled and point.backlog_growth <= cfg.max_backlog_growth,
            latency_error(result, point),
        )
        self.scores[key] = scored
        return scored

    def confirmation(self, allocation: Mapping[str, Allocation], rate: float) -> Scored:
        """Whether ``allocation``, scored at ``rate``, has headroom: it keeps up at ``confirm``
        x ``rate`` on the scoring run's draw (a queue still filling at the rate overflows
        there), and at ``rate`` on an independent draw (``draw=1``: a verdict that holds for
        other requests and arrivals, not for one lucky sample). The first score that falls
        behind, else the independent one."""
        headroom = self.score(allocation, rate * self.settings.confirm)
        if not headroom.steady:
            return headroom
        return self.score(allocation, rate, draw=1)

    def capacity(self, allocation: Mapping[str, Allocation], rate: float) -> float:
        """The work rate in the measurement window when ``allocation`` is offered ``rate``
        (above its capacity) for ``capacity_latencies`` isolated latencies (at least 400
        requests, at most about ``capacity_calls`` LLM calls)."""
        result = self.capacity_run(allocation, rate, record=True)
        return work_rate(result, measure(result, rate))

    def capacity_run(
        self, allocation: Mapping[str, Allocation], rate: float, *, record: bool = False
    ) -> SimResult:
        """The simulation ``capacity`` measures (``record``: with the trace of its calls)."""
        cfg = self.settings
        most = max(400, int(cfg.capacity_calls / self._calls_per_request()))
        wanted = round(rate * cfg.capacity_latencies * self.isolated_latency)
        requests = min(max(400, wanted), most)
        result = simulate(
            self.run_workflow(requests, cfg.seed),
            self.deployment(allocation),
            poisson_at(rate, requests, cfg.seed + 1),
            replace(self.options, seed=self.options.seed + cfg.seed, record=record),
        )
        self.simulated += result.calls
        return result

    def run_workflow(self, requests: int, seed: int) -> Workflow:
        """What a run of ``requests`` requests replays: a single workflow's trace stratified by
        work (``replay.StratifiedReplay``), several workflows' each at exactly its share and
        stratified (``replay.StratifiedMix``); the same draw for every allocation and rate at
        one ``seed``."""
        wf = self.workflow
        if isinstance(wf, TraceReplay):
            return StratifiedReplay.of(wf, requests, seed)
        if isinstance(wf, Mix) and all(isinstance(p, TraceReplay) for p in wf.parts):
            return StratifiedMix.of(wf, requests, seed)
        return wf

    def run_groups(self, run: Workflow, seed: int, requests: int) -> IntArray | None:
        """Per request of ``run`` (``run_workflow``'s, simulated with ``seed``), the index of
        its workflow when several are served; None for one."""
        if isinstance(run, StratifiedMix):
            return run.groups(requests)
        if isinstance(run, Mix):
            return run.groups(seed, requests)
        return None

    def refiner(self, rate: float) -> Refiner:
        """The refinement of plans for ``rate`` requests/s of the whole."""
        cfg = self.settings
        return Refiner(
            lambda allocation: self.score(allocation, rate),
            candidates=cfg.candidates,
            headroom=cfg.headroom,
            seconds=cfg.seconds,
            budget=cfg.budget_calls,
            work=lambda: self.simulated,
            confirm=(
                (lambda allocation: self.confirmation(allocation, rate))
                if cfg.confirm > 0
                else None
            ),
        )


def latency_error(result: SimResult, point: Point) -> float:
    """The relative standard error of ``point``'s mean latency, its measured requests of
    ``result`` taken as independent (under load they are not: a lower bound)."""
    measured = result.latency[len(result.latency) - point.requests :]
    mean = float(measured.mean())
    if len(measured) < 2 or not mean > 0:
        return 0.0
    return float(measured.std(ddof=1)) / math.sqrt(len(measured)) / mean


def spread_requests(trace: Trace, workflows: Collection[str], error: float) -> int:
    """Requests of ``workflows`` (drawn as in ``trace``) for the standard error of the mean LLM
    time per request (a request's calls' summed durations) to be ``error`` of the mean:
    (CV / error)^2 from the trace's spread; the trace's request count when it has fewer than
    two requests of them. Raises ``InvalidInputError`` unless ``error`` > 0."""
    if not error > 0:
        raise InvalidInputError(f"error: must be positive, got {error!r}")
    work: dict[str, float] = {}
    for call in trace.calls:
        if call.workflow in workflows and call.status == "ok":
            work[call.request_id] = work.get(call.request_id, 0.0) + call.end - call.start
    values = list(work.values())
    if len(values) < 2 or not statistics.fmean(values) > 0:
        return len(values)
    cv = statistics.stdev(values) / statistics.fmean(values)
    return math.ceil((cv / error) ** 2)


def _request_span(trace: Trace, workflow: str) -> float:
    spans: dict[str, tuple[float, float]] = {}
    for c in trace.calls:
        if c.workflow == workflow:
            lo, hi = spans.get(c.request_id, (c.start, c.end))
            spans[c.request_id] = (min(lo, c.start), max(hi, c.end))
    return statistics.median(hi - lo for lo, hi in spans.values()) if spans else 0.0
