"""The compared systems as planners: what each one deploys for a workflow, GPUs and target rate.

``Context.prepare`` does what every system may know before serving: a warm-up run of the workflow
in the simulator (the static even split, requests far enough apart that they rarely overlap) is
traced, and the trace gives the workflow statistics (``services.core.workload.stats``), the ALP
demand and
each LLM's request mix; the profiles of every (model, TP, fraction) are computed from those mixes
on demand and kept (``services.core.planning.profiles``, analytic).

Systems (``SYSTEMS``), each ``plan(context, gpus, rate) -> Setup``:

- ``scepsy`` - the one plan path (``services.core.planning.plan.make_plan``: the ALP search
  with placement feedback) for the target rate, its best closed-form candidates refined by
  simulating them on a replay of the warm-up trace (``services.core.planning.refine``,
  ``services.core.sim.replay``: what Scepsy knows is the trace, not the workflow's program;
  ``Context.refine`` None turns it off); above the highest
  rate it can plan (throughput >= rate / rho), the plan for that highest rate (its
  maximum-throughput allocation);
- ``static`` - ``baselines.even_split``;
- ``independent`` - ``baselines.independent`` at the target's per-LLM call rates;
- ``autoscaler`` - starts from the even split, then ``baselines.HpaAutoscaler`` moves whole GPUs;
  unless given, each model's target is tuned from its profile (``hpa_targets``), as an operator
  would set it from a benchmark of one engine;
- ``shares`` / ``shares-frac`` - ``baselines.time_shares``: GPUs in proportion to each LLM's
  share of the warm-up trace's LLM time (its calls' summed durations per request), whole GPUs
  or fractions of 1/k (a hand-made allocation from a trace);
- ``scepsy-closed`` - ablation: Scepsy with the closed-form ALP only (no refinement);
- ``scepsy-whole`` - ablation: Scepsy without GPU fractions (k = 1);
- ``scepsy-blind`` - ablation: Scepsy without workflow awareness, the same search sizing every
  LLM for its own calls as if each were alone (no fan-out, stages or tool time).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.cluster.hardware import GpuSpec, gpu_spec
from services.core.cluster.inventory import NodeInventory
from services.core.cluster.models import ModelSpec, model_spec
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.model import PerfModel
from services.core.planning.alp import Prediction, predict
from services.core.planning.plan import PlanInputs, make_plan
from services.core.planning.profiles import SpecProfiles
from services.core.planning.refine import Refiner, Scored
from services.core.planning.search import AllocationInfeasible, best_scale
from services.core.planning.space import Problem, max_tp_of
from services.core.sim import baselines
from services.core.sim.control import Controller
from services.core.sim.program import Workflow
from services.core.sim.replay import TraceReplay
from services.core.sim.scoring import RefineSettings, ReplayScorer, spread_requests
from services.core.sim.simulator import Deployment, SimOptions, SimResult, simulate
from services.core.sim.workflows import Mix
from services.core.workload.demand import LlmDemand, WorkflowDemand
from services.core.workload.spec import DEFAULT_FRACTION_UNIT, DEFAULT_RHO, Spec, WorkflowTarget
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import Trace

NODE_GPUS = 8  # GPUs per node (one NVSwitch domain) of the simulated clusters
PROBE_REQUESTS = 5


@dataclass(frozen=True, slots=True)
class Setup:
    """What a system deploys: an allocation, maybe a controller, maybe the ALP's prediction."""

    system: str
    allocation: dict[str, Allocation]
    controller: Controller | None = None
    prediction: Prediction | None = None  # at the offered rate
    planned_rate: float | None = None  # the rate the plan was made for, when not the offered one
    simulated_latency: float | None = None  # the refinement's (replayed trace) at the target


