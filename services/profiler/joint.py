"""Joint (co-located) profiles: every LLM of a deployment measured at once, at the shares of load
a workflow puts on them.

A profile of one engine alone (``vllm_backend.Sweep``) says how that engine serves when nothing
else runs. Engines that share a host's cores (the ``cpu`` device: fractions of a few cores, the
engines' API servers, the router and the clients all on the same cores), or a GPU under MPS, do
not serve like that: on this project's 2-core host a tiny-model call of 32 output tokens took
0.10 s with the engine on the other core idle and 0.55 s (median of 3 windows) while that engine
served 4 streams (issue 11's notes). A profile measured alone then under-predicts every call of
the workflow.

``JointSweep`` drives all of a workflow's LLMs through one endpoint (the router) at once: at a
workflow rate ``lam`` (requests/s) LLM m gets calls at ``lam x n_m`` per s, sent in groups of
calls at once as the workflow's fan-outs are: each group's size is drawn from ``sizes_m``, the
fan-outs seen in a trace (``fan_outs``: RAG's reranker 4 to 8 candidates; a fixed ``group_m`` when
no sizes are given), and the groups are Poisson at ``lam x n_m / mean(sizes_m)``; prompt and
completion lengths are drawn from its mix. Drawn sizes, not their mean: a group's calls share
the engine's iterations, so a call's latency grows with its group's size, and calls in large
groups count more often (size-biased) than fixed groups of the mean fan-out show. Per step
every LLM gets a ``RatePoint`` (as the single-engine sweep measures it: warm-up, a window,
mean/p50/p99, TTFT, TPOT, completions inside the window, errors). The workflow rates rise as
``SweepConfig.rate_steps`` x a probe's estimate of the capacity (a burst of ``probe_requests``
requests' worth of calls of every LLM at once); the sweep stops when any LLM falls behind at
``confirm`` measurements in a row (falling behind its offered rate; no latency bound; a step
that falls behind is measured again at the same rate first, and the stalled window is dropped:
a shared host stalls now and then), or at the time budget. Points that fell behind are not
part of the profile.

Each LLM's points become a ``Profile`` at per-replica rates (``lam x n_m / replicas_m``), its
saturation rate is the best per-replica throughput it reached when it fell behind at the sweep's
last step, else ``NOT_REACHED_MARGIN`` x the highest per-replica rate it kept up with (extrapolated
from a lower bound: another LLM bound the workflow first, or the budget ended the sweep). The
binding LLM is the one whose saturation gives the least workflow rate, so the workflow's capacity
is the binding LLM's (two LLMs can fall behind together; the one confirmed first need not be the
tighter one). The
ALP then reads each LLM's latency at its share of the workflow's load from a curve measured
under the load the other LLMs put on the host at that same workflow rate.

The calls are independent (no request's calls wait for each other): the ALP still composes
stages, fan-outs (n_m / p_m) and tool time itself, so a joint profile is an input of the
prediction, not the prediction.

**In the workflow's order** (``requests``: the pilot trace's requests as waves,
``services.core.sim.replay.waves_of``): each step sends requests, Poisson at the workflow rate,
each one of the pilot's requests at random replayed wave by wave: a wave's calls at once with
their traced token counts, the next wave when all of them ended, after the traced tool time.
Independent Poisson groups per LLM do not reproduce a workflow's order (RAG: a request's
generator call starts when its reranker fan-out ends, so the two LLMs' calls rarely overlap
within a request, and they queue differently): against the RAG workflow on the 2-core host at
5.5 requests/s its generator calls took 0.53-0.69x the independent joint profile's, its reranker
calls 1.11-1.76x (issue 11's notes). The points are still per LLM (its calls' latencies at the
step's workflow rate), so the ALP composes them as before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import numpy as np

from services.core.errors import InvalidInputError, UnavailableError
from services.core.perf.analytic import RequestMix
from services.core.perf.profile import Profile, ProfileKey, ProfilePoint
from services.core.sim.replay import ReplayRequest
from services.core.workload.trace import TraceCall
from services.profiler.vllm_backend import (
    Progress,
    RatePoint,
    SweepConfig,
    _point,
    saturated,
)
from services.runtime.driver import CallOutcome, direct_session, send_completion

JOINT_RATE_STEPS: tuple[float, ...] = (0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.1, 1.3, 1.5)
NOT_REACHED_MARGIN = 1.1  # saturation of an LLM that never fell behind: its highest rate x this


@dataclass(frozen=True, slots=True)
class JointLlm:
    """One LLM of the deployment as the workflow uses it."""

    name: str  # the model name its calls carry (the router's model)
    mix: RequestMix
    calls: float  # n_m: calls per workflow request
    group: int = 1  # calls sent at once when ``sizes`` is empty
    replicas: int = 1
    sizes: tuple[int, ...] = ()  # fan-outs seen in a trace; each group's size is one of them

    def __post_init__(self) -> None:
        if not (self.calls > 0 and math.isfinite(self.calls)):
            raise InvalidInputError(f"{self.name}: calls: must be > 0, got {self.calls}")
        if self.group < 1:
            raise InvalidInputError(f"{self.name}: group: must be >= 1, got {self.group}")
        if self.replicas < 1:
            raise InvalidInputError(f"{self.name}: replicas: must be >= 1, got {self.replicas}")
        if any(size < 1 for size in self.sizes):
            raise InvalidInputError(f"{self.name}: sizes: must all be >= 1, got {self.sizes}")

    @property
    def mean_group(self) -> float:
        """Calls per group on average: the mean of ``sizes``, else ``group``."""
        return float(np.mean(self.sizes)) if self.sizes else float(self.group)

    def draw_group(self, rng: np.random.Generator) -> int:
        """One group's size: one of ``sizes`` at random (each fan-out seen equally likely)."""
        if not self.sizes:
            return self.group
        return self.sizes[int(rng.integers(len(self.sizes)))]


