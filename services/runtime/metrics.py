"""Prometheus metrics of every service process: RPC counters and latency, and ``GET /metrics``.

Each ``Server`` (``services.runtime.server``) owns one ``CollectorRegistry``: its ``RpcMetrics``,
filled by ``MetricsInterceptor`` around every handler, plus the collectors its services
contribute (their own figures, e.g. the placer's placements). ``MetricsEndpoint`` serves that
registry as Prometheus text on ``GET /metrics`` (aiohttp, port 0 picks a free one). No metric goes
to prometheus_client's global registry, so several servers can share a process, as in tests.

| metric | type | labels |
|---|---|---|
| scepsy_rpc_handled_total | counter | service, method, code: every finished RPC |
| scepsy_rpc_errors_total | counter | service, method, code: those that ended other than OK |
| scepsy_rpc_seconds | histogram | service, method: time in the handler |
| scepsy_rpc_in_flight | gauge | service, method: RPCs being handled now |

``service`` is the full gRPC service name (``scepsy.v1.Placer``), ``method`` the method name
(``Place``), ``code`` the status code's name (``OK``, ``INVALID_ARGUMENT``, ...): the code the
caller sees, after the error mapping of ``services.runtime.errors``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds; from a health check (sub-millisecond) to a long plan search.
RPC_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
)  # fmt: skip


class RpcMetrics:
    """The RPC figures of one server, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "scepsy_rpc_handled",
            "RPCs finished, by gRPC service, method and status code",
            ["service", "method", "code"],
            registry=registry,
        )
        self.errors = Counter(
            "scepsy_rpc_errors",
            "RPCs that ended with a status other than OK",
            ["service", "method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "scepsy_rpc_seconds",
            "Time an RPC spent in its handler",
            ["service", "method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "scepsy_rpc_in_flight",
            "RPCs being handled now",
            ["service", "method"],
            registry=registry,
        )

    def observe(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.handled.labels(service, method, code.name).inc()
        if code != grpc.StatusCode.OK:
            self.errors.labels(service, method, code.name).inc()
        self.seconds.labels(service, method).observe(seconds)


def split_method(full: str) -> tuple[str, str]:
    """``/scepsy.v1.Placer/Place`` -> (``scepsy.v1.Placer``, ``Place``)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service or "unknown", method


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC, of all four kinds (unary or streaming either way).

    Installed outermost, so the code counted is the one the caller gets: OK, the code set with
    ``context.set_code``, the code of an abort (the error mapping aborts), CANCELLED when the
    call was cancelled, UNKNOWN for an exception grpc itself turns into a status.
    """

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)
        call = _Observed(self._metrics, service, method)
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(call.unary(handler.unary_unary), **codec)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(call.unary(handler.stream_unary), **codec)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(call.stream(handler.unary_stream), **codec)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                call.stream(handler.stream_stream), **codec
            )
        return handler


class _Observed:
    """Wraps one method's behaviour so that each call is timed and counted by its final code.

    A streaming behaviour is either an async generator (wrapped by one) or a coroutine that
    writes with ``context.write`` (wrapped by a coroutine, as grpc tells the two apart).
    """

    def __init__(self, metrics: RpcMetrics, service: str, method: str) -> None:
        self._metrics = metrics
        self._service = service
        self._method = method

    def unary(self, behaviour: Any) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = self._begin()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await behaviour(request, context)
                code = _code(context, grpc.StatusCode.OK)
                return response
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._end(started, code)

        return wrapped

    def stream(self, behaviour: Any) -> Any:
        if not inspect.isasyncgenfunction(behaviour):
            return self.unary(behaviour)  # writes with context.write and returns None

        async def wrapped(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started = self._begin()
            code = grpc.StatusCode.UNKNOWN
            try:
                async for item in behaviour(request, context):
                    yield item
                code = _code(context, grpc.StatusCode.OK)
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._end(started, code)

        return wrapped

    def _begin(self) -> float:
        self._metrics.in_flight.labels(self._service, self._method).inc()
        return time.perf_counter()

    def _end(self, started: float, code: grpc.StatusCode) -> None:
        self._metrics.in_flight.labels(self._service, self._method).dec()
        self._metrics.observe(self._service, self._method, code, time.perf_counter() - started)


def _code(context: grpc.aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> grpc.StatusCode:
    """The code set on ``context`` (by ``set_code`` or ``abort``), else ``default``."""
    code = cast("grpc.StatusCode | None", context.code())  # None until one is set
    return default if code is None else code


class MetricsEndpoint:
    """``GET /metrics`` of ``registry`` on ``host:port`` (0 picks a free port)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._render)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        self.port = int(self._runner.addresses[0][1])  # the bound port, when 0 was asked for
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _render(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