def cluster_nodes(gpu_type: str, gpus: int) -> tuple[NodeInventory, ...]:
    """A cluster of ``gpus`` GPUs in nodes of up to ``NODE_GPUS``, one NVSwitch domain each."""
    full, rest = divmod(gpus, NODE_GPUS)
    nodes: list[dict[str, object]] = []
    if full:
        nodes.append({"name": "node", "gpu_type": gpu_type, "gpus": NODE_GPUS, "count": full})
    if rest:
        nodes.append({"name": "part", "gpu_type": gpu_type, "gpus": rest})
    for node in nodes:
        node["interconnect"] = "nvswitch"
    return parse_cluster({"version": 1, "nodes": nodes}, source="simulated cluster")


@dataclass
class Context:
    """A workflow's planning inputs on one GPU type (mutable: profiles are computed lazily)."""

    workflow: Workflow
    gpu: GpuSpec
    models: dict[str, ModelSpec]
    stats: WorkflowStats
    warmup: Trace
    isolated_latency: float  # s, mean latency of a request served alone (warm-up probe)
    profiles: SpecProfiles
    fraction_unit: int = DEFAULT_FRACTION_UNIT
    rho: float = DEFAULT_RHO
    options: SimOptions = field(default_factory=SimOptions)
    refine: RefineSettings | None = field(default_factory=RefineSettings)
    _scorer: ReplayScorer | None = field(default=None, repr=False)
    _spread: dict[float, int] = field(default_factory=dict, repr=False)
    _tagged: Trace | None = field(default=None, repr=False)  # ``parts_trace``, once

    @classmethod
    def prepare(
        cls,
        workflow: Workflow,
        gpu_type: str,
        gpus: int,
        *,
        warmup_requests: int = 200,
        warmup_error: float | None = None,
        warmup_max: int = 8_000,
        fraction_unit: int = DEFAULT_FRACTION_UNIT,
        rho: float = DEFAULT_RHO,
        options: SimOptions | None = None,
    ) -> Context:
        """Trace a warm-up run on the even split of ``gpus`` GPUs and derive the statistics.

        With ``warmup_error``, a first trace of ``warmup_requests`` sizes the real one: as many
        requests as ``warmup_needed`` says for that relative error of the mean LLM time per
        request (at least ``warmup_requests``, at most ``warmup_max``)."""
        opts = options or SimOptions()
        gpu = gpu_spec(gpu_type)
        models = {m: model_spec(c) for m, c in sorted(workflow.models.items())}
        trace, alone = warmup_trace(workflow, gpu, models, gpus, warmup_requests, opts)
        if warmup_error is not None:
            needed = min(warmup_needed(trace, workflow.name, warmup_error), warmup_max)
            if needed > warmup_requests:
                trace, alone = warmup_trace(workflow, gpu, models, gpus, needed, opts)
        stats = next(s for s in workflow_stats(trace) if s.workflow == workflow.name)
        tagged: Trace | None = None
        part_stats: dict[str, WorkflowStats] = {}
        if isinstance(workflow, Mix):  # each part's statistics from its requests
            tagged = tag_parts(trace, workflow, warmup_seed(opts))
            part_stats = {s.workflow: s for s in workflow_stats(tagged)}
        targets = []
        for part, share in _parts(workflow):
            found = part_stats[part] if tagged is not None else stats
            samples = {m.model: m.sample for m in found.llms if m.n > 0}
            demand = WorkflowDemand.from_stats(found)
            targets.append(WorkflowTarget(part, share, share, demand, samples))
        spec = Spec(tuple(targets), models, cluster_nodes(gpu_type, gpus), fraction_unit, rho)
        profiles = SpecProfiles(spec)
        ctx = cls(workflow, gpu, models, stats, trace, alone, profiles, fraction_unit, rho, opts)
        ctx._tagged = tagged
        return ctx

    @property
    def demand(self) -> WorkflowDemand:
        """The demand of the first (for a plain workflow the only) workflow served."""
        return self.profiles.spec.workflows[0].demand

    @property
    def demands(self) -> tuple[WorkflowDemand, ...]:
        return tuple(w.demand for w in self.profiles.spec.workflows)

    @property
    def shares(self) -> dict[str, float]:
        """Share of the requests per workflow served (``Mix`` parts; else 1.0 for the one)."""
        return {w.name: w.rate for w in self.profiles.spec.workflows}

    def rates(self, rate: float) -> dict[str, float]:
        """Per workflow served, its rate when the whole arrives at ``rate`` requests/s."""
        return {name: rate * share for name, share in self.shares.items()}

    def loads(self, rate: float) -> dict[str, float]:
        """Calls/s per LLM at ``rate`` requests/s of the whole."""
        rates = self.rates(rate)
        loads: dict[str, float] = {}
        for d in self.demands:
            for m in d.llms:
                loads[m.model] = loads.get(m.model, 0.0) + rates[d.name] * m.n
        return loads

    @property
    def calls_per_request(self) -> float:
        return sum(self.loads(1.0).values())

    def latency_of(self, prediction: Prediction) -> float:
        """Predicted mean request latency of the whole: the workflows' by share."""
        return sum(share * prediction.workflow(w).latency for w, share in self.shares.items())

    def throughput_of(self, prediction: Prediction) -> float:
        """Predicted throughput of the whole (requests/s at the mix)."""
        return sum(prediction.workflow(w).throughput for w in self.shares)

    def total_rate(self, per_workflow: Mapping[str, float]) -> float:
        """The whole's rate of per-workflow rates at the mix (their smallest ratio to shares)."""
        return min(per_workflow.get(w, 0.0) / share for w, share in self.shares.items())

    def fits(self, model: str, tp: int, fraction: float) -> bool:
        """Whether an instance holds the weights, a minimum KV cache and the longest call."""
        return self.profiles.fits(model, tp, fraction)

    def problem(self, gpus: int, rate: float) -> Problem:
        return Problem(
            self.demands,
            self.rates(rate),
            gpus,
            self.fraction_unit,
            max_tp=max_tp_of(cluster_nodes(self.gpu.name, gpus)),
            rho=self.rho,
            weights=self.shares,
        )

    def capacity(self, gpus: int) -> float:
        """The ALP's highest throughput (requests/s) that any allocation of ``gpus`` reaches."""
        return best_scale(self.problem(gpus, 1.0), self.profiles.profile)

    def predict(self, allocation: Mapping[str, Allocation], rate: float) -> Prediction:
        return predict(
            self.demands,
            self.profiles.profile,
            allocation,
            self.rates(rate),
            bursts=self.profiles.burst,
        )

    def spread_requests(self, error: float) -> int:
        """Requests for the mean LLM time per request within ``error`` (relative standard
        error), from the warm-up trace's spread (``scoring.spread_requests``)."""
        found = self._spread.get(error)
        if found is None:
            found = self._spread[error] = spread_requests(self.warmup, (self.workflow.name,), error)
        return found

    @property
    def replay(self) -> TraceReplay:
        """The warm-up trace as a workflow (``services.core.sim.replay``)."""
        replay = self.scorer.workflow
        assert isinstance(replay, TraceReplay)
        return replay

    @property
    def scorer(self) -> ReplayScorer:
        """Allocations scored on the replayed warm-up trace (``services.core.sim.scoring``):
        the isolated latency of the warm-up probe sizes the runs."""
        if self._scorer is None:
            wf = self.workflow
            replay: Workflow
            if isinstance(wf, Mix):  # each part's traced requests, at the mix's shares
                tagged = self.parts_trace(wf)
                parts = tuple(TraceReplay.of(tagged, p.name, wf.models) for p in wf.parts)
                replay = Mix(wf.name, parts, wf.shares)
            else:
                replay = TraceReplay.of(self.warmup, wf.name, wf.models)
            settings = self.refine or RefineSettings()
            self._scorer = ReplayScorer(
                replay,
                self.gpu,
                self.models,
                self.isolated_latency,
                self.options,
                settings,
                self.spread_requests(settings.run_error),
            )
        return self._scorer

    def parts_trace(self, mix: Mix) -> Trace:
        """The warm-up trace of ``mix`` (this context's workflow), each request under its
        part's name (``tag_parts``: 4.7 s for co-serving's 320,000 calls), computed once."""
        if self._tagged is None:
            self._tagged = tag_parts(self.warmup, mix, warmup_seed(self.options))
        return self._tagged

    def groups(self, requests: int) -> npt.NDArray[np.int64] | None:
        """Per request of a ``serve`` run of ``requests`` requests, its part of a ``Mix``
        (``measure.measure``'s ``groups``); None for one workflow."""
        if not isinstance(self.workflow, Mix):
            return None
        return self.workflow.groups(self.options.seed, requests)

    def refiner(self, rate: float) -> Refiner | None:
        """The refinement of plans for ``rate`` (``score_replay``), None when off."""
        return None if self.refine is None else self.scorer.refiner(rate)

    def score_replay(self, allocation: Mapping[str, Allocation], rate: float) -> Scored:
        """The replayed trace served by ``allocation`` at ``rate`` (``ReplayScorer.score``: a
        short run with a fixed seed; remembered per allocation and rate)."""
        return self.scorer.score(allocation, rate)

    def deployment(self, allocation: Mapping[str, Allocation]) -> Deployment:
        return Deployment(self.gpu, self.models, dict(allocation))

    def serve(
        self,
        plan: Setup,
        arrivals: np.ndarray,
        *,
        record: bool = False,
        gpus: int | None = None,
    ) -> SimResult:
        """Simulate ``plan`` on ``arrivals`` (the controller may grow into ``gpus``)."""
        opts = replace(self.options, record=record, gpus=gpus)
        return simulate(
            self.workflow, self.deployment(plan.allocation), arrivals, opts, plan.controller
        )


