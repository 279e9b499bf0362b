"""One ``serve()`` for every service: grpc.aio server, health, reflection, metrics, graceful
stop.

Lifecycle of a ``Server``:
1. ``start()``: bind (port 0 picks a free port; TLS, and mutual TLS, when the config names the
   files: ``services.runtime.channels``), start the server and its ``GET /metrics``
   endpoint (``metrics_port``), run each service's ``on_start`` hook (it can read the bound
   address), then report SERVING for every service and for the whole server ("").
2. ``stop()``: report NOT_SERVING (load balancers and clients watching health see it), run
   ``on_drain`` hooks, wait ``drain_s``, run ``on_stop`` hooks, stop accepting and give
   in-flight RPCs ``grace_s``, close the metrics endpoint.
``serve()`` runs start, announces the process in Redis (``Registration``, when given), waits for
SIGTERM or SIGINT, withdraws the announcement, then stop.

Every RPC is counted and timed (``services.runtime.metrics``, outermost interceptor) and then has
its domain errors mapped to status codes (``services.runtime.errors``). The server's registry
holds those RPC metrics and every binding's ``metrics`` collectors.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from services.core.errors import UnavailableError
from services.runtime.channels import Tls
from services.runtime.config import ServiceConfig
from services.runtime.errors import ErrorMappingInterceptor
from services.runtime.logging import get_logger
from services.runtime.metrics import MetricsEndpoint, MetricsInterceptor, RpcMetrics

if TYPE_CHECKING:
    from services.runtime.registration import Registration

log = get_logger(__name__)

Hook = Callable[["Server"], Awaitable[None]]


@dataclass(frozen=True)
class ServiceBinding:
    """A gRPC service to host: its full name and how to add its servicer to a server."""

    name: str  # e.g. "scepsy.v1.NodeAgent"
    add_to_server: Callable[[grpc.aio.Server], None]
    on_start: Sequence[Hook] = field(default=())
    on_stop: Sequence[Hook] = field(default=())
    # Run when the drain begins (gRPC health just went NOT_SERVING, calls still served), so a
    # service can say so on its other health endpoints (the router's HTTP /health).
    on_drain: Sequence[Hook] = field(default=())
    # The service's own figures, added to the server's registry (served on GET /metrics).
    metrics: Sequence[Collector] = field(default=())
    # Fields the process announces besides its addresses, read after on_start (e.g. the
    # router's {"http_address": ...}); see ``services.runtime.registration``.
    announce: Callable[[], Mapping[str, str]] | None = None


class Server:
    def __init__(self, config: ServiceConfig, services: Sequence[ServiceBinding]) -> None:
        self._config = config
        self._services = services
        self.registry = CollectorRegistry()
        self.rpc_metrics = RpcMetrics(self.registry)
        for service in services:
            for collector in service.metrics:
                self.registry.register(collector)
        self._server = grpc.aio.server(
            interceptors=[MetricsInterceptor(self.rpc_metrics), ErrorMappingInterceptor()],
            # A taken port is an error, never silently shared with another server.
            options=[("grpc.so_reuseport", 0)],
        )
        self._health = health.aio.HealthServicer()
        self._metrics_endpoint = MetricsEndpoint(self.registry, config.host, config.metrics_port)
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        """host:port of GET /metrics (port 0 until started)."""
        return self._metrics_endpoint.address

    def announced(self) -> dict[str, str]:
        """The fields the services announce besides the addresses (``ServiceBinding.announce``)."""
        fields: dict[str, str] = {}
        for service in self._services:
            if service.announce is not None:
                fields.update(service.announce())
        return fields

    async def start(self) -> int:
        for service in self._services:
            service.add_to_server(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [s.name for s in self._services]
        reflection.enable_server_reflection(
            [
                *names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self._server,
        )
        address = f"{self._config.host}:{self._config.port}"
        try:
            if self._config.tls_cert:
                credentials = Tls.of(self._config).server_credentials()
                self.port = self._server.add_secure_port(address, credentials)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
            raise UnavailableError(f"port: cannot listen on {address}: {exc}") from None
        await self._server.start()
        try:
            await self._start_metrics()
            for service in self._services:
                for hook in service.on_start:
                    await hook(self)
        except BaseException:
            await self._server.stop(0)
            await self._metrics_endpoint.stop()
            raise
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "server_started", address=self.address, metrics=self.metrics_address, services=names
        )
        return self.port

    async def _start_metrics(self) -> None:
        try:
            await self._metrics_endpoint.start()
        except OSError as exc:
            raise UnavailableError(
                f"metrics_port: cannot listen on {self._config.host}:"
                f"{self._config.metrics_port}: {exc.strerror or exc}"
            ) from None

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        log.info("server_draining", address=self.address, drain_s=self._config.drain_s)
        await self._run_hooks("on_drain")
        await asyncio.sleep(self._config.drain_s)
        await self._run_hooks("on_stop")
        await self._server.stop(self._config.grace_s)
        await self._metrics_endpoint.stop()
        log.info("server_stopped", address=self.address)

    async def _run_hooks(self, kind: str) -> None:
        """Every service's ``on_drain`` or ``on_stop`` hooks; one failing does not stop the rest."""
        for service in self._services:
            for hook in getattr(service, kind):
                try:
                    await hook(self)
                except Exception:
                    log.exception("stop_hook_failed", service=service.name, hook=kind)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(
    config: ServiceConfig,
    services: Sequence[ServiceBinding],
    ready: Callable[[Server], None] | None = None,
    registration: Registration | None = None,
) -> None:
    """Run the services until SIGTERM or SIGINT, then stop gracefully. With ``registration``,
    the process is announced once serving and withdrawn before draining."""
    server = Server(config, services)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        if registration is not None:
            await registration.start(server)
        if ready is not None:
            ready(server)
        await stop.wait()
        log.info("signal_received")
    finally:
        if registration is not None:
            await registration.stop()
        await server.stop()
