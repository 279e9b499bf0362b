"""``scepsy validate``: the ALP's predictions against real engines behind the router.

    scepsy validate --workflow rag --router URL [--load 0.2,0.4,0.6,0.8 | --rates R,R,...]
                    [--requests N] [--profiles joint|measured|analytic] [--scale tiny|full]
                    [--joint-order workflow|independent] [--point-window S] [--repeats K]
                    [--pilot-rate R] [--pilot-requests N] [--pilot-precision 0.05]
                    [--pilot-max-requests 120] [--out DIR] [--json] [--redis-url URL]

For a deployment already serving (engines registered with ``scepsy endpoints add``, a router in
front of them; each LLM of the workflow is a model of the router under its deployment name):

1. a pilot run drives the workflow's program (``services.runtime.driver``) through the router at
   a light rate; its trace gives the workflow's demand (n_m, p_m, stages, tool time) and each
   LLM's request mix, as the planner would read them from the router's recorded trace. The
   pilot is a sample, and a profile measured at a sample's mix is off by the sample's error:
   after ``--pilot-requests`` it goes on until each LLM's mean prompt and completion tokens per
   request have a relative standard error of at most ``--pilot-precision`` (default 5 %), up to
   ``--pilot-max-requests`` (``pilot_size``). Twelve requests of tiny RAG gave the generator
   1.21x the workflow's mean completion length, and every profile inherited it;
2. each LLM's profile at that mix: ``joint`` (default) - every LLM of the workflow measured at
   once through the router at its share of the workflow's rate, its calls in groups whose sizes
   are drawn from the pilot trace's fan-outs (``services.profiler.joint``): by default the
   pilot's requests replayed wave by wave in the workflow's order, with ``--joint-order
   independent`` each LLM's groups Poisson on their own; ``measured`` - the
   profile stored under its key, else measured now on the LLM's first registered engine by the
   ``vllm`` profiler backend (and stored), through the router (``--profile-via router``,
   default: the hop every workflow call takes) or on the engine directly; ``analytic`` - the
   analytic backend with the device's committed parameters;
3. the ALP predicts the workflow's throughput T (the allocation: each LLM's registered replicas,
   TP 1, whole devices) and its latency at each rate: ``--load`` fractions of T (default light
   load to 80 %), or absolute ``--rates``;
4. the workflow runs at each rate (Poisson arrivals, ``--requests`` requests but no more than
   ``--seconds`` worth and at least 8, the first tenth warm-up), then once above capacity
   (1.5 T) to measure the throughput it really reaches. With joint profiles, right before each
   rate's run one more joint step at that rate (``--point-window`` s, default 10; 0: none)
   adds a point per LLM to the profiles: an operating point measured on the host as the run
   finds it. The latencies are predicted once every run is done, from the sweep's points and
   every operating step's, and also from the sweep's points only (printed beside them).
   ``--repeats K`` runs every rate K times, round robin over the rates (a rate's runs minutes
   apart, as a profile and a run are): the rows pool them, and the spread of their means is the
   measurement's own reproducibility;
5. it prints predicted against measured latency (mean) and throughput with the error, per LLM
   the call latency too, and writes ``validate.csv`` and ``validate.png`` (the plot needs
   matplotlib; without it only the CSV is written, and it says so) into ``--out``.

``--scale tiny`` (default) runs the workflow's structure with token lengths that fit the tiny CPU
test model (``driver.tiny_workflow``); ``full`` runs the evaluation workflow as defined.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.cli.store_args import add_store_flags, connect_store
from services.core.allocation import Allocation
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import resolve_model
from services.core.errors import InvalidInputError, NotFoundError
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile, ProfileKey
from services.core.planning.alp import Prediction, predict
from services.core.sim.program import Workflow
from services.core.sim.replay import ReplayRequest, TraceReplay
from services.core.sim.workflows import workflow as full_workflow
from services.core.workload.demand import WorkflowDemand
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.profiler.joint import JointLlm, JointMeasurement, JointSweep, fan_outs
from services.profiler.vllm_backend import SweepConfig, VllmBackend, stderr_progress
from services.runtime.driver import (
    DriveResult,
    WorkflowDriver,
    direct_session,
    latency_stats,
    tiny_workflow,
)
from services.runtime.store import Store

DEFAULT_LOADS = (0.2, 0.4, 0.6, 0.8)
PROFILE_SOURCES = ("joint", "measured", "analytic")
OVERLOAD = 1.5  # the capacity run offers this times the predicted throughput


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "validate", help="ALP predictions against real engines behind the router"
    )
    parser.add_argument("--workflow", required=True, help="rag, beam, composite, ...")
    parser.add_argument("--router", required=True, help="router base URL (http://host:port)")
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny", help="lengths")
    parser.add_argument("--gpu", default="cpu", help="device type of the engines (cpu)")
    parser.add_argument(
        "--profiles",
        choices=PROFILE_SOURCES,
        default="joint",
        help="where the ALP's profiles come from (joint: every LLM measured at once through "
        "the router at the workflow's shares and fan-outs; measured: each LLM alone by the "
        "vllm backend; analytic: the device's committed parameters)",
    )
    parser.add_argument(
        "--joint-order",
        choices=("workflow", "independent"),
        default="workflow",
        help="joint profiles: the pilot's requests replayed wave by wave in the workflow's order "
        "(workflow, default), or each LLM's call groups Poisson on their own (independent)",
    )
    parser.add_argument(
        "--point-window",
        type=float,
        default=10.0,
        help="joint profiles: before the workflow runs at a rate, one joint step at that rate "
        "with a window of this many s, added to the profiles (0: the sweep's points only)",
    )
    parser.add_argument("--load", help="rates as fractions of the predicted throughput")
    parser.add_argument("--rates", help="absolute rates, requests/s (instead of --load)")
    parser.add_argument("--requests", type=int, default=40, help="requests per rate (40)")
    parser.add_argument(
        "--seconds", type=float, default=90.0, help="at most this long per rate (>= 8 requests)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per rate, round robin over the rates; the spread of their means is printed "
        "(the measurement's reproducibility)",
    )
    parser.add_argument("--pilot-rate", type=float, default=0.3, help="pilot run, requests/s")
    parser.add_argument(
        "--pilot-requests", type=int, default=12, help="pilot run requests, at least"
    )
    parser.add_argument(
        "--pilot-precision",
        type=float,
        default=0.05,
        help="the pilot goes on until each LLM's mean tokens per request have at most this "
        "relative standard error (0.05)",
    )
    parser.add_argument(
        "--pilot-max-requests", type=int, default=120, help="pilot run requests, at most (120)"
    )
    parser.add_argument(
        "--capacity-requests", type=int, default=40, help="requests of the capacity run (0: none)"
    )
    parser.add_argument("--profile-budget", type=float, default=120.0, help="s per profile")
    parser.add_argument(
        "--profile-via",
        choices=("router", "engine"),
        default="router",
        help="measure profiles through the router (the hop the workflow's calls take) or on "
        "the LLM's first engine directly",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the programs' draws")
    parser.add_argument("--out", type=Path, help="directory for validate.csv / validate.png")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_store_flags(parser)
    parser.set_defaults(func=cmd_validate)


def _positive_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"{flag}: comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise InvalidInputError(f"{flag}: numbers > 0, got {text!r}")
    return sorted(values)


@dataclass(frozen=True, slots=True)
class RateRow:
    rate: float
    load: float  # rate / predicted throughput
    predicted_latency: float
    measured_latency: float
    p50: float
    p99: float
    predicted_throughput: float
    measured_throughput: float
    requests: int
    errors: int
    llm_predicted: dict[str, float]  # per-call latency
    llm_measured: dict[str, float]
    # the same with each side's robust statistic: profiles whose points are medians of
    # sub-window means, the run's median of 3 stretches' means (``DriveResult.window_latency``)
    predicted_window: float = math.nan
    measured_window: float = math.nan
    # predicted from the joint sweep's points only (no operating steps; NaN without them)
    sweep_latency: float = math.nan
    repeat_latencies: tuple[float, ...] = ()  # each repeat's mean latency (``--repeats``)

    @property
    def repeat_spread(self) -> float:
        """How far the repeats' means lie apart, % (largest over smallest - 1): the
        measurement's own reproducibility, a floor under any prediction's error. NaN for one."""
        values = [v for v in self.repeat_latencies if math.isfinite(v) and v > 0]
        if len(values) < 2:
            return math.nan
        return (max(values) / min(values) - 1) * 100

    @property
    def sweep_error(self) -> float:
        return _ape(self.sweep_latency, self.measured_latency)

    @property
    def window_error(self) -> float:
        return _ape(self.predicted_window, self.measured_window)

    @property
    def latency_error(self) -> float:
        return _ape(self.predicted_latency, self.measured_latency)

    @property
    def throughput_error(self) -> float:
        return _ape(self.predicted_throughput, self.measured_throughput)


def _ape(predicted: float, measured: float) -> float:
    if not (math.isfinite(predicted) and math.isfinite(measured) and measured > 0):
        return math.inf
    return abs(predicted / measured - 1) * 100


def _llm_latency(runs: list[DriveResult]) -> dict[str, float]:
    by_model: dict[str, list[float]] = {}
    for run in runs:
        for r in run.measured:
            for model, call in r.calls:
                if call.ok:
                    by_model.setdefault(model, []).append(call.latency)
    return {m: float(np.mean(v)) for m, v in sorted(by_model.items())}


class Validation:
    """One ``scepsy validate`` run (module docstring)."""

    def __init__(self, args: argparse.Namespace, store: Store) -> None:
        self.args = args
        self.store = store
        self.gpu = gpu_spec(args.gpu)
        self.workflow: Workflow = (
            tiny_workflow(args.workflow) if args.scale == "tiny" else full_workflow(args.workflow)
        )
        self.sources: dict[str, str] = {}
        self.allocation_source = ""
        self.joint: JointMeasurement | None = None
        self.sweep: JointSweep | None = None
        self.keys: dict[str, ProfileKey] = {}  # joint profiles' keys
        # what ran when (time.monotonic()): a benchmark lines them up with the host's load
        self.windows: list[dict[str, Any]] = []

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    async def replicas(self) -> dict[str, list[str]]:
        endpoints = await self.store.list_endpoints()
        found: dict[str, list[str]] = {}
        for e in endpoints:
            found.setdefault(e.model, []).append(e.url)
        missing = [m for m in self.workflow.models if m not in found]
        if missing:
            raise NotFoundError(
                f"router: no engines registered for {', '.join(missing)} (workflow "
                f"{self.workflow.name}); register them with `scepsy endpoints add MODEL URL`"
            )
        return {m: found[m] for m in self.workflow.models}

    async def allocation(self, urls: Mapping[str, list[str]]) -> dict[str, Allocation]:
        """The allocation the ALP predicts for: the current plan's entry of each LLM when the
        store has a current plan that allocates every LLM of the workflow (its replicas, TP and
        fraction: what the agents run), else each LLM's registered engines as whole devices."""
        plan = await self.store.get_current_plan()
        if plan is not None and all(m in plan.allocation for m in self.workflow.models):
            self.allocation_source = f"plan {plan.id}"
            return {m: plan.allocation[m] for m in self.workflow.models}
        self.allocation_source = "registered endpoints"
        return {m: Allocation(1.0, 1, len(urls[m])) for m in self.workflow.models}

    async def profile(self, name: str, mix: RequestMix, url: str) -> Profile:
        model = resolve_model(self.workflow.models[name])
        if self.args.profiles == "analytic":
            self.sources[name] = "analytic"
            return profile_analytic(model, self.gpu, 1, 1.0, mix, self.args.seed)
        via_router = self.args.profile_via == "router"
        backend = VllmBackend(
            endpoint=self.args.router if via_router else url,
            served_name=name if via_router else None,
            config=SweepConfig(budget_s=self.args.profile_budget),
            progress=stderr_progress,
        )
        key = ProfileKey(model.name, self.gpu.name, 1, 1.0, backend.engine, mix.id)
        stored = await self.store.get_profile(key)
        if stored is not None:
            self.sources[name] = f"stored {key.engine}"
            return stored
        self.log(f"measuring {name} ({model.name}) at {backend.endpoint}, mix {mix.id}")
        measured = await asyncio.to_thread(
            backend.measure, model, self.gpu, 1, 1.0, mix, self.args.seed
        )
        profile = measured.profile()
        await self.store.put_measured_profile(profile, measured.stored_points(), measured.method)
        self.sources[name] = f"measured {profile.key.engine}"
        return profile

    async def joint_profiles(
        self,
        stats: WorkflowStats,
        demand: WorkflowDemand,
        allocation: Mapping[str, Allocation],
        pilot: DriveResult,
    ) -> dict[str, Profile]:
        """Every LLM measured at once through the router at the workflow's shares and fan-outs
        (``services.profiler.joint``): each group's size drawn from the pilot trace's fan-outs
        of that LLM (``fan_outs``; ``round(p_m)`` for an LLM without any)."""
        sizes = fan_outs(pilot.trace().calls)
        llms = [
            JointLlm(
                d.model,
                RequestMix.from_samples(stats.llm(d.model).sample),
                d.n,
                max(1, round(d.p)),
                allocation[d.model].replicas,
                sizes.get(d.model, ()),
            )
            for d in demand.llms
        ]
        self.log(
            f"joint profile through the router ({self.args.joint_order} order): "
            + ", ".join(
                f"{j.name} n={j.calls:.2f} groups {_sizes_text(j)} x{j.replicas}" for j in llms
            )
        )
        requests: tuple[ReplayRequest, ...] = ()
        if self.args.joint_order == "workflow":
            names = {d.model: d.model for d in demand.llms}
            requests = TraceReplay.of(pilot.trace(), self.workflow.name, names).requests
        self.sweep = JointSweep(
            self.args.router,
            llms,
            SweepConfig(budget_s=self.args.profile_budget),
            seed=self.args.seed,
            progress=stderr_progress,
            requests=requests,
        )
        self.joint = await self.sweep.run()
        for j in llms:
            a = allocation[j.name]
            model = resolve_model(self.workflow.models[j.name]).name
            self.keys[j.name] = ProfileKey(
                model, self.gpu.name, a.tp, a.fraction, "vllm-joint", j.mix.id
            )
            self.sources[j.name] = (
                f"joint ({self.joint.stop_reason}, binding {self.joint.binding or '-'})"
            )
        return self.joint_curves()

    def joint_curves(self, *, robust: bool = False, operating: bool = True) -> dict[str, Profile]:
        """The joint measurement's profiles (``JointMeasurement.profile``)."""
        assert self.joint is not None
        return {
            name: self.joint.profile(name, key, robust=robust, operating=operating)
            for name, key in self.keys.items()
        }

    async def operating_step(self, rate: float) -> None:
        """One joint step at ``rate`` with ``--point-window``, added to the joint measurement:
        measured right before the workflow's run at that rate, on the same host state."""
        window = self.args.point_window
        if self.sweep is None or self.joint is None or not window > 0:
            return
        self.log(f"operating step: joint at {rate:.3f}/s, {window:g} s window")
        t0 = time.monotonic()
        step = await self.sweep.measure_at(rate, window, self.joint.idle)
        self.windows.append(
            {
                "kind": "operating",
                "rate": rate,
                "start": t0,
                "end": time.monotonic(),
                "llm_latency": {m: p.mean_latency for m, p in step.items()},
            }
        )
        self.log(
            "operating step: "
            + ", ".join(
                f"{m} {p.rate:.1f}/s done {p.throughput:.1f}/s mean {p.mean_latency:.3f} s"
                + (" (behind: not used)" if p.saturated else "")
                for m, p in step.items()
            )
        )
        self.joint = self.joint.with_operating(step)

    def predict_at(
        self,
        demand: WorkflowDemand,
        profiles: Mapping[str, Profile],
        allocation: Mapping[str, Allocation],
        rate: float,
    ) -> Prediction:
        return predict(
            [demand],
            lambda model, tp, fraction: profiles[model],
            {m: allocation[m] for m in profiles},
            {demand.name: rate},
        )

    async def pilot(self, driver: WorkflowDriver) -> DriveResult:
        """The pilot run (module docstring, step 1)."""
        a = self.args
        return await run_pilot(
            driver,
            a.pilot_rate,
            a.pilot_requests,
            a.pilot_precision,
            a.pilot_max_requests,
            a.seed + 1,
            self.log,
        )

    async def run(self) -> dict[str, Any]:
        args = self.args
        started = time.monotonic()
        urls = await self.replicas()
        async with direct_session() as session:
            driver = WorkflowDriver(args.router, self.workflow, session, store=self.store)
            pilot = await self.pilot(driver)
            stats = _stats_of(pilot, self.workflow.name)
            demand = WorkflowDemand.from_stats(stats)
            allocation = await self.allocation(urls)
            profiles: dict[str, Profile] = {}
            if args.profiles == "joint":
                profiles = await self.joint_profiles(stats, demand, allocation, pilot)
            else:
                for d in demand.llms:
                    mix = RequestMix.from_samples(stats.llm(d.model).sample)
                    profiles[d.model] = await self.profile(d.model, mix, urls[d.model][0])
            replicas = {m: allocation[m].replicas for m in profiles}
            capacity = self.predict_at(demand, profiles, allocation, 1e-6).workflows[0].throughput
            if args.rates:
                rates = _positive_list("--rates", args.rates)
            else:
                loads = _positive_list("--load", args.load) if args.load else list(DEFAULT_LOADS)
                rates = [f * capacity for f in loads]
            repeats = args.repeats
            runs: list[list[DriveResult]] = [[] for _ in rates]
            for k in range(repeats):  # round robin: a repeat comes minutes after the last one
                for i, rate in enumerate(rates):
                    await self.operating_step(rate)
                    count = min(args.requests, max(8, round(rate * args.seconds)))
                    self.log(
                        f"rate {i + 1}/{len(rates)}"
                        + (f" (repeat {k + 1}/{repeats})" if repeats > 1 else "")
                        + f": {count} requests at {rate:.3f}/s"
                    )
                    seed = args.seed + 10 + i + 1000 * k
                    t0 = time.monotonic()
                    run = await driver.run(rate, count, seed=seed, warmup=count // 10)
                    runs[i].append(run)
                    self.windows.append(
                        {
                            "kind": "run",
                            "rate": rate,
                            "repeat": k,
                            "start": t0,
                            "end": time.monotonic(),
                            "latency": run.latency_stats()["mean"],
                            "llm_latency": _llm_latency([run]),
                        }
                    )
            # predictions once every operating step is in: each one refines the curves
            # the others' rates read (the monotone fit pools across them)
            robust_profiles, sweep_profiles = profiles, {}
            if self.joint is not None:
                profiles = self.joint_curves()
                robust_profiles = self.joint_curves(robust=True)
                if self.joint.operating:
                    sweep_profiles = self.joint_curves(operating=False)
            rows: list[RateRow] = []
            for rate, repeated in zip(rates, runs, strict=True):
                prediction = self.predict_at(demand, profiles, allocation, rate)
                robust = self.predict_at(demand, robust_profiles, allocation, rate)
                sweep_only = (
                    self.predict_at(demand, sweep_profiles, allocation, rate).workflows[0].latency
                    if sweep_profiles
                    else math.nan
                )
                stats_ = latency_stats([x for run in repeated for x in run.latencies])
                rows.append(
                    RateRow(
                        rate=rate,
                        load=rate / capacity,
                        predicted_latency=prediction.workflows[0].latency,
                        measured_latency=stats_["mean"],
                        p50=stats_["p50"],
                        p99=stats_["p99"],
                        predicted_throughput=min(rate, capacity),
                        measured_throughput=float(np.mean([r.throughput() for r in repeated])),
                        requests=sum(len(r.measured) for r in repeated),
                        errors=sum(r.errors for r in repeated),
                        llm_predicted={m.model: m.call_latency for m in prediction.llms},
                        llm_measured=_llm_latency(repeated),
                        predicted_window=robust.workflows[0].latency,
                        measured_window=float(np.median([r.window_latency() for r in repeated])),
                        sweep_latency=sweep_only,
                        repeat_latencies=tuple(r.latency_stats()["mean"] for r in repeated),
                    )
                )
            measured_capacity = math.nan
            if args.capacity_requests > 0:
                rate = OVERLOAD * capacity
                self.log(f"capacity: {args.capacity_requests} requests at {rate:.3f}/s")
                run = await driver.run(rate, args.capacity_requests, seed=args.seed + 999, warmup=0)
                measured_capacity = run.saturated_throughput()
        return {
            "workflow": self.workflow.name,
            "scale": args.scale,
            "device": self.gpu.name,
            "profiles": self.sources,
            "replicas": replicas,
            "allocation_source": self.allocation_source,
            "pilot_requests": len(pilot.requests),
            "demand": {
                "llms": {d.model: {"n": d.n, "p": d.p} for d in demand.llms},
                "stages": [list(s) for s in demand.stages],
                "tool_time_s": demand.tool_time,
            },
            "predicted_throughput": capacity,
            "measured_throughput": measured_capacity,
            "throughput_error": _ape(capacity, measured_capacity),
            "rows": rows,
            "joint": self.joint.to_dict() if self.joint is not None else None,
            "windows": self.windows,
            "seconds": round(time.monotonic() - started, 1),
        }


def _sizes_text(llm: JointLlm) -> str:
    """``4-8 (mean 6.2)`` for drawn group sizes, ``of 6`` for a fixed group."""
    if not llm.sizes:
        return f"of {llm.group}"
    lo, hi = min(llm.sizes), max(llm.sizes)
    span = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"{span} (mean {llm.mean_group:.2f})"


async def run_pilot(
    driver: WorkflowDriver,
    rate: float,
    first: int,
    precision: float,
    most: int,
    seed: int,
    log: Callable[[str], None],
) -> DriveResult:
    """``first`` requests at ``rate``, then as many more as ``pilot_size`` asks for at
    ``precision``, up to ``most`` in all; one run of them all."""
    log(f"pilot: {first} requests at {rate:g}/s")
    run = await driver.run(rate, first, seed=seed)
    needed = min(most, pilot_size(run, precision))
    if needed > len(run.requests):
        more = needed - len(run.requests)
        log(f"pilot: {more} more, for a {precision:.0%} standard error of each LLM's tokens")
        extra = await driver.run(rate, more, seed=seed + 1)
        run = DriveResult(run.workflow, run.rate, run.requests + extra.requests)
    return run


def pilot_size(run: DriveResult, precision: float) -> int:
    """The requests a pilot needs so that each LLM's mean prompt tokens and mean completion
    tokens per request have a relative standard error of at most ``precision``:
    ``ceil((cv / precision)^2)`` for the largest coefficient of variation among them over the
    run's ok requests. Per request, so that the calls' count (n_m: beam's rounds) varies too; a
    request without a call to the LLM counts 0. With fewer than two ok requests: their number
    (nothing to estimate from)."""
    ok = [r for r in run.measured if r.status == "ok"]
    if len(ok) < 2:
        return len(ok)
    models = sorted({m for r in ok for m, _ in r.calls})
    worst = 0.0
    for model in models:
        per_request = [[c for m, c in r.calls if m == model and c.ok] for r in ok]
        for field in ("prompt_tokens", "completion_tokens"):
            totals = np.array([sum(getattr(c, field) for c in calls) for calls in per_request])
            mean = float(totals.mean())
            if mean > 0:
                worst = max(worst, float(totals.std(ddof=1)) / mean)
    return max(len(ok), math.ceil((worst / precision) ** 2))


def _stats_of(run: DriveResult, name: str) -> WorkflowStats:
    for stats in workflow_stats(run.trace()):
        if stats.workflow == name:
            if stats.requests == 0:
                break
            return stats
    raise InvalidInputError(
        f"pilot: no request of {name} succeeded ({run.errors} failed); is the router serving?"
    )


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.median(finite)) if finite else math.nan


