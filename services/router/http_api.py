"""The OpenAI-compatible HTTP front end (aiohttp).

| route | |
|---|---|
| ``POST /v1/chat/completions``, ``/v1/completions`` | streamed (SSE) or not, to a replica |
| ``GET /v1/models`` | models with a registered replica |
| ``GET /metrics`` | Prometheus text (an API key only with ``metrics_auth``) |
| ``GET /health`` | 200 while serving, 503 while draining |

Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status as ``code`` (as vLLM answers), for the router's own failures (bad input, JSON nested too
deep, unknown model, 401, 413, 429 with ``Retry-After``, 502, 503 (with ``Retry-After`` while
draining), 504); an engine's error answer
is forwarded as it is. An error after a stream has begun is sent
as a last ``data: {"error": ...}`` event. A client that disconnects cancels its handler, and with
it the engine call.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from services.core.errors import ScepsyError, UnavailableError
from services.router.auth import ApiKeys
from services.router.config import RouterConfig
from services.router.dispatch import CallSpec, Dispatcher
from services.router.errors import (
    DrainingError,
    ModelNotFoundError,
    OverloadedError,
    http_error,
)
from services.router.metrics import CONTENT_TYPE, RouterMetrics
from services.router.registry import ReplicaRegistry
from services.router.schema import (
    PATHS,
    REQUEST_ID_HEADER,
    WORKFLOW_HEADER,
    InvalidFieldError,
    Kind,
    identity_of,
    parse_json_body,
    validate_body,
    with_usage,
)
from services.router.upstream import Upstream
from services.runtime.logging import get_logger

log = get_logger(__name__)

_STATUS_TYPES = {
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(message: str, type_: str, param: str | None, code: int) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    ).encode()


def _error_response(exc: ScepsyError) -> web.Response:
    mapped = http_error(exc)
    headers = {}
    if isinstance(exc, (OverloadedError, DrainingError)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    param = exc.param if isinstance(exc, InvalidFieldError) else None
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    return web.Response(
        status=mapped.status,
        body=error_body(str(exc), mapped.type, param, mapped.status),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ScepsyError as exc:
        return _error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.Response(
            status=exc.status,
            body=error_body(
                exc.text or exc.reason, _STATUS_TYPES.get(exc.status, "error"), None, exc.status
            ),
            content_type="application/json",
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except Exception:
        log.exception("http_handler_failed", path=request.path)
        return web.Response(
            status=500,
            body=error_body("internal error in the router", "server_error", None, 500),
            content_type="application/json",
        )


class HttpFrontEnd:
    def __init__(
        self,
        config: RouterConfig,
        dispatcher: Dispatcher,
        registry: ReplicaRegistry,
        metrics: RouterMetrics,
        keys: ApiKeys,
    ) -> None:
        self._config = config
        self._dispatcher = dispatcher
        self._registry = registry
        self._metrics = metrics
        self._keys = keys
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = 0
        # False from the start of a drain: /health answers 503 while calls are still served
        self.serving = True

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes, middlewares=[_errors])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._render_metrics)
        app.router.add_get("/health", self._health)
        return app

    async def start(self) -> int:
        # handler_cancellation: a client that disconnects cancels its handler (and engine call).
        self._runner = web.AppRunner(
            self.app(),
            handler_cancellation=True,
            shutdown_timeout=self._config.grace_s,
            access_log=None,
        )
        await self._runner.setup()
        host, port = self._config.resolved_http_host, self._config.http_port
        self._site = web.TCPSite(self._runner, host, port)
        try:
            await self._site.start()
        except OSError as exc:
            await self.stop()
            raise UnavailableError(
                f"http_port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._runner.addresses[0][1])  # the bound port, when 0 was asked for
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------- routes
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _models(self, request: web.Request) -> web.Response:
        self._keys.check(request.headers.get("Authorization"))
        # the engine's own entry (max_model_len, root, ...) once a health check has read it
        data = [
            {
                "object": "model",
                "created": 0,
                "owned_by": "scepsy",
                **(self._registry.model_info(m) or {}),
                "id": m,
            }
            for m in self._registry.models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _render_metrics(self, request: web.Request) -> web.Response:
        if self._config.metrics_auth:
            self._keys.check(request.headers.get("Authorization"))
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _health(self, request: web.Request) -> web.Response:
        if self._dispatcher.draining or not self.serving:
            retry_after = str(max(1, math.ceil(self._config.retry_after_s)))
            return web.json_response(
                {"status": "draining"}, status=503, headers={"Retry-After": retry_after}
            )
        return web.json_response({"status": "serving"})

    async def _generate(self, request: web.Request, kind: Kind) -> web.StreamResponse:
        self._keys.check(request.headers.get("Authorization"))
        body = parse_json_body(await request.read())
        validate_body(body, kind)
        identity = identity_of(
            request.headers.get(WORKFLOW_HEADER), request.headers.get(REQUEST_ID_HEADER)
        )
        stream = body.get("stream") is True
        client_wants_usage = True
        if stream:
            body, client_wants_usage = with_usage(body)
        spec = CallSpec(body["model"], PATHS[kind], body, stream, identity, "http")
        if stream:
            return await self._stream(request, spec, client_wants_usage)
        upstream, answer = await self._dispatcher.fetch(spec)
        return web.Response(body=answer, status=upstream.status, headers=_headers(upstream))

    async def _stream(
        self, request: web.Request, spec: CallSpec, client_wants_usage: bool
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async with self._dispatcher.call(spec) as upstream:
                if not upstream.ok:
                    answer = await upstream.read()
                    return web.Response(
                        body=answer, status=upstream.status, headers=_headers(upstream)
                    )
                response = _EventStream(headers=_stream_headers(upstream))
                await response.prepare(request)  # the headers go out with the first events
                # the events of each network read are forwarded together, as they arrive; the
                # last ones with the end of the body, in one write
                async for batch in upstream.batches():
                    data = batch.raw if client_wants_usage else batch.without_usage_only()
                    if batch.done:
                        await response.write_eof(data)
                        return response
                    if data:
                        await response.write(data)
        except ScepsyError as exc:
            if response is None:
                raise
            mapped = http_error(exc)
            payload = error_body(str(exc), mapped.type, None, mapped.status)
            await response.write(b"data: " + payload + b"\n\n")
        except ConnectionResetError:
            if response is None:
                raise
            return response  # the client went away while we wrote to it
        assert response is not None
        await response.write_eof()
        return response


class _EventStream(web.StreamResponse):
    """A streamed answer whose headers wait for its first bytes, so that they leave in one
    socket write (aiohttp sends a plain ``StreamResponse``'s headers on ``prepare``)."""

    _send_headers_immediately = False


def _headers(upstream: Upstream) -> dict[str, str]:
    return {
        "Content-Type": upstream.content_type,
        "x-scepsy-call-id": upstream.call_id,
        "x-scepsy-replica": upstream.replica.id,
    }


def _stream_headers(upstream: Upstream) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "x-scepsy-call-id": upstream.call_id,
        "x-scepsy-replica": upstream.replica.id,
    }
