"""The planner: serves ``scepsy.v1.Planner`` over the one plan path (``make_plan``).

``Plan``: the cluster is the request's cluster YAML when given, else the live nodes the agents
registered, else the spec's own cluster entry. A workflow whose spec says ``trace: router`` takes
its statistics from the router's recorded trace in Redis (the last ``trace_window_s`` seconds).
The plan path gets its profiles from the Profiler service when ``profiler_address`` is set (else
in-process: the profile stored under its key, else computed with the profiler's backend
registry and stored) and its placements from the Placer service when ``placer_address`` is set
(else in-process), both around the current plan's placement, so a re-plan keeps what it can
running. It runs in a worker thread, one plan at a time; the plan is stored under its content
hash and made current in one Redis transaction, then returned. ``GetPlan``: a stored plan by id,
the current one when the id is empty. Plans live only in Redis, so a restarted planner (or
another replica) serves the same plans, and earlier plans stay readable by id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.core.cluster.declared import cluster_from_text
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.inventory import NodeInventory
from services.core.cluster.models import ModelSpec
from services.core.errors import InvalidInputError, NotFoundError, UnavailableError
from services.core.placement.heuristic import Assignment
from services.core.planning.plan import Plan, PlanInputs, make_plan, spec_from_text
from services.core.planning.profiles import ProfileProvider, SpecProfiles, StoreFirst
from services.core.planning.refine import Refiner
from services.core.sim.scoring import RefineSettings, ReplayScorer
from services.core.workload.spec import RECORDED_TRACE, Spec
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import Trace, parse_trace_lines
from services.planner.clients import PlacerClient, ProfilerClient
from services.planner.config import PlannerConfig
from services.planner.metrics import METRICS, PlannerMetrics, record_plan
from services.profiler.backends import BACKENDS
from services.runtime.convert import plan_to_pb
from services.runtime.logging import get_logger
from services.runtime.periodic import Periodic
from services.runtime.profile_pool import prefetch_cold, prefetch_remote, shared_pool
from services.runtime.server import ServiceBinding
from services.runtime.store import Store, profiles_from_thread

log = get_logger(__name__)
T = TypeVar("T")

TRACE_PAGE = 5_000  # trace entries read per Redis call
MAX_TRACE_CALLS = 200_000  # at most this many recorded calls make one plan's statistics
REPUBLISH_S = 2.0  # how often the planner checks that the store still has the current plan


class RecordedTrace:
    """The ``SpecFiles`` of a spec planned by the service: the router's recorded trace only."""

    def __init__(self, stats: tuple[WorkflowStats, ...], window_s: float) -> None:
        self._stats = stats
        self._window_s = window_s

    def trace_stats(self, path: str) -> tuple[WorkflowStats, ...]:
        if path != RECORDED_TRACE:
            raise InvalidInputError(
                f"the planner service reads no trace files ({path!r}): use "
                f"`trace: {RECORDED_TRACE}` (the router's recorded trace), inline `stats`, or "
                "plan offline (`scepsy plan --offline`)"
            )
        if not self._stats:
            raise InvalidInputError(
                f"the router recorded no calls in the last {self._window_s:g} s"
            )
        return self._stats

    def cluster(self, path: str) -> tuple[NodeInventory, ...]:
        raise InvalidInputError(
            f"the planner service reads no cluster files ({path!r}): it plans on the live "
            "nodes, or on the request's cluster_yaml"
        )

    def model_config(self, path: str) -> ModelSpec:
        raise InvalidInputError(
            f"the planner service reads no model config files ({path!r}): use a catalogue name "
            "or the config inline (`scepsy apply` and `scepsy plan` inline it)"
        )

    def weights(self, path: str) -> str:
        """Weights live on the nodes: an absolute path is taken as it is (the node's agent
        reports a missing one); a relative one cannot be resolved here."""
        if not path.startswith("/"):
            raise InvalidInputError(
                f"relative path {path!r}: the planner service cannot resolve it; use an absolute "
                "path (`scepsy apply` and `scepsy plan` make paths absolute)"
            )
        return path


def _wants_recorded_trace(spec_text: str) -> bool:
    """Whether a workflow of the spec says ``trace: router`` (however it is quoted or spaced);
    a spec that does not parse is left to ``spec_from_text`` to report."""
    import yaml

    try:
        doc = yaml.safe_load(spec_text)
    except (yaml.YAMLError, RecursionError):
        return False
    workflows = doc.get("workflows") if isinstance(doc, dict) else None
    return isinstance(workflows, list) and any(
        isinstance(w, dict) and w.get("trace") == RECORDED_TRACE for w in workflows
    )