def _parts(workflow: Workflow) -> list[tuple[str, float]]:
    if isinstance(workflow, Mix):
        return [(p.name, share) for p, share in zip(workflow.parts, workflow.shares, strict=True)]
    return [(workflow.name, 1.0)]


def tag_parts(trace: Trace, mix: Mix, seed: int) -> Trace:
    """``trace`` of a ``Mix`` simulated with ``seed``, each request under its part's name
    (request ids ``r<index>`` as the simulator writes them)."""

    def part(request_id: str) -> str:
        return mix.part_of(seed, int(request_id[1:])).name

    calls = tuple(replace(c, workflow=part(c.request_id)) for c in trace.calls)
    requests = tuple(replace(r, workflow=part(r.request_id)) for r in trace.requests)
    return Trace(calls, requests)


def memory_fits(gpu: GpuSpec, models: Mapping[str, ModelSpec]) -> baselines.Fits:
    """Whether an instance holds its model's weights and a minimum KV cache."""

    def fits(model: str, tp: int, fraction: float) -> bool:
        try:
            PerfModel.create(models[model], gpu, tp, fraction).kv_capacity_tokens()
        except InfeasibleError:
            return False
        return True

    return fits


def warmup_needed(trace: Trace, name: str, error: float) -> int:
    """Requests a warm-up trace needs for the standard error of the mean LLM time per request
    (its calls' summed durations) to be ``error`` of the mean, from ``trace``'s spread:
    (CV / error)^2 (``scoring.spread_requests``). A workflow whose loop length depends on the
    data (ReAct: more turns, and longer prompts in later turns) needs thousands; at 200 requests
    its means were 6-11% off and so was the ALP's latency near capacity. Raises
    ``InvalidInputError`` (naming ``warmup_error``) unless ``error`` > 0."""
    if not error > 0:
        raise InvalidInputError(f"warmup_error: must be positive, got {error!r}")
    return spread_requests(trace, (name,), error)