@dataclass(frozen=True, slots=True)
class JointMeasurement:
    """A joint sweep's result: per step the workflow rate, per LLM its points."""

    llms: tuple[JointLlm, ...]
    rates: tuple[float, ...]  # workflow requests/s offered at each step
    points: dict[str, tuple[RatePoint, ...]]  # per LLM; rate = calls/s over all its replicas
    idle: dict[str, float]  # per LLM, s
    stop_reason: str  # "saturated", "budget" or "rates"
    method: dict[str, Any]
    # per LLM, steps measured after the sweep at chosen workflow rates (``JointSweep.measure_at``:
    # the rates a validation runs the workflow at); they refine the curve, not the saturation
    operating: dict[str, tuple[RatePoint, ...]] = field(default_factory=dict)

    def llm(self, name: str) -> JointLlm:
        for d in self.llms:
            if d.name == name:
                return d
        raise KeyError(name)

    def saturation_rate(self, name: str) -> float:
        """Per-replica calls/s (module docstring)."""
        d = self.llm(name)
        pts = self.points[name]
        if pts and pts[-1].saturated:
            best = max((p.throughput for p in pts), default=0.0)
        else:
            # never seen falling behind: beyond the highest rate it kept up with, by a margin
            # so that the ALP's curve ends past its last point (a lower bound, extrapolated)
            kept = max((p.rate for p in pts if p.ok and not p.saturated), default=0.0)
            best = max(NOT_REACHED_MARGIN * kept, max((p.throughput for p in pts), default=0.0))
        return best / d.replicas

    @property
    def binding(self) -> str:
        """The LLM whose saturation allows the least workflow rate ("" when the sweep did not stop
        on saturation): two LLMs can fall behind together, and the one confirmed first need not
        be the tighter one."""
        if self.stop_reason != "saturated":
            return ""
        return min(
            self.llms, key=lambda d: self.saturation_rate(d.name) * d.replicas / d.calls
        ).name

    def capacity(self) -> float:
        """Workflow requests/s: the least over LLMs of replicas x saturation / n."""
        return min(self.saturation_rate(d.name) * d.replicas / d.calls for d in self.llms)

    def with_operating(self, step: Mapping[str, RatePoint]) -> JointMeasurement:
        """This measurement with one more operating step (a point per LLM)."""
        if set(step) != set(self.points):
            raise InvalidInputError(
                f"operating step: one point per LLM {sorted(self.points)}, got {sorted(step)}"
            )
        grown = {m: (*self.operating.get(m, ()), step[m]) for m in self.points}
        return replace(self, operating=grown)

    def profile(
        self, name: str, key: ProfileKey, *, robust: bool = False, operating: bool = True
    ) -> Profile:
        """``name``'s profile at per-replica rates, its latencies made non-decreasing in the rate
        (``monotone``, weighted by the calls). ``robust``: each point's latency is the median of
        its sub-window means (``RatePoint.median_window_latency``), as
        ``DriveResult.window_latency`` measures a workflow run. ``operating``: the operating
        steps' points too, in rate order among the sweep's (``False``: the sweep's only)."""
        d = self.llm(name)
        sat = self.saturation_rate(name)
        steps = [*self.points[name], *(self.operating.get(name, ()) if operating else ())]
        kept = [
            p
            for p in sorted(steps, key=lambda p: p.rate)
            if p.ok > 0
            and not p.saturated
            and math.isfinite(p.mean_latency)
            and p.rate / d.replicas < sat
        ]
        if not kept:
            raise UnavailableError(f"joint profile of {name}: no step below saturation succeeded")
        # steps at one rate (an operating step measured twice, or at a sweep's rate) are one
        # point: each field the calls-weighted mean of theirs
        rows: list[list[RatePoint]] = []
        for p in kept:
            if rows and rows[-1][0].rate == p.rate:
                rows[-1].append(p)
            else:
                rows.append([p])

        def pooled(group: list[RatePoint], value: Callable[[RatePoint], float]) -> float:
            pairs = [(value(p), float(p.ok)) for p in group if math.isfinite(value(p))]
            if not pairs:
                return math.nan
            return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)

        def latency_of(p: RatePoint) -> float:
            if robust and math.isfinite(p.median_window_latency):
                return p.median_window_latency
            return p.mean_latency

        latency = monotone(
            [pooled(group, latency_of) for group in rows],
            [float(sum(p.ok for p in group)) for group in rows],
        )
        points = tuple(
            ProfilePoint(
                group[0].rate / d.replicas,
                value,
                pooled(group, lambda p: p.p50_latency),
                pooled(group, lambda p: p.p99_latency),
                pooled(group, lambda p: p.ttft),
                pooled(group, lambda p: p.tpot),
            )
            for group, value in zip(rows, latency, strict=True)
        )
        return Profile(key, points, sat, group=max(1.0, d.mean_group / d.replicas))

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        from services.profiler.vllm_backend import _finite

        return {
            "llms": [
                {
                    "name": d.name,
                    "mix": d.mix.id,
                    "calls": d.calls,
                    "group": d.group,
                    "sizes": dict(sorted(Counter(d.sizes).items())),
                    "replicas": d.replicas,
                }
                for d in self.llms
            ],
            "rates": list(self.rates),
            "points": {m: [_finite(asdict(p)) for p in pts] for m, pts in self.points.items()},
            "idle": self.idle,
            "binding": self.binding,
            "stop_reason": self.stop_reason,
            "capacity": self.capacity(),
            "method": self.method,
            "operating": {
                m: [_finite(asdict(p)) for p in pts] for m, pts in self.operating.items()
            },
        }