def summary(result: Mapping[str, Any]) -> dict[str, float]:
    rows: list[RateRow] = result["rows"]
    return {
        "median_latency_error": _median([r.latency_error for r in rows]),
        "median_window_latency_error": _median([r.window_error for r in rows]),
        "median_sweep_latency_error": _median([r.sweep_error for r in rows]),
        "median_repeat_spread": _median([r.repeat_spread for r in rows]),
        "median_throughput_error": _median([r.throughput_error for r in rows]),
        "capacity_error": result["throughput_error"],
    }


def format_result(result: Mapping[str, Any]) -> str:
    rows: list[RateRow] = result["rows"]
    demand = result["demand"]
    lines = [
        f"workflow {result['workflow']} ({result['scale']}) on {result['device']}: replicas "
        + ", ".join(f"{m} x{r}" for m, r in result["replicas"].items())
        + f" ({result.get('allocation_source', '')}); profiles "
        + ", ".join(f"{m}: {s}" for m, s in result["profiles"].items()),
        f"demand (pilot trace, {result['pilot_requests']} requests): "
        + ", ".join(f"{m} n={v['n']:.2f} p={v['p']:.2f}" for m, v in demand["llms"].items())
        + f", stages {demand['stages']}, tool {demand['tool_time_s']:.3f} s",
        f"  {'rate/s':>7} {'load':>5} {'pred s':>7} {'meas s':>7} {'err %':>6} {'p50 s':>6} "
        f"{'p99 s':>6} {'pred/s':>7} {'meas/s':>7} {'err %':>6} {'errors':>7}",
    ]
    for r in rows:
        lines.append(
            f"  {r.rate:7.3f} {r.load:5.2f} {r.predicted_latency:7.3f} {r.measured_latency:7.3f} "
            f"{r.latency_error:6.1f} {r.p50:6.3f} {r.p99:6.3f} {r.predicted_throughput:7.3f} "
            f"{r.measured_throughput:7.3f} {r.throughput_error:6.1f} {r.errors:3d}/{r.requests}"
        )
    lines.append("  medians of window means (robust to a stall), predicted / measured (s):")
    for r in rows:
        lines.append(
            f"    rate {r.rate:.3f}: {r.predicted_window:.3f} / {r.measured_window:.3f} "
            f"(error {r.window_error:.1f}%)"
        )
    if any(math.isfinite(r.sweep_latency) for r in rows):
        lines.append(
            "  predicted from the sweep's points only (no operating steps) / measured (s):"
        )
        for r in rows:
            lines.append(
                f"    rate {r.rate:.3f}: {r.sweep_latency:.3f} / {r.measured_latency:.3f} "
                f"(error {r.sweep_error:.1f}%)"
            )
    if any(len(r.repeat_latencies) > 1 for r in rows):
        lines.append("  each repeat's mean latency (s), and how far they lie apart:")
        for r in rows:
            means = ", ".join(f"{v:.3f}" for v in r.repeat_latencies)
            lines.append(f"    rate {r.rate:.3f}: {means} (spread {r.repeat_spread:.1f}%)")
    lines.append("  per-LLM call latency, predicted / measured (s):")
    for r in rows:
        parts = [
            f"{m} {r.llm_predicted.get(m, math.nan):.3f}/{r.llm_measured.get(m, math.nan):.3f}"
            for m in sorted(set(r.llm_predicted) | set(r.llm_measured))
        ]
        lines.append(f"    rate {r.rate:.3f}: " + ", ".join(parts))
    s = summary(result)
    lines.append(
        f"throughput (capacity): predicted {result['predicted_throughput']:.3f}/s, measured "
        f"{result['measured_throughput']:.3f}/s, error {s['capacity_error']:.1f}%"
    )
    sweep = (
        f", sweep's points only: {s['median_sweep_latency_error']:.1f}%"
        if math.isfinite(s["median_sweep_latency_error"])
        else ""
    )
    lines.append(
        f"median error: latency {s['median_latency_error']:.1f}% (medians of window means: "
        f"{s['median_window_latency_error']:.1f}%{sweep}), throughput "
        f"{s['median_throughput_error']:.1f}% ({result['seconds']:.0f} s)"
    )
    if math.isfinite(s["median_repeat_spread"]):
        lines.append(f"median spread of the repeats: {s['median_repeat_spread']:.1f}%")
    return "\n".join(lines)


