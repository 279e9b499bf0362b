"""One ``serve()`` for every service: grpc.aio server, health, reflection, graceful stop.

Lifecycle of a ``Server``:
1. ``start()``: bind (port 0 picks a free port), start the server, run each service's
   ``on_start`` hook (it can read the bound address), then report SERVING for every service and
   for the whole server ("").
2. ``stop()``: report NOT_SERVING (load balancers and clients watching health see it), wait
   ``drain_s``, run ``on_stop`` hooks, stop accepting and give in-flight RPCs ``grace_s``.
``serve()`` runs start, waits for SIGTERM or SIGINT, then stop.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.config import ServiceConfig
from services.runtime.errors import ErrorMappingInterceptor
from services.runtime.logging import get_logger

log = get_logger(__name__)

Hook = Callable[["Server"], Awaitable[None]]


@dataclass(frozen=True)
class ServiceBinding:
    """A gRPC service to host: its full name and how to add its servicer to a server."""

    name: str  # e.g. "scepsy.v1.NodeAgent"
    add_to_server: Callable[[grpc.aio.Server], None]
    on_start: Sequence[Hook] = field(default=())
    on_stop: Sequence[Hook] = field(default=())


class Server:
    def __init__(self, config: ServiceConfig, services: Sequence[ServiceBinding]) -> None:
        self._config = config
        self._services = services
        self._server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
        self._health = health.aio.HealthServicer()
        self._stopping: asyncio.Event | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self.port}"

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
        self.port = self._server.add_insecure_port(f"{self._config.host}:{self._config.port}")
        await self._server.start()
        try:
            for service in self._services:
                for hook in service.on_start:
                    await hook(self)
        except BaseException:
            await self._server.stop(0)
            raise
        for name in ["", *names]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server_started", address=self.address, services=names)
        return self.port

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        log.info("server_draining", address=self.address, drain_s=self._config.drain_s)
        await asyncio.sleep(self._config.drain_s)
        for service in self._services:
            for hook in service.on_stop:
                try:
                    await hook(self)
                except Exception:
                    log.exception("stop_hook_failed", service=service.name)
        await self._server.stop(self._config.grace_s)
        log.info("server_stopped", address=self.address)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(
    config: ServiceConfig,
    services: Sequence[ServiceBinding],
    ready: Callable[[Server], None] | None = None,
) -> None:
    """Run the services until SIGTERM or SIGINT, then stop gracefully."""
    server = Server(config, services)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    if ready is not None:
        ready(server)
    await stop.wait()
    log.info("signal_received")
    await server.stop()