def warmup_seed(options: SimOptions) -> int:
    """The simulation seed of the warm-up run (``warmup_trace``): what tells a ``Mix``'s parts
    apart in its trace (``tag_parts``)."""
    return options.seed + 1


def warmup_trace(
    workflow: Workflow,
    gpu: GpuSpec,
    models: Mapping[str, ModelSpec],
    gpus: int,
    requests: int,
    options: SimOptions,
) -> tuple[Trace, float]:
    """The trace of ``requests`` requests on the even split, arriving on average one isolated
    request latency apart, and that latency (the mean of ``PROBE_REQUESTS`` requests served
    alone). Seeds differ from the evaluation's, so the statistics are not fitted to the measured
    requests."""
    allocation = baselines.even_split(models, gpus, memory_fits(gpu, models), min(gpus, NODE_GPUS))
    deployment = Deployment(gpu, models, allocation)
    alone = np.arange(PROBE_REQUESTS, dtype=np.float64) * 1e6
    probe = simulate(workflow, deployment, alone, replace(options, seed=options.seed + 7919))
    gap = float(np.mean(probe.latency))
    rng = np.random.default_rng([options.seed, 0x3A7])
    arrivals = np.cumsum(rng.exponential(gap, size=requests))
    run = replace(options, seed=warmup_seed(options), record=True)
    result = simulate(workflow, deployment, arrivals, run)
    return Trace(result.trace, result.requests), gap


