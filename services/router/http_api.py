"""The OpenAI-compatible HTTP front end (``services.router.http_server``).

| route | |
|---|---|
| ``POST /v1/chat/completions``, ``/v1/completions`` | streamed (SSE) or not, to a replica |
| ``GET /v1/models`` | models with a registered replica |
| ``GET /metrics`` | Prometheus text (an API key only with ``metrics_auth``) |
| ``GET /health`` | 200 while serving, 503 while draining |

Errors are OpenAI-shaped JSON, ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status as ``code`` (as vLLM answers), for the router's own failures (bad input, JSON nested too
deep, unknown model or path, 401, 405, 413, 429 with ``Retry-After``, 502, 503 (with
``Retry-After`` while draining), 504); an engine's error answer is forwarded as it is. An error
after a stream has begun is sent as a last ``data: {"error": ...}`` event. A client that
disconnects cancels its handler, and with it the engine call.
"""

from __future__ import annotations

import json
import math

import orjson

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
from services.router.http_server import HttpError, HttpServer, Request, Response, Stream
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
from services.router.upstream import Batch, Upstream
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


def _error_response(exc: ScepsyError) -> Response:
    mapped = http_error(exc)
    headers = {}
    if isinstance(exc, (OverloadedError, DrainingError)):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    param = exc.param if isinstance(exc, InvalidFieldError) else None
    if isinstance(exc, ModelNotFoundError):
        param = "model"
    return Response(
        mapped.status, error_body(str(exc), mapped.type, param, mapped.status), headers=headers
    )


def _on_error(exc: BaseException) -> Response:
    """The answer to an exception a handler raised (or a request the server refused)."""
    if isinstance(exc, ScepsyError):
        return _error_response(exc)
    if isinstance(exc, HttpError):
        type_ = _STATUS_TYPES.get(exc.status, "invalid_request_error")
        return Response(exc.status, error_body(str(exc), type_, None, exc.status))
    log.error("http_handler_failed", exc_info=exc)
    return Response(500, error_body("internal error in the router", "server_error", None, 500))


def _not_found(path: str) -> Response:
    return Response(404, error_body(f"no route {path}", "invalid_request_error", None, 404))


def _not_allowed(method: str, allowed: list[str]) -> Response:
    return Response(
        405,
        error_body(f"method {method} not allowed", "invalid_request_error", None, 405),
        headers={"Allow": ", ".join(allowed)},
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
        self._server: HttpServer | None = None
        self.port = 0
        # False from the start of a drain: /health answers 503 while calls are still served
        self.serving = True

    def server(self) -> HttpServer:
        server = HttpServer(_on_error, self._config.max_body_bytes, _not_found, _not_allowed)
        server.add("POST", "/v1/chat/completions", self._chat)
        server.add("POST", "/v1/completions", self._completions)
        server.add("GET", "/v1/models", self._models)
        server.add("GET", "/metrics", self._render_metrics)
        server.add("GET", "/health", self._health)
        return server

    async def start(self) -> int:
        self._server = self.server()
        host, port = self._config.resolved_http_host, self._config.http_port
        try:
            self.port = await self._server.start(host, port)  # the bound port, when 0 was asked
        except OSError as exc:
            await self.stop()
            raise UnavailableError(
                f"http_port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace_s``), close."""
        if self._server is not None:
            await self._server.stop(self._config.grace_s)
            self._server = None

    # ------------------------------------------------------------------- routes
    async def _chat(self, request: Request) -> Response | Stream:
        return await self._generate(request, "chat")

    async def _completions(self, request: Request) -> Response | Stream:
        return await self._generate(request, "completions")

    async def _models(self, request: Request) -> Response:
        self._keys.check(request.headers.get("authorization"))
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
        return Response(200, orjson.dumps({"object": "list", "data": data}))

    async def _render_metrics(self, request: Request) -> Response:
        if self._config.metrics_auth:
            self._keys.check(request.headers.get("authorization"))
        return Response(200, self._metrics.render(), content_type=CONTENT_TYPE)

    async def _health(self, request: Request) -> Response:
        if self._dispatcher.draining or not self.serving:
            retry_after = str(max(1, math.ceil(self._config.retry_after_s)))
            return Response(503, b'{"status": "draining"}', headers={"Retry-After": retry_after})
        return Response(200, b'{"status": "serving"}')

    async def _generate(self, request: Request, kind: Kind) -> Response | Stream:
        headers = request.headers
        self._keys.check(headers.get("authorization"))
        body = parse_json_body(request.body)
        validate_body(body, kind)
        identity = identity_of(headers.get(WORKFLOW_HEADER), headers.get(REQUEST_ID_HEADER))
        stream = body.get("stream") is True
        client_wants_usage = True
        if stream:
            body, client_wants_usage = with_usage(body)
        spec = CallSpec(body["model"], PATHS[kind], body, stream, identity, "http")
        if stream:
            return await self._stream(request, spec, client_wants_usage)
        upstream, answer = await self._dispatcher.fetch(spec)
        return Response(upstream.status, answer, None, _headers(upstream))

    async def _stream(
        self, request: Request, spec: CallSpec, client_wants_usage: bool
    ) -> Response | Stream:
        response: Stream | None = None
        try:
            async with self._dispatcher.call(spec) as upstream:
                if not upstream.ok:
                    answer = await upstream.read()
                    return Response(upstream.status, answer, None, _headers(upstream))
                # the head goes out with the first events
                stream = response = request.stream(200, _stream_headers(upstream))

                def send(batch: Batch) -> bool:
                    # the events of each network read are forwarded together, from the network
                    # callback, as they arrive; the last ones with the end of the body
                    data = batch.raw if client_wants_usage else batch.without_usage_only()
                    if batch.done:
                        stream.end(data)
                        return True
                    return stream.send(data)

                await upstream.pipe(send, stream.drain)
                return response
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