def result_json(result: Mapping[str, Any]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, RateRow):
            return clean(
                {
                    **{f: getattr(value, f) for f in RateRow.__slots__},
                    "latency_error": value.latency_error,
                    "throughput_error": value.throughput_error,
                    "sweep_error": value.sweep_error,
                    "repeat_spread": value.repeat_spread,
                }
            )
        return value

    out: dict[str, Any] = clean(dict(result))
    out.update(clean(summary(result)))
    return out


def write_outputs(result: Mapping[str, Any], out: Path) -> list[str]:
    """``validate.csv`` always; ``validate.png`` when matplotlib is installed. Returns notes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"--out: cannot create {str(out)!r}: {exc}") from None
    rows: list[RateRow] = result["rows"]
    notes = []
    with (out / "validate.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "rate", "load", "predicted_latency_s", "measured_latency_s", "latency_error_pct",
                "p50_s", "p99_s", "predicted_throughput", "measured_throughput",
                "throughput_error_pct", "requests", "errors", "sweep_latency_s",
            ]
        )  # fmt: skip
        for r in rows:
            writer.writerow(
                [
                    f"{r.rate:.5g}", f"{r.load:.4g}", f"{r.predicted_latency:.5g}",
                    f"{r.measured_latency:.5g}", f"{r.latency_error:.4g}", f"{r.p50:.5g}",
                    f"{r.p99:.5g}", f"{r.predicted_throughput:.5g}",
                    f"{r.measured_throughput:.5g}", f"{r.throughput_error:.4g}", r.requests,
                    r.errors, f"{r.sweep_latency:.5g}",
                ]
            )  # fmt: skip
    notes.append(f"wrote {out / 'validate.csv'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("matplotlib is not installed: no plot, only the CSV")
        return notes
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [r.rate for r in rows]
    ax1.plot(rates, [r.predicted_latency for r in rows], "o-", label="ALP predicted")
    ax1.errorbar(
        rates,
        [r.measured_latency for r in rows],
        yerr=[
            [max(r.measured_latency - r.p50, 0) for r in rows],
            [max(r.p99 - r.measured_latency, 0) for r in rows],
        ],
        fmt="s--",
        label="measured (mean; p50-p99)",
    )
    ax1.set_xlabel("requests/s")
    ax1.set_ylabel("workflow latency, s")
    ax1.legend()
    ax2.plot(rates, [r.predicted_throughput for r in rows], "o-", label="ALP predicted")
    ax2.plot(rates, [r.measured_throughput for r in rows], "s--", label="measured")
    capacity = result["predicted_throughput"]
    ax2.axhline(capacity, color="gray", linestyle=":", label=f"predicted capacity {capacity:.2f}")
    measured = result["measured_throughput"]
    if math.isfinite(measured):
        ax2.axhline(measured, color="red", linestyle=":", label=f"measured capacity {measured:.2f}")
    ax2.set_xlabel("offered requests/s")
    ax2.set_ylabel("throughput, requests/s")
    ax2.legend()
    fig.suptitle(f"{result['workflow']} on {result['device']}: ALP vs real engines")
    fig.tight_layout()
    fig.savefig(out / "validate.png", dpi=100)
    plt.close(fig)
    notes.append(f"wrote {out / 'validate.png'}")
    return notes


def check_args(args: argparse.Namespace) -> None:
    if args.rates and args.load:
        raise InvalidInputError("--rates: give --rates or --load, not both")
    if args.rates:
        _positive_list("--rates", args.rates)
    if args.load:
        _positive_list("--load", args.load)
    if args.requests < 2:
        raise InvalidInputError(f"--requests: must be >= 2, got {args.requests}")
    if not args.seconds > 0:
        raise InvalidInputError(f"--seconds: must be > 0, got {args.seconds}")
    if args.repeats < 1:
        raise InvalidInputError(f"--repeats: must be >= 1, got {args.repeats}")
    if args.pilot_requests < 1:
        raise InvalidInputError(f"--pilot-requests: must be >= 1, got {args.pilot_requests}")
    if not args.pilot_rate > 0:
        raise InvalidInputError(f"--pilot-rate: must be > 0, got {args.pilot_rate}")
    if not (args.pilot_precision > 0 and math.isfinite(args.pilot_precision)):
        raise InvalidInputError(f"--pilot-precision: must be > 0, got {args.pilot_precision}")
    if args.pilot_max_requests < 1:
        raise InvalidInputError(
            f"--pilot-max-requests: must be >= 1, got {args.pilot_max_requests}"
        )
    window = args.point_window
    if not (window >= 0 and math.isfinite(window)):
        raise InvalidInputError(f"--point-window: must be >= 0 s, got {window}")
    if args.capacity_requests < 0:
        raise InvalidInputError(f"--capacity-requests: must be >= 0, got {args.capacity_requests}")
    if not args.router.startswith(("http://", "https://")):
        raise InvalidInputError(f"--router: an http(s) base URL, got {args.router!r}")


def cmd_validate(args: argparse.Namespace) -> int:
    check_args(args)

    async def main() -> dict[str, Any]:
        store = connect_store(args)
        try:
            return await Validation(args, store).run()
        finally:
            await store.close()

    result = asyncio.run(main())
    notes = write_outputs(result, args.out) if args.out is not None else []
    if args.json:
        print(json.dumps(result_json(result)))
    else:
        print(format_result(result))
    for note in notes:
        print(note, file=sys.stderr if args.json else sys.stdout)
    return 0
