"""The head-to-head evaluation: every system on the same workflows, GPUs, arrivals and seeds.

For each workflow (``run_bench``, settings in ``results.BenchSettings``):

1. ``systems.Context.prepare``: a traced warm-up run, its statistics, the profiles;
2. for each GPU count, the rate grid: ``rate_fractions`` of the ALP's highest throughput on those
   GPUs. At every grid rate each system plans (``systems.SYSTEMS``) and serves the same Poisson
   arrivals (``runs.Load``: same seed, so the same requests) in the simulator; its measured
   points form its throughput-latency curve. A system stops climbing after ``stop_after``
   unsustainable points in a row; while some system still sustains the top rate, the grid grows
   by ``extend_factor`` (at most ``max_extra_rates`` times). Then each system's peak is refined
   by ``refine_steps`` bisections between its highest sustainable rate and the next rate it did
   not sustain (points of its own; two systems that bisect to the same rate serve the same
   arrivals there, as on the grid);
3. the ALP against the simulator: Scepsy's predicted latency at each of its sustainable points
   planned for their own rate, and the throughput check (``checks.check_throughput``);
4. the oracle on ``oracle_gpus`` GPUs (``checks.run_oracle``);
5. stability: per-LLM time shares against end-to-end latency CV, in the warm-up trace and in a
   loaded run (Scepsy at its highest sustainable rate on the most GPUs).

Everything is deterministic for a ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from services.core.sim import checks
from services.core.sim.measure import Point
from services.core.sim.program import Workflow
from services.core.sim.results import (
    AlpCheck,
    BenchResult,
    BenchSettings,
    Curve,
    GpuResult,
    Stability,
    WorkflowResult,
)
from services.core.sim.runs import Counter, Load, load_at, run_point
from services.core.sim.systems import SYSTEMS, Context, Setup, autoscaler_plan

Progress = Callable[[str], None]
SEED_GRID = 7  # grid rate i uses seed + SEED_GRID * i
SEED_REFINE = 1000


def run_bench(
    workflows: Sequence[Workflow], settings: BenchSettings, progress: Progress | None = None
) -> BenchResult:
    """Evaluate every system on every workflow (module docstring)."""
    say = progress or (lambda _: None)
    return BenchResult(settings, tuple(evaluate_workflow(w, settings, say) for w in workflows))


def evaluate_workflow(wf: Workflow, settings: BenchSettings, say: Progress) -> WorkflowResult:
    ctx = Context.prepare(
        wf,
        settings.gpu_type,
        settings.prepare_gpus or min(settings.gpu_counts),
        **settings.warmup(),
        fraction_unit=settings.fraction_unit,
        rho=settings.rho,
        options=replace(settings.options, seed=settings.seed),
    )
    ctx = replace(ctx, refine=settings.refine)
    say(
        f"{wf.name}: warm-up traced ({len(ctx.warmup.requests)} requests), isolated request "
        f"latency {ctx.isolated_latency:.2f} s"
    )
    counter = Counter()
    results = tuple(
        evaluate_gpus(ctx, g, settings, say, counter) for g in sorted(set(settings.gpu_counts))
    )
    stability: list[Stability] = [checks.stability_of(ctx.stats, "warm-up, low load")]
    last = results[-1]
    loaded = checks.loaded_stats(ctx, last.gpus, last.curve("scepsy").points, settings, counter)
    if loaded is not None:
        stability.append(checks.stability_of(loaded, f"scepsy at its peak, {last.gpus} GPUs"))
    return WorkflowResult(
        workflow=wf.name,
        models=dict(sorted(wf.models.items())),
        calls_per_request={m.model: m.n for m in ctx.stats.llms},
        concurrency={m.model: m.p for m in ctx.stats.llms},
        isolated_latency=ctx.isolated_latency,
        gpus=results,
        stability=tuple(stability),
        calls=counter.calls,
    )


def evaluate_gpus(
    ctx: Context, gpus: int, settings: BenchSettings, say: Progress, counter: Counter
) -> GpuResult:
    capacity = ctx.capacity(gpus)
    loads, curves = climb(ctx, gpus, capacity, settings, say, counter)
    scepsy = curves["scepsy"]
    alp_latency = tuple(
        AlpCheck(p.rate, p.allocation, p.predicted_latency, p.mean_latency)
        for p in scepsy
        if p.sustainable and p.predicted_latency is not None and math.isfinite(p.predicted_latency)
    )
    alp_refined = tuple(
        AlpCheck(p.rate, p.allocation, p.refined_latency, p.mean_latency)
        for p in scepsy
        if p.sustainable and p.refined_latency is not None
    )
    oracle = None
    if gpus == settings.oracle_gpus:
        oracle = checks.run_oracle(ctx, gpus, scepsy, loads, settings, say, counter)
    return GpuResult(
        gpus=gpus,
        capacity=capacity,
        curves=tuple(Curve(s, tuple(curves[s])) for s in settings.systems),
        alp_latency=alp_latency,
        alp_throughput=checks.check_throughput(ctx, gpus, capacity, settings, counter),
        oracle=oracle,
        alp_refined=alp_refined,
    )


def planner(name: str, settings: BenchSettings) -> Callable[[Context, int, float], Setup]:
    """The plan function of system ``name`` (the autoscaler with the settings' parameters)."""
    return autoscaler_plan(settings.autoscaler) if name == "autoscaler" else SYSTEMS[name]


def climb(
    ctx: Context,
    gpus: int,
    capacity: float,
    settings: BenchSettings,
    say: Progress,
    counter: Counter,
) -> tuple[dict[float, Load], dict[str, list[Point]]]:
    """The grid's loads by rate and every system's points, by rate (module docstring, step 2)."""
    rates = [capacity * f for f in sorted(settings.rate_fractions)]
    loads: dict[float, Load] = {}
    curves: dict[str, list[Point]] = {s: [] for s in settings.systems}
    failures = dict.fromkeys(settings.systems, 0)
    index = 0
    while index < len(rates) and min(failures.values()) < settings.stop_after:
        rate = rates[index]
        loads[rate] = load_at(ctx, rate, SEED_GRID * index, settings)
        for system in settings.systems:
            if failures[system] >= settings.stop_after:
                continue
            plan = planner(system, settings)(ctx, gpus, rate)
            point = run_point(ctx, plan, loads[rate], gpus, settings, counter)
            curves[system].append(point)
            failures[system] = 0 if point.sustainable else failures[system] + 1
        say(_progress_line(ctx.workflow.name, gpus, rate, curves))
        index += 1
        top = any(c and c[-1].sustainable and c[-1].rate == rate for c in curves.values())
        if (
            index == len(rates)
            and top
            and len(rates) - len(settings.rate_fractions) < (settings.max_extra_rates)
        ):
            rates.append(rate * settings.extend_factor)
    everywhere = dict(loads)  # the grid's loads and the bisections' (the oracle uses the grid's)
    for system in settings.systems:
        refine(ctx, gpus, system, curves[system], everywhere, settings, counter)
    return loads, {s: sorted(c, key=lambda p: p.rate) for s, c in curves.items()}


def refine(
    ctx: Context,
    gpus: int,
    system: str,
    points: list[Point],
    loads: dict[float, Load],
    settings: BenchSettings,
    counter: Counter,
) -> None:
    """Bisect between the highest sustainable rate and the next higher rate (module
    docstring); the new points are appended to ``points``. A rate another system was already
    run at gets that run's load (the same arrivals: two systems at one rate serve the same
    requests, as on the grid), a new rate a new load, kept in ``loads``."""
    for _ in range(settings.refine_steps):
        ordered = sorted(points, key=lambda p: p.rate)
        good = [i for i, p in enumerate(ordered) if p.sustainable]
        if not good or good[-1] + 1 >= len(ordered):
            return
        rate = (ordered[good[-1]].rate + ordered[good[-1] + 1].rate) / 2
        plan = planner(system, settings)(ctx, gpus, rate)
        load = loads.get(rate)
        if load is None:
            load = loads[rate] = load_at(ctx, rate, SEED_REFINE + len(loads), settings)
        points.append(run_point(ctx, plan, load, gpus, settings, counter))


def _progress_line(workflow: str, gpus: int, rate: float, curves: dict[str, list[Point]]) -> str:
    cells = [
        f"{s} {c[-1].mean_latency:.2f}s{'' if c[-1].sustainable else ' (unsustainable)'}"
        for s, c in curves.items()
        if c and c[-1].rate == rate
    ]
    return f"{workflow} {gpus} GPUs @ {rate:.3g} req/s: " + ", ".join(cells)