# ------------------------------------------------------------------------------------ systems
def plan_scepsy(ctx: Context, gpus: int, rate: float) -> Setup:
    """The ALP-optimal placeable allocation for ``rate`` (module docstring)."""
    base = ctx.profiles.spec
    nodes = cluster_nodes(ctx.gpu.name, gpus)
    target = rate
    # scored at the offered rate, also when the closed form allows only a lower one (``rho``):
    # the simulation, not the closed form, says what keeps up there (RAG on 16 GPUs at 43 req/s:
    # planned for 41.9, the closed form's optimum there fell behind)
    refiner = ctx.refiner(rate)
    for _ in range(8):
        workflows = tuple(replace(w, rate=target * w.rate) for w in base.workflows)
        inputs = PlanInputs(
            f"simulated {ctx.workflow.name}",
            replace(base, workflows=workflows),
            nodes,
            ctx.profiles,
            clock=lambda: 0.0,
            refiner=refiner,
        )
        try:
            made = make_plan(inputs)
            allocation = made.allocation
        except AllocationInfeasible as exc:
            best = ctx.total_rate(exc.best_throughput) * ctx.rho
            if not best > 0:
                raise
            target = min(best * 0.999, target * 0.98)
            continue
        return Setup(
            "scepsy",
            allocation,
            prediction=ctx.predict(allocation, rate),
            planned_rate=None if target == rate else target,
            simulated_latency=made.simulated_latency_s,
        )
    raise InfeasibleError(f"scepsy: no plan for {ctx.workflow.name} on {gpus} GPUs")


def plan_scepsy_closed(ctx: Context, gpus: int, rate: float) -> Setup:
    """Scepsy with the closed-form ALP only: no refinement by simulation."""
    return replace(plan_scepsy(replace(ctx, refine=None), gpus, rate), system="scepsy-closed")


def plan_scepsy_whole(ctx: Context, gpus: int, rate: float) -> Setup:
    """Scepsy without GPU fractions: the same plan path with k = 1 (whole GPUs only)."""
    whole = replace(ctx, profiles=_respec(ctx, replace(ctx.profiles.spec, fraction_unit=1)))
    return replace(plan_scepsy(whole, gpus, rate), system="scepsy-whole")


