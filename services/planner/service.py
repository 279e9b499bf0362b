"""The planner: serves ``scepsy.v1.Planner`` over the pure search and plan (``services.core``).

``Plan``: the cluster is the request's cluster YAML when given, else the live nodes the agents
registered, else the spec's own cluster entry. The spec is searched and placed
(``build_plan``) in a worker thread, one plan at a time; the plan is stored under its content
hash and made current in one Redis transaction, then returned. ``GetPlan``: a stored plan by id,
the current one when the id is empty. Plans live only in Redis, so a restarted planner (or another
replica) serves the same plans, and earlier plans stay readable by id.

Profiles come from the analytic backend, computed once per (model, TP, fraction) and kept for the
``profile_caches`` most recently planned sets of profile inputs (GPU type, models, request mixes),
so planning the same workloads again costs only the search.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

import grpc

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc
from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.errors import InvalidInputError, NotFoundError
from services.core.planning.plan import Plan, build_plan, placer_for, spec_from_text
from services.core.planning.profiles import AnalyticProfiles
from services.core.workload.spec import Spec
from services.planner.config import PlannerConfig
from services.runtime.convert import plan_to_pb
from services.runtime.logging import get_logger
from services.runtime.server import ServiceBinding
from services.runtime.store import Store

log = get_logger(__name__)


class ProfileCaches:
    """``AnalyticProfiles`` per profile inputs; the ``size`` most recently used are kept."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._caches: OrderedDict[Hashable, AnalyticProfiles] = OrderedDict()

    def for_spec(self, spec: Spec) -> AnalyticProfiles:
        key = (
            spec.gpu_type,
            tuple((m, spec.models[m], spec.token_mix(m)) for m in sorted(spec.models)),
        )
        cache = self._caches.pop(key, None) or AnalyticProfiles(spec)
        self._caches[key] = cache
        while len(self._caches) > self._size:
            self._caches.popitem(last=False)
        return cache


class Planner:
    def __init__(
        self, config: PlannerConfig, store: Store, clock: Callable[[], float] = time.time
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._caches = ProfileCaches(config.profile_caches)
        self._lock = asyncio.Lock()

    async def plan(self, spec_text: str, cluster_text: str = "") -> Plan:
        """Plan ``spec_text`` (module docstring), store it and make it current."""
        if not spec_text.strip():
            raise InvalidInputError("spec_yaml: must not be empty")
        nodes = await self._nodes(cluster_text)
        spec = spec_from_text(spec_text, nodes, source="spec_yaml")
        current = await self._store.get_current_plan() if not cluster_text else None
        running = current.placement.assignments if current is not None else ()
        async with self._lock:
            profiles = self._caches.for_spec(spec)
            plan = await asyncio.to_thread(
                build_plan,
                spec_text,
                spec,
                profiles.profile,
                created_at=self._clock(),
                placer=placer_for(spec.nodes, spec.fraction_unit, running),
                profile_seconds=lambda: profiles.seconds,
                max_rounds=self._config.max_rounds,
            )
        new = await self._store.put_plan(plan)
        if not new:  # planned before: the stored document (and its creation time) stands
            plan = await self._store.get_plan(plan.id) or plan
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

    async def _nodes(self, cluster_text: str) -> tuple[NodeInventory, ...] | None:
        """The declared cluster, else the live nodes, else None (the spec's own cluster)."""
        if cluster_text.strip():
            import yaml

            try:
                doc = yaml.safe_load(cluster_text)
            except yaml.YAMLError as exc:
                raise InvalidInputError(f"cluster_yaml: not valid YAML: {exc}") from None
            return parse_cluster(doc, source="cluster_yaml")
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
        plan = await self._planner.plan(request.spec_yaml, request.cluster_yaml)
        return planner_pb2.PlanResponse(plan=plan_to_pb(plan))

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
    )
