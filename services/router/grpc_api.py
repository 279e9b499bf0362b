"""The gRPC front end: ``scepsy.v1.Router`` over the same dispatcher as the HTTP one.

A ``GenerateRequest`` with ``messages`` becomes a chat completion, one with ``prompt`` a text
completion; ``extra_json`` adds further OpenAI fields. With ``n`` > 1 every sequence is a
separate ``Choice``, and a stream's chunks carry their choice's ``index``. The workflow identity
and the API key come from metadata (``x-scepsy-workflow``, ``x-scepsy-request-id``,
``authorization: Bearer <key>``); the client's deadline bounds the engine call. Errors: unknown
model NOT_FOUND, bad input INVALID_ARGUMENT, key UNAUTHENTICATED, overload RESOURCE_EXHAUSTED
with trailing metadata ``retry-after-ms``, deadline DEADLINE_EXCEEDED, engine unreachable
UNAVAILABLE, a draining router UNAVAILABLE with ``retry-after-ms``; an engine's error answer
maps from its HTTP status. Bytes that do not decode as the request message are INVALID_ARGUMENT
(the shared error mapping, ``services.runtime.errors``, as in every service).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from protos.scepsy.v1 import router_pb2, router_pb2_grpc
from services.core.errors import ScepsyError
from services.router.auth import ApiKeys
from services.router.dispatch import CallSpec, Dispatcher
from services.router.errors import (
    DrainingError,
    OverloadedError,
    UpstreamStatusError,
    grpc_status,
)
from services.router.registry import ReplicaRegistry
from services.router.schema import (
    PATHS,
    REQUEST_ID_HEADER,
    WORKFLOW_HEADER,
    InvalidFieldError,
    identity_of,
    parse_json,
    validate_body,
    with_usage,
)

_RESERVED = frozenset({"model", "prompt", "messages", "stream", "stream_options"})

Context = grpc.aio.ServicerContext[Any, Any]


def request_body(request: router_pb2.GenerateRequest) -> tuple[str, dict[str, Any]]:
    """The engine API path and JSON body of a ``GenerateRequest``; ``InvalidFieldError``."""
    if bool(request.prompt) == bool(request.messages):
        raise InvalidFieldError("prompt", "set exactly one of 'prompt' and 'messages'")
    body: dict[str, Any] = {"model": request.model, "temperature": request.temperature}
    if request.messages:
        path = PATHS["chat"]
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        path = PATHS["completions"]
        body["prompt"] = request.prompt
    if request.max_tokens:
        body["max_tokens"] = request.max_tokens
    if request.top_p:
        body["top_p"] = request.top_p
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed:
        body["seed"] = request.seed
    if request.extra_json:
        body.update(_extra(request.extra_json))
    validate_body(body, "chat" if request.messages else "completions")
    return path, body


def _extra(text: str) -> dict[str, Any]:
    extra = parse_json(text, "'extra_json'", "extra_json")
    if not isinstance(extra, dict):
        raise InvalidFieldError("extra_json", "'extra_json' must be a JSON object")
    clash = sorted(_RESERVED & set(extra))
    if clash:
        raise InvalidFieldError("extra_json", f"'extra_json' may not set {', '.join(clash)}")
    return extra


def _text_of(choice: dict[str, Any]) -> str:
    message = choice.get("message") or choice.get("delta")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def _choices(payload: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The choices of an engine answer or stream event (each with an int ``index``)."""
    choices = (payload or {}).get("choices")
    if not isinstance(choices, list):
        return []
    return [c for c in choices if isinstance(c, dict) and _is_index(c.get("index", 0))]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _upstream_failure(status: int, answer: bytes) -> UpstreamStatusError:
    try:
        message = json.loads(answer)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = answer[:200].decode(errors="replace")
    return UpstreamStatusError(f"engine answered {status}: {message}", status)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, dispatcher: Dispatcher, registry: ReplicaRegistry, keys: ApiKeys) -> None:
        self._dispatcher = dispatcher
        self._registry = registry
        self._keys = keys

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: Context
    ) -> router_pb2.GenerateResponse:
        try:
            spec = self._spec(request, context, stream=False)
            upstream, answer = await self._dispatcher.fetch(spec)
            if not upstream.ok:
                raise _upstream_failure(upstream.status, answer)
            choices = sorted(
                (
                    router_pb2.Choice(
                        index=c.get("index", 0),
                        text=_text_of(c),
                        finish_reason=str(c.get("finish_reason") or ""),
                    )
                    for c in _choices(json.loads(answer))
                ),
                key=lambda c: c.index,
            )
            first = choices[0] if choices else router_pb2.Choice()
            return router_pb2.GenerateResponse(
                id=upstream.call_id,
                model=request.model,
                text=first.text,
                finish_reason=first.finish_reason,
                usage=router_pb2.Usage(
                    prompt_tokens=upstream.prompt_tokens,
                    completion_tokens=upstream.completion_tokens,
                ),
                choices=choices,
            )
        except ScepsyError as exc:
            await _abort(context, exc)

    async def GenerateStream(
        self, request: router_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        try:
            spec = self._spec(request, context, stream=True)
            finish_reasons: dict[int, str] = {0: ""}  # choice index -> its finish reason
            async with self._dispatcher.call(spec) as upstream:
                if not upstream.ok:
                    raise _upstream_failure(upstream.status, await upstream.read())
                async for event in upstream.events():
                    for choice in _choices(event.payload):
                        index = choice.get("index", 0)
                        reason = str(choice.get("finish_reason") or "")
                        finish_reasons[index] = reason or finish_reasons.get(index, "")
                        text = _text_of(choice)
                        if text:
                            yield router_pb2.GenerateChunk(text=text, index=index)
                usage = router_pb2.Usage(
                    prompt_tokens=upstream.prompt_tokens,
                    completion_tokens=upstream.completion_tokens,
                )
            # One closing chunk per choice, in index order; the last also carries the usage.
            *others, last = sorted(finish_reasons)
            for index in others:
                yield router_pb2.GenerateChunk(finish_reason=finish_reasons[index], index=index)
            yield router_pb2.GenerateChunk(
                finish_reason=finish_reasons[last], usage=usage, index=last
            )
        except ScepsyError as exc:
            await _abort(context, exc)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: Context
    ) -> router_pb2.ListModelsResponse:
        try:
            self._keys.check(_metadata(context).get("authorization"))
        except ScepsyError as exc:
            await _abort(context, exc)
        return router_pb2.ListModelsResponse(models=self._registry.models())

    def _spec(
        self, request: router_pb2.GenerateRequest, context: Context, *, stream: bool
    ) -> CallSpec:
        metadata = _metadata(context)
        self._keys.check(metadata.get("authorization"))
        identity = identity_of(metadata.get(WORKFLOW_HEADER), metadata.get(REQUEST_ID_HEADER))
        path, body = request_body(request)
        if stream:
            body, _ = with_usage({**body, "stream": True})
        return CallSpec(
            request.model, path, body, stream, identity, "grpc", timeout_s=context.time_remaining()
        )


def _metadata(context: Context) -> dict[str, str]:
    pairs = context.invocation_metadata() or ()
    return {
        str(key).lower(): value if isinstance(value, str) else value.decode(errors="replace")
        for key, value in pairs
    }


async def _abort(context: Context, exc: ScepsyError) -> NoReturn:
    trailing: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, (OverloadedError, DrainingError)):
        trailing = (("retry-after-ms", str(int(exc.retry_after_s * 1000))),)
    await context.abort(grpc_status(exc), str(exc), trailing_metadata=trailing)
    raise AssertionError("unreachable: abort raises")