def plan_scepsy_blind(ctx: Context, gpus: int, rate: float) -> Setup:
    """Scepsy without workflow awareness: the same search sizing each LLM for its own calls, as
    if every call were alone (n calls in a row, no fan-out, no parallel stages, no tool time)."""
    spec = ctx.profiles.spec
    workflows = tuple(
        replace(
            w,
            demand=WorkflowDemand(
                w.demand.name,
                tuple(LlmDemand(d.model, d.n, 1.0) for d in w.demand.llms),
                0.0,
                tuple((d.model,) for d in w.demand.llms),
            ),
        )
        for w in spec.workflows
    )
    blind = replace(ctx, profiles=_respec(ctx, replace(spec, workflows=workflows)))
    setup = plan_scepsy(replace(blind, refine=None), gpus, rate)
    return Setup("scepsy-blind", setup.allocation, prediction=ctx.predict(setup.allocation, rate))


def _respec(ctx: Context, spec: Spec) -> SpecProfiles:
    """A profile source for ``spec`` that shares ``ctx``'s computed profiles (same mixes)."""
    # the analytic backend and the burst tables are remembered per process: nothing is recomputed
    return SpecProfiles(spec, ctx.profiles.provider)


def plan_shares(fractions: bool) -> SetupFn:
    """GPUs in proportion to the traced time shares (``baselines.time_shares``)."""

    def plan(ctx: Context, gpus: int, rate: float) -> Setup:
        # each LLM's summed call time per request (n x mean call duration): a fan-out's calls
        # all count, unlike its share of the request's wall time
        shares = {m.model: m.n * m.latency_mean for m in ctx.stats.llms if m.n > 0}
        k = ctx.fraction_unit if fractions else 1
        allocation = baselines.time_shares(shares, gpus, ctx.fits, min(gpus, NODE_GPUS), k)
        return Setup("shares-frac" if fractions else "shares", allocation)

    return plan


def plan_static(ctx: Context, gpus: int, rate: float) -> Setup:
    allocation = baselines.even_split(ctx.models, gpus, ctx.fits, min(gpus, NODE_GPUS))
    return Setup("static", allocation)


def plan_independent(ctx: Context, gpus: int, rate: float) -> Setup:
    loads = ctx.loads(rate)
    allocation = baselines.independent(
        loads, ctx.profiles.profile, ctx.fits, gpus, min(gpus, NODE_GPUS)
    )
    return Setup("independent", allocation)


TARGET_UTILIZATION = 0.5


def hpa_targets(
    ctx: Context, allocation: Mapping[str, Allocation], utilization: float = TARGET_UTILIZATION
) -> dict[str, float]:
    """Per model, the outstanding calls of one replica running at ``utilization`` of its
    saturation rate: by Little's law, that rate x the profile's latency there."""
    targets: dict[str, float] = {}
    for model, a in sorted(allocation.items()):
        profile = ctx.profiles.profile(model, a.tp, a.fraction)
        rate = utilization * profile.saturation_rate
        targets[model] = max(1.0, rate * profile.latency_at(rate))
    return targets


def autoscaler_plan(autoscaler: baselines.HpaAutoscaler) -> SetupFn:
    """The autoscaling system with ``autoscaler``'s settings (module docstring)."""

    def plan(ctx: Context, gpus: int, rate: float) -> Setup:
        start = baselines.even_split(ctx.models, gpus, ctx.fits, min(gpus, NODE_GPUS))
        controller = autoscaler
        if not autoscaler.targets:
            controller = replace(autoscaler, targets=hpa_targets(ctx, start))
        return Setup("autoscaler", start, controller=controller)

    return plan


SetupFn = Callable[[Context, int, float], Setup]

SYSTEMS: Mapping[str, SetupFn] = {
    "scepsy": plan_scepsy,
    "static": plan_static,
    "independent": plan_independent,
    "autoscaler": autoscaler_plan(baselines.HpaAutoscaler()),
    "shares": plan_shares(fractions=False),
    "shares-frac": plan_shares(fractions=True),
    "scepsy-closed": plan_scepsy_closed,
    "scepsy-whole": plan_scepsy_whole,
    "scepsy-blind": plan_scepsy_blind,
}
