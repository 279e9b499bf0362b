"""The router service: both front ends, the dispatcher, the replica registry and the trace
recorder, started and stopped with the gRPC server (``router_binding``).

Start: open the connection pool for engine calls (``services.router.http1``; the registry keeps
its own for health checks), read the replicas, start the trace writer, then
the HTTP server. Stop (after the server's health went NOT_SERVING and ``drain_s`` passed):
refuse new calls (HTTP 503 with ``Retry-After``, ``/health`` 503; gRPC UNAVAILABLE with
``retry-after-ms``), give in-flight calls of both front ends ``grace_s`` to finish, stop the HTTP
server, then stop watching Redis, write the last trace records and close the pools.
"""

from __future__ import annotations

from protos.scepsy.v1 import router_pb2, router_pb2_grpc
from services.core.routing import PolicyOptions, make_policy
from services.router.auth import ApiKeys
from services.router.config import RouterConfig
from services.router.dispatch import Dispatcher
from services.router.grpc_api import RouterServicer
from services.router.http1 import Http1Pool
from services.router.http_api import HttpFrontEnd
from services.router.metrics import RouterMetrics
from services.router.registry import ReplicaRegistry
from services.router.tracing import TraceRecorder
from services.runtime.logging import get_logger
from services.runtime.server import Server, ServiceBinding
from services.runtime.store import Store

log = get_logger(__name__)


class Router:
    def __init__(self, config: RouterConfig, store: Store) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.registry = ReplicaRegistry(
            store,
            self.metrics,
            refresh_s=config.refresh_s,
            health_interval_s=config.health_interval_s,
            health_timeout_s=config.health_timeout_s,
            eject_after=config.eject_after,
        )
        self.recorder = TraceRecorder(
            store,
            self.metrics,
            max_len=config.trace_max_len,
            batch=config.trace_batch,
            flush_s=config.trace_flush_s,
            buffer=config.trace_buffer,
            enabled=config.trace,
        )
        policy = make_policy(
            config.policy, PolicyOptions(config.policy_seed, config.affinity_load_factor)
        )
        self.dispatcher = Dispatcher(config, self.registry, self.recorder, self.metrics, policy)
        self.keys = ApiKeys(config.keys(), self.metrics)
        self.http = HttpFrontEnd(config, self.dispatcher, self.registry, self.metrics, self.keys)
        self.servicer = RouterServicer(self.dispatcher, self.registry, self.keys)
        self._pool: Http1Pool | None = None

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def http_url(self) -> str:
        return f"http://{self.config.resolved_http_host}:{self.http.port}"

    async def start(self, server: Server | None = None) -> None:
        # No connection cap: the per-replica in-flight limit is the cap. Engines are reached
        # directly, never through a proxy named in the environment.
        self._pool = Http1Pool(self.config.connect_timeout_s, keepalive_s=30.0)
        self.dispatcher.start(self._pool)
        await self.registry.start()
        await self.recorder.start()
        try:
            await self.http.start()
        except BaseException:
            await self._stop_background()
            raise
        log.info(
            "router_started",
            http=self.http_url,
            grpc=server.address if server else None,
            policy=self.config.policy,
            models=self.registry.models(),
            auth=self.keys.enabled,
        )

    async def drain(self, server: Server | None = None) -> None:
        """The drain began: /health says 503 so that load balancers stop sending; calls are still
        served until ``stop``."""
        self.http.serving = False

    async def stop(self, server: Server | None = None) -> None:
        # The HTTP port stays open while in-flight calls finish, so that new calls and health
        # checks get a 503 with a retry hint rather than a refused connection.
        self.dispatcher.draining = True
        if not await self.dispatcher.wait_idle(self.config.grace_s):
            log.warning("router_stop_with_calls_in_flight", calls=self.dispatcher.active)
        await self.http.stop()
        await self._stop_background()
        log.info(
            "router_stopped",
            trace_recorded=self.recorder.recorded,
            trace_dropped=self.recorder.dropped,
        )

    async def _stop_background(self) -> None:
        """Stop watching Redis, write the last trace records, close the pool."""
        await self.registry.stop()
        await self.dispatcher.stop()
        await self.recorder.stop(timeout_s=self.config.redis_timeout_s)
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def router_binding(router: Router) -> ServiceBinding:
    return ServiceBinding(
        name=router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
        add_to_server=lambda server: router_pb2_grpc.add_RouterServicer_to_server(
            router.servicer, server
        ),
        on_start=(router.start,),
        on_drain=(router.drain,),
        on_stop=(router.stop,),
        metrics=(router.metrics.registry,),
    )