def fan_outs(calls: Iterable[TraceCall]) -> dict[str, tuple[int, ...]]:
    """Per model, the size of every fan-out among ``calls`` (a trace's): inside one request, a
    model's ok calls whose intervals overlap one another, directly or through a chain of
    overlaps, are one fan-out (a program's parallel step sends them at once and waits for all
    of them); a call alone is a fan-out of 1. Sizes in the order of the requests' ids and their
    fan-outs' starts, so the result does not depend on the trace's order."""
    by_key: dict[tuple[str, str], list[TraceCall]] = defaultdict(list)
    for call in calls:
        if call.status == "ok":
            by_key[(call.request_id, call.model)].append(call)
    sizes: dict[str, list[int]] = defaultdict(list)
    for (_, model), group in sorted(by_key.items()):
        group.sort(key=lambda c: (c.start, c.end))
        size, end = 0, -math.inf
        for call in group:
            if size and call.start >= end:
                sizes[model].append(size)
                size, end = 0, -math.inf
            size += 1
            end = max(end, call.end)
        sizes[model].append(size)
    return {m: tuple(v) for m, v in sorted(sizes.items())}


def monotone(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """The weighted least-squares non-decreasing fit of ``values`` (pool adjacent violators).

    Latency does not fall as load rises; on a shared host single windows do (a stall, then a
    quiet one). Pooling a violating run into its weighted mean keeps the curve's level without
    carrying one stalled window forward as a running maximum would."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, max(w, 1e-9), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            total = a[1] + b[1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / total
            a[1] = total
            a[2] += b[2]
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


class JointSweep:
    """Every LLM of ``llms`` at once through ``base_url`` (module docstring)."""

    def __init__(
        self,
        base_url: str,
        llms: Sequence[JointLlm],
        config: SweepConfig | None = None,
        *,
        seed: int = 0,
        probe_requests: int = 8,
        rate_steps: Sequence[float] = JOINT_RATE_STEPS,
        progress: Progress | None = None,
        requests: Sequence[ReplayRequest] = (),
    ) -> None:
        if not llms:
            raise InvalidInputError("joint sweep: no LLMs")
        names = [d.name for d in llms]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"joint sweep: an LLM is listed twice ({names})")
        called = {m for r in requests for _, calls in r.waves for m, _, _ in calls}
        if called - set(names):
            raise InvalidInputError(
                f"joint sweep: requests call {sorted(called - set(names))}, not among {names}"
            )
        if probe_requests < 1:
            raise InvalidInputError(f"probe_requests: must be >= 1, got {probe_requests}")
        self.base_url = base_url.rstrip("/")
        self.llms = tuple(llms)
        self.config = config or SweepConfig()
        self.probe_requests = probe_requests
        self.rate_steps = tuple(rate_steps)
        self._rng = np.random.default_rng([seed, 11])
        self._progress = progress or (lambda _: None)
        self.requests = tuple(requests)
        self._by_name = {d.name: d for d in self.llms}

    async def _call(self, session: aiohttp.ClientSession, d: JointLlm) -> CallOutcome:
        prompt, completion = d.mix.draw(1, self._rng)
        return await self._send(session, d.name, int(prompt[0]), int(completion[0]))

    async def _send(
        self, session: aiohttp.ClientSession, name: str, prompt: int, completion: int
    ) -> CallOutcome:
        return await send_completion(
            session,
            self.base_url,
            name,
            prompt,
            completion,
            np.random.default_rng(),
            timeout_s=self.config.call_timeout_s,
            clock=time.monotonic,
        )

    async def _burst(
        self, session: aiohttp.ClientSession, d: JointLlm, n: int
    ) -> list[CallOutcome]:
        return list(await asyncio.gather(*(self._call(session, d) for _ in range(n))))

    def plan(self, lam: float, span: float) -> list[tuple[float, JointLlm, int]]:
        """The groups of one step at workflow rate ``lam`` over ``span`` s: (offset s, LLM, size),
        in time order; each LLM's groups Poisson at ``lam x n / mean group``, sizes drawn."""
        plans: list[tuple[float, JointLlm, int]] = []
        for d in self.llms:
            gap = d.mean_group / (lam * d.calls)
            at = float(self._rng.exponential(gap))
            while at < span:
                plans.append((at, d, d.draw_group(self._rng)))
                at += float(self._rng.exponential(gap))
        plans.sort(key=lambda x: x[0])
        return plans

    def ordered_plan(self, lam: float, span: float) -> list[tuple[float, ReplayRequest]]:
        """The requests of one ordered step (module docstring) at ``lam`` requests/s over
        ``span`` s: (offset s, the pilot request replayed), Poisson, each drawn at random."""
        plans: list[tuple[float, ReplayRequest]] = []
        at = float(self._rng.exponential(1 / lam))
        while at < span:
            plans.append((at, self.requests[int(self._rng.integers(len(self.requests)))]))
            at += float(self._rng.exponential(1 / lam))
        return plans

    async def _replay(
        self,
        session: aiohttp.ClientSession,
        request: ReplayRequest,
        offset: float,
        tasks: list[tuple[asyncio.Task[CallOutcome], float, JointLlm]],
    ) -> None:
        """``request``'s waves in order, each call's task added to ``tasks`` as it is sent."""
        for gap, calls in request.waves:
            if gap > 0:
                await asyncio.sleep(gap)
            wave = [
                asyncio.create_task(self._send(session, model, prompt, completion))
                for model, prompt, completion in calls
            ]
            for task, (model, _, _) in zip(wave, calls, strict=True):
                tasks.append((task, offset, self._by_name[model]))
            # wait, not gather: cancelling this request must not cancel its calls in flight,
            # which the step still counts
            await asyncio.wait(wave)

    async def measure_at(
        self, lam: float, window_s: float, idle: Mapping[str, float]
    ) -> dict[str, RatePoint]:
        """One step at workflow rate ``lam`` with a ``window_s`` window (the sweep's warm-up and
        drain), each LLM's point marked saturated as the sweep marks it against ``idle`` (a
        ``JointMeasurement``'s): an operating step (``JointMeasurement.with_operating``)."""
        if not (lam > 0 and math.isfinite(lam)):
            raise InvalidInputError(f"operating step: rate must be > 0, got {lam}")
        if not window_s > 0:
            raise InvalidInputError(f"operating step: window_s must be > 0, got {window_s}")
        cfg = replace(self.config, window_s=window_s)
        unbounded = replace(cfg, latency_bound=math.inf)
        async with direct_session() as session:
            points = await self._step(session, lam, cfg)
        return {
            name: replace(point, saturated=saturated(point, idle[name], unbounded))
            for name, point in points.items()
        }

    def window_length(self, lam: float, cfg: SweepConfig) -> float:
        """A step's window at workflow rate ``lam``: long enough for ``min_groups`` groups of the
        sparsest LLM, up to 3x ``cfg.window_s``; in the workflow's order a request's groups come
        together (one request's waves), so for as many requests."""
        sparsest = min(lam * d.calls / d.mean_group for d in self.llms)
        if self.requests:
            sparsest = min(sparsest, lam)
        return min(max(cfg.window_s, cfg.min_groups / sparsest), 3 * cfg.window_s)

    async def _step(
        self, session: aiohttp.ClientSession, lam: float, cfg: SweepConfig | None = None
    ) -> dict[str, RatePoint]:
        cfg = cfg or self.config
        length = self.window_length(lam, cfg)
        span = cfg.warmup_s + length
        t0 = time.monotonic()
        tasks: list[tuple[asyncio.Task[CallOutcome], float, JointLlm]] = []
        replays: list[tuple[asyncio.Task[None], float]] = []
        if self.requests:
            for offset, request in self.ordered_plan(lam, span):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                replay = self._replay(session, request, offset, tasks)
                replays.append((asyncio.create_task(replay), offset))
        else:
            for offset, d, size in self.plan(lam, span):
                delay = t0 + offset - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                for _ in range(size):
                    tasks.append((asyncio.create_task(self._call(session, d)), offset, d))
        window = (t0 + cfg.warmup_s, t0 + span)
        waited: list[asyncio.Task[Any]] = [t for t, off in replays if off >= cfg.warmup_s]
        waited += [t for t, off, _ in tasks if off >= cfg.warmup_s]
        if waited:
            remaining = t0 + span + cfg.drain_s - time.monotonic()
            await asyncio.wait(waited, timeout=max(remaining, 0.1))
        for replay_task, _ in replays:  # a request still running sends nothing more
            replay_task.cancel()
        await asyncio.gather(*(t for t, _ in replays), return_exceptions=True)
        measured = [(task, off, d) for task, off, d in tasks if off >= cfg.warmup_s]
        now = time.monotonic()
        out: dict[str, RatePoint] = {}
        for d in self.llms:
            mine = [(t, off) for t, off, dd in measured if dd is d]
            outcomes = [
                t.result()
                if t.done()
                else CallOutcome(t0 + off, now, None, 0, 0, "unfinished: still running")
                for t, off in mine
            ]
            finished = [t.result() for t, _, dd in tasks if dd is d and t.done()]
            out[d.name] = _point(lam * d.calls, outcomes, finished, window, cfg.sub_windows)
        for t, _, _ in tasks:
            t.cancel()
        await asyncio.gather(*(t for t, _, _ in tasks), return_exceptions=True)
        return out

    async def run(self) -> JointMeasurement:
        cfg = self.config
        started = time.monotonic()
        async with direct_session() as session:
            idle: dict[str, float] = {}
            for d in self.llms:
                await self._burst(session, d, 2)  # warm-up
                calls = [await self._call(session, d) for _ in range(cfg.idle_calls)]
                ok = [c.latency for c in calls if c.ok]
                if not ok:
                    kinds = Counter(c.error for c in calls)
                    raise UnavailableError(f"{d.name}: every idle call failed ({dict(kinds)})")
                idle[d.name] = float(np.mean(ok))
            # probe: probe_requests requests' worth of every LLM's calls at once
            probe = await asyncio.gather(
                *(
                    self._burst(session, d, max(1, round(self.probe_requests * d.calls)))
                    for d in self.llms
                )
            )
            flat = [c for group in probe for c in group]
            ok_calls = [c for c in flat if c.ok]
            if len(ok_calls) >= 2:
                span = max(c.end for c in ok_calls) - min(c.start for c in flat)
                capacity = self.probe_requests * len(ok_calls) / len(flat) / span
            else:
                capacity = 1.0 / sum(idle.values())
            self._progress(
                "joint: idle "
                + ", ".join(f"{m} {v:.3f} s" for m, v in idle.items())
                + f"; probe {capacity:.2f} requests/s"
            )
            unbounded = replace(cfg, latency_bound=math.inf)
            rates: list[float] = []
            points: dict[str, list[RatePoint]] = {d.name: [] for d in self.llms}
            behind: dict[str, int] = dict.fromkeys(points, 0)
            stop = "rates"
            steps = list(self.rate_steps)
            i = 0
            repeated = False
            while i < len(steps):
                step = steps[i]
                elapsed = time.monotonic() - started
                if elapsed + cfg.warmup_s + 2 * cfg.window_s + cfg.drain_s > cfg.budget_s:
                    stop = "budget"
                    break
                lam = step * capacity
                step_points = await self._step(session, lam)
                marked = {
                    # falling behind only: a latency bound over the idle latency stops a sweep
                    # of short calls (a 1-token call idles at 0.02 s) at the first slow window
                    name: replace(point, saturated=saturated(point, idle[name], unbounded))
                    for name, point in step_points.items()
                }
                if any(p.saturated for p in marked.values()) and not repeated:
                    # a shared host stalls now and then: a step that falls behind is measured
                    # again at the same rate before it counts (the stalled window is dropped)
                    self._progress(f"joint: step {i + 1} fell behind; measuring it again")
                    repeated = True
                    continue
                rates.append(lam)
                for name, point in marked.items():
                    points[name].append(point)
                    behind[name] = behind[name] + 1 if point.saturated else 0
                self._progress(
                    f"joint: step {i + 1}/{len(self.rate_steps)} {lam:.2f} requests/s: "
                    + ", ".join(
                        f"{m} {p.rate:.1f}/s done {p.throughput:.1f}/s mean "
                        f"{p.mean_latency:.3f} s err {p.errors}"
                        for m, p in step_points.items()
                    )
                    + f" [{time.monotonic() - started:.0f}/{cfg.budget_s:.0f} s]"
                )
                # the repeat already confirmed this step: one more saturated step is enough
                done = [m for m, b in behind.items() if b >= max(1, cfg.confirm - 1)]
                if done:
                    stop = "saturated"
                    break
                i += 1
                repeated = False
        method = {
            "backend": "vllm-joint",
            "endpoint": self.base_url,
            "warmup_s": cfg.warmup_s,
            "window_s": cfg.window_s,
            "probe_requests": self.probe_requests,
            "probe_rate": capacity,
            "rate_steps": list(self.rate_steps),
            "order": "workflow" if self.requests else "independent",
            "seconds": round(time.monotonic() - started, 2),
            "measured_at": time.time(),
        }
        return JointMeasurement(
            self.llms, tuple(rates), {m: tuple(p) for m, p in points.items()}, idle, stop, method
        )
