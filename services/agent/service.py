"""The node agent: heartbeats the node into Redis, runs the node's engines, and serves
``scepsy.v1.NodeAgent``.

Registration is idempotent (the node's name is its key), so a restarted agent replaces its old
record instead of adding a second one. If Redis is unreachable the agent keeps serving gRPC and
retries on the next heartbeat; a node whose agent dies vanishes ``node_ttl_s`` after its last beat.

With engines on (``services.agent.engines``), the agent follows the current plan: a
``plan_changed`` event makes it read the plan at once, and it reads it every ``resync_s`` anyway,
so a missed event is never fatal. Each heartbeat also writes its engine records and re-registers
any READY engine whose endpoint Redis lost. A current plan that vanished (Redis restarted empty)
changes nothing: engines follow only a plan that is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable

import grpc

from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc
from services.agent.config import AgentConfig
from services.agent.engines import EngineManager
from services.agent.sources import InventorySource
from services.core.cluster.inventory import NodeInventory
from services.core.errors import UnavailableError
from services.runtime.convert import node_to_pb, topology_to_pb
from services.runtime.logging import get_logger
from services.runtime.periodic import Periodic
from services.runtime.server import Server, ServiceBinding
from services.runtime.store import Store

log = get_logger(__name__)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        source: InventorySource,
        store: Store,
        clock: Callable[[], float] = time.time,
        engines: EngineManager | None = None,
    ) -> None:
        self._config = config
        self._source = source
        self._store = store
        self._clock = clock
        self._address = ""
        self._started_at = clock()
        self._beats = Periodic(self.heartbeat, config.heartbeat_s, "agent-heartbeat")
        self.engines = engines
        self._resync = Periodic(self.sync_plan, config.resync_s, "agent-plan-resync")
        self._watcher: asyncio.Task[None] | None = None
        self.beats = 0  # successful heartbeats, for tests and metrics
        self.failed_beats = 0

    @property
    def node_name(self) -> str:
        return self._config.resolved_node_name

    async def node(self) -> NodeInventory:
        """The node as it is now, stamped with this agent's address and times."""
        node = await asyncio.to_thread(self._source.read)
        return dataclasses.replace(
            node,
            agent_address=self._address,
            started_at=self._started_at,
            heartbeat_at=self._clock(),
        )

    async def start(self, server: Server) -> None:
        host = self._config.advertise_host or self._config.host
        self._address = f"{host}:{server.port}"
        await self.heartbeat()
        self._beats.start()
        if self.engines is not None:
            await self.engines.start()
            await self.sync_plan()
            self._resync.start()
            self._watcher = asyncio.create_task(self._watch_plans(), name="agent-plan-watch")

    async def stop(self, server: Server | None = None) -> None:
        """Stop heartbeating, drain and stop the engines, deregister (a crash instead lets the
        TTL remove the node; the restarted agent adopts or stops its engines)."""
        await self.stop_heartbeat()  # first: a beat would re-register draining engines
        if self.engines is not None:
            await self._resync.stop()
            if self._watcher is not None:
                self._watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
            await self.engines.stop()
        with contextlib.suppress(UnavailableError):
            await self._store.remove_node(self._config.resolved_node_name)
        self._source.close()

    async def stop_heartbeat(self) -> None:
        await self._beats.stop()

    async def heartbeat(self) -> None:
        """One beat: read the inventory, refresh the record. A failed beat (Redis down, an NVML
        error) is logged and counted; the next beat retries, and serving goes on."""
        try:
            node = await self.node()
            joined = await self._store.put_node(node, self._config.node_ttl_s)
            if self.engines is not None:
                await self.engines.publish()
        except Exception as exc:
            self.failed_beats += 1
            log.warning("heartbeat_failed", node=self._config.resolved_node_name, error=str(exc))
            return
        self.beats += 1
        if joined:
            log.info(
                "node_registered",
                node=node.name,
                gpus=len(node.gpus),
                domains=[list(d) for d in node.domains],
                address=node.agent_address,
            )

    async def sync_plan(self) -> None:
        """Read the current plan and hand it to the engines (Redis down: next time)."""
        if self.engines is None:
            return
        try:
            plan = await self._store.get_current_plan()
        except UnavailableError as exc:
            log.warning("plan_read_failed", error=str(exc))
            return
        if plan is None and self.engines.plan_id:
            log.warning("current_plan_missing", following=self.engines.plan_id)
            return
        self.engines.want(plan)

    async def _watch_plans(self) -> None:
        while True:
            try:
                async with self._store.subscribe() as pubsub:
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=self._config.resync_s
                        )
                        if message and _is_plan_event(message.get("data")):
                            await self.sync_plan()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone: the periodic resync covers the gap
                log.warning("plan_watch_failed", error=str(exc))
                await asyncio.sleep(self._config.resync_s)


def _is_plan_event(data: object) -> bool:
    try:
        event = json.loads(data) if isinstance(data, str | bytes) else None
    except ValueError:
        return False
    return isinstance(event, dict) and event.get("event") == "plan_changed"


class NodeAgentServicer(agent_pb2_grpc.NodeAgentServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def GetInventory(
        self,
        request: agent_pb2.GetInventoryRequest,
        context: grpc.aio.ServicerContext[
            agent_pb2.GetInventoryRequest, agent_pb2.GetInventoryResponse
        ],
    ) -> agent_pb2.GetInventoryResponse:
        return agent_pb2.GetInventoryResponse(node=node_to_pb(await self._agent.node()))

    async def GetTopology(
        self,
        request: agent_pb2.GetTopologyRequest,
        context: grpc.aio.ServicerContext[
            agent_pb2.GetTopologyRequest, agent_pb2.GetTopologyResponse
        ],
    ) -> agent_pb2.GetTopologyResponse:
        return agent_pb2.GetTopologyResponse(topology=topology_to_pb(await self._agent.node()))

    async def ListEngines(
        self,
        request: agent_pb2.ListEnginesRequest,
        context: grpc.aio.ServicerContext[
            agent_pb2.ListEnginesRequest, agent_pb2.ListEnginesResponse
        ],
    ) -> agent_pb2.ListEnginesResponse:
        engines = self._agent.engines
        return agent_pb2.ListEnginesResponse(
            node=self._agent.node_name,
            plan_id=engines.plan_id if engines is not None else "",
            engines=engines.engines() if engines is not None else [],
        )


def agent_binding(agent: Agent) -> ServiceBinding:
    servicer = NodeAgentServicer(agent)
    return ServiceBinding(
        name=agent_pb2.DESCRIPTOR.services_by_name["NodeAgent"].full_name,
        add_to_server=lambda server: agent_pb2_grpc.add_NodeAgentServicer_to_server(
            servicer, server
        ),
        on_start=(agent.start,),
        on_stop=(agent.stop,),
    )