class Planner:
    def __init__(
        self,
        config: PlannerConfig,
        store: Store,
        clock: Callable[[], float] = time.time,
        metrics: PlannerMetrics = METRICS,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._store = store
        self._clock = clock
        self._lock = asyncio.Lock()
        # The current plan as last seen; written back when Redis comes back without it.
        self._current: Plan | None = None
        self._keeping = Periodic(self.keep_current, REPUBLISH_S, "planner-keep-current")
        self._profiler = (
            ProfilerClient(config.profiler_address, config.rpc_timeout_s)
            if config.profiler_address
            else None
        )
        # cold profiles computed here: in the process's worker pool (started on first use)
        self._pool = None if self._profiler else shared_pool(config.profile_workers)

    async def plan(
        self,
        spec_text: str,
        cluster_text: str = "",
        trace_window_s: float = 0,
        *,
        dry_run: bool = False,
    ) -> Plan:
        """Plan ``spec_text`` (module docstring), store it and make it current (``dry_run``:
        store it only; ``set_current`` makes it current later)."""
        if not spec_text.strip():
            raise InvalidInputError("spec_yaml: must not be empty")
        if trace_window_s < 0:
            raise InvalidInputError(f"trace_window_s: must be >= 0, got {trace_window_s:g}")
        window = trace_window_s or self._config.trace_window_s
        nodes = await self._nodes(cluster_text)
        trace = await self._recorded_trace(spec_text, window)
        stats = tuple(workflow_stats(trace)) if trace.calls else ()
        files = RecordedTrace(stats, window)
        spec = spec_from_text(spec_text, nodes, source="spec_yaml", files=files)
        refiner = self._refiner(spec, trace)
        running: tuple[Assignment, ...] = ()
        if not cluster_text:
            current = await self._store.get_current_plan()
            running = current.placement.assignments if current is not None else ()
        async with self._lock:
            placer = (
                PlacerClient(
                    self._config.placer_address,
                    self._config.rpc_timeout_s,
                    spec.nodes,
                    spec.fraction_unit,
                    running,
                )
                if self._config.placer_address
                else None
            )
            inputs = PlanInputs(
                spec_text,
                spec,
                spec.nodes,
                SpecProfiles(spec, self._provider(asyncio.get_running_loop())),
                running,
                placer.place if placer is not None else None,
                self._clock,
                self._config.max_rounds,
                refiner,
                self._prefetch,
            )
            try:
                plan = await asyncio.to_thread(make_plan, inputs)
            finally:
                if placer is not None:
                    placer.close()
        new = await self._store.put_plan(plan, current=not dry_run)
        record_plan(plan, new, plan.search_seconds, self._metrics)
        if not new:  # planned before: the stored document (and its creation time) stands
            plan = await self._store.get_plan(plan.id) or plan
        if dry_run:
            log.info("plan_stored", plan=plan.id, new=new, gpus=plan.gpus)
            return plan
        self._current = plan
        log.info(
            "plan_current",
            plan=plan.id,
            new=new,
            gpus=plan.gpus,
            objective_s=plan.objective_s,
            rounds=plan.rounds,
            search_seconds=round(plan.search_seconds, 4),
        )
        return plan

    async def set_current(self, plan_id: str) -> Plan:
        """Make the stored plan ``plan_id`` current; ``NotFoundError`` when there is none."""
        if not plan_id:
            raise InvalidInputError("id: must name a stored plan")
        if not await self._store.set_current_plan(plan_id):
            raise NotFoundError(f"plan {plan_id!r} not found")
        plan = await self.get(plan_id)
        self._current = plan
        log.info("plan_current", plan=plan.id, new=False, gpus=plan.gpus)
        return plan

    async def get(self, plan_id: str) -> Plan:
        """A stored plan; the current one when ``plan_id`` is empty. Raises ``NotFoundError``."""
        if not plan_id:
            plan = await self._store.get_current_plan()
            if plan is None:
                raise NotFoundError("no current plan: nothing has been planned yet")
            return plan
        found = await self._store.get_plan(plan_id)
        if found is None:
            raise NotFoundError(f"plan {plan_id!r} not found")
        return found

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.close()

    async def keep_current(self) -> None:
        """Follow the current plan, and publish it again when the store has none any more
        (Redis restarted without its data): agents and readers find the plan they ran. A plan
        made current by someone else becomes the one followed. Redis down: try next time."""
        try:
            current_id = await self._store.current_plan_id()
            if current_id is None and self._current is not None:
                await self._store.put_plan(self._current)
                log.warning("plan_republished", plan=self._current.id)
            elif current_id is not None and (
                self._current is None or self._current.id != current_id
            ):
                self._current = await self._store.get_plan(current_id)
        except UnavailableError as exc:
            log.warning("plan_check_failed", error=str(exc))

    async def start_keeping(self, server: object = None) -> None:
        await self.keep_current()
        self._keeping.start()

    async def stop_keeping(self, server: object = None) -> None:
        await self._keeping.stop()

    def _prefetch(self, profiles: SpecProfiles, spec: Spec) -> None:
        """Every profile the search may ask for, first and at once (``PlanInputs.prefetch``):
        from the Profiler service with ``profile_calls`` calls in flight, or the cold ones
        computed in this process's worker pool."""
        if self._profiler is not None:
            prefetch_remote(profiles, self._config.profile_calls, spec)
        else:
            prefetch_cold(profiles, self._pool, spec)

    def _provider(self, loop: asyncio.AbstractEventLoop) -> ProfileProvider:
        """The Profiler service, else the store-first source on this planner's store (called
        from the search's worker thread, so the store calls hop onto the event loop)."""
        if self._profiler is not None:
            return self._profiler
        get, put = profiles_from_thread(self._store, loop, self._config.rpc_timeout_s)
        return StoreFirst(BACKENDS, get=get, put=put)

    async def _recorded_trace(self, spec_text: str, window_s: float) -> Trace:
        """The router's calls (and request spans) of the last ``window_s`` seconds, read only
        when the spec asks for them (a workflow with ``trace: router``); empty otherwise."""
        if not _wants_recorded_trace(spec_text):
            return Trace((), ())
        cutoff = self._clock() - window_s
        after = f"{max(0, int(cutoff * 1000))}-0"  # entries are appended when calls end
        lines: list[str] = []
        while len(lines) < MAX_TRACE_CALLS:
            page = await self._store.read_trace(after, TRACE_PAGE)
            if not page:
                break
            lines.extend(line for _, line in page)
            after = page[-1][0]
        trace = parse_trace_lines(lines[-MAX_TRACE_CALLS:], source="router trace")
        # a batch written late may hold calls that ended before the window
        calls = tuple(c for c in trace.calls if c.end >= cutoff)
        requests = tuple(r for r in trace.requests if r.end >= cutoff)
        return Trace(calls, requests)

    def _refiner(self, spec: Spec, trace: Trace) -> Refiner | None:
        """Refinement by simulation (``services.core.sim.scoring``) on a replay of the recorded
        trace, when it is on and every workflow with a rate takes its statistics from that
        trace (a workflow known only by inline statistics has no requests to replay)."""
        seconds = self._config.refine_seconds
        targets = [w for w in spec.workflows if w.rate > 0]
        if seconds <= 0 or not trace.calls or not targets:
            return None
        if any(w.source != RECORDED_TRACE for w in targets):
            log.info("refine_skipped", reason="a workflow's statistics are not the router's trace")
            return None
        settings = RefineSettings(
            seconds=seconds,
            budget_calls=self._config.refine_budget_calls,
            calls=self._config.refine_calls,
        )
        try:
            scorer = ReplayScorer.of_trace(
                trace,
                {w.name: w.rate for w in targets},
                gpu_spec(spec.gpu_type),
                spec.models,
                settings=settings,
            )
        except InvalidInputError as exc:
            log.info("refine_skipped", reason=str(exc))
            return None
        return scorer.refiner(sum(w.rate for w in targets))

    async def _nodes(self, cluster_text: str) -> tuple[NodeInventory, ...] | None:
        """The declared cluster, else the live nodes, else None (the spec's own cluster)."""
        if cluster_text.strip():
            return cluster_from_text(cluster_text, source="cluster_yaml")
        live = await self._store.list_nodes()
        return tuple(live) if live else None


class PlannerServicer(planner_pb2_grpc.PlannerServicer):
    def __init__(self, planner: Planner) -> None:
        self._planner = planner

    async def Plan(
        self,
        request: planner_pb2.PlanRequest,
        context: grpc.aio.ServicerContext[planner_pb2.PlanRequest, planner_pb2.PlanResponse],
    ) -> planner_pb2.PlanResponse:
        plan = await self._planner.plan(
            request.spec_yaml, request.cluster_yaml, request.trace_window_s, dry_run=request.dry_run
        )
        return planner_pb2.PlanResponse(plan=plan_to_pb(plan))

    async def SetCurrentPlan(
        self,
        request: planner_pb2.SetCurrentPlanRequest,
        context: grpc.aio.ServicerContext[
            planner_pb2.SetCurrentPlanRequest, planner_pb2.PlanResponse
        ],
    ) -> planner_pb2.PlanResponse:
        return planner_pb2.PlanResponse(
            plan=plan_to_pb(await self._planner.set_current(request.id))
        )

    async def GetPlan(
        self,
        request: planner_pb2.GetPlanRequest,
        context: grpc.aio.ServicerContext[planner_pb2.GetPlanRequest, planner_pb2.PlanResponse],
    ) -> planner_pb2.PlanResponse:
        return planner_pb2.PlanResponse(plan=plan_to_pb(await self._planner.get(request.id)))


def planner_binding(planner: Planner) -> ServiceBinding:
    servicer = PlannerServicer(planner)
    return ServiceBinding(
        name=planner_pb2.DESCRIPTOR.services_by_name["Planner"].full_name,
        add_to_server=lambda server: planner_pb2_grpc.add_PlannerServicer_to_server(
            servicer, server
        ),
        on_start=(planner.start_keeping,),
        on_stop=(planner.stop_keeping,),
    )
