"""The placer: serves ``scepsy.v1.Placer``.

``Place`` is request -> core call -> response: the allocation, the cluster (the request's nodes;
else the declared cluster file of the config; else the live nodes in Redis) and the running
placement go to ``services.core.placement.place_allocation``. The placer keeps no state: a plan
stores its placement (``Plan.placement``) and a later request hands it back as ``current``.
An allocation that does not place fails with FAILED_PRECONDITION; the status details
(``services.runtime.errors``) carry the ``PlacementInfeasible``: an ErrorInfo whose reason is the
machine-readable kind (``tp_exceeds_domain``, see ``InfeasibleKind``) and whose metadata hold
``model``, ``needed`` and ``available``. A caller gets the error back with
``services.runtime.errors.error_from_rpc``; the message stays for people to read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from protos.scepsy.v1 import placer_pb2, placer_pb2_grpc
from services.core.cluster.inventory import NodeInventory
from services.core.placement.heuristic import Replacement, place_allocation
from services.placer.config import PlacerConfig
from services.placer.metrics import PlacerMetrics
from services.runtime.convert import (
    allocation_from_pb,
    assignments_from_pb,
    node_from_pb,
    placement_to_pb,
)
from services.runtime.logging import get_logger
from services.runtime.server import ServiceBinding
from services.runtime.store import Store

log = get_logger(__name__)


class Placer:
    """``declared``: the nodes of the config's cluster file (``services.core.cluster.declared``),
    if any. ``metrics``: where placements are counted (a fresh set by default)."""

    def __init__(
        self,
        config: PlacerConfig,
        store: Store,
        declared: Sequence[NodeInventory] | None = None,
        metrics: PlacerMetrics | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._declared = declared
        self.metrics = metrics or PlacerMetrics()

    async def nodes(self) -> list[NodeInventory]:
        """The cluster a request without nodes is placed on."""
        if self._declared is not None:
            return list(self._declared)
        return await self._store.list_nodes()

    async def place(self, request: placer_pb2.PlaceRequest) -> placer_pb2.PlaceResponse:
        allocation, k = allocation_from_pb(request.allocation)
        nodes = [node_from_pb(n) for n in request.nodes] or await self.nodes()
        current = assignments_from_pb(request.current, k)
        started = time.perf_counter()
        result: Replacement = await asyncio.to_thread(
            place_allocation,
            allocation,
            k,
            nodes,
            current=current,
            memory_margin=self._config.memory_margin,
            spread_window=self._config.spread_window,
        )
        seconds = time.perf_counter() - started
        self.metrics.record(result, seconds)
        frag = result.placement.fragmentation
        log.info(
            "placed",
            models=len(allocation),
            instances=len(result.placement.assignments),
            nodes=len(nodes),
            started=len(result.started),
            stopped=len(result.stopped),
            moved=len(result.moved),
            stranded_gpus=frag.stranded_fraction,
            seconds=round(seconds, 4),
        )
        return placer_pb2.PlaceResponse(
            placement=placement_to_pb(result.placement),
            started=len(result.started),
            stopped=len(result.stopped),
            moved=len(result.moved),
        )


class PlacerServicer(placer_pb2_grpc.PlacerServicer):
    def __init__(self, placer: Placer) -> None:
        self._placer = placer

    async def Place(
        self,
        request: placer_pb2.PlaceRequest,
        context: grpc.aio.ServicerContext[placer_pb2.PlaceRequest, placer_pb2.PlaceResponse],
    ) -> placer_pb2.PlaceResponse:
        return await self._placer.place(request)


def placer_binding(placer: Placer) -> ServiceBinding:
    servicer = PlacerServicer(placer)
    return ServiceBinding(
        name=placer_pb2.DESCRIPTOR.services_by_name["Placer"].full_name,
        add_to_server=lambda server: placer_pb2_grpc.add_PlacerServicer_to_server(servicer, server),
        metrics=(placer.metrics.registry,),
    )
