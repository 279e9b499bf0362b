"""Client side of the router: tag the LLM calls of one workflow request.

A workflow request is a pair (workflow name, request id) carried by every call it makes, as the
HTTP headers / gRPC metadata ``x-scepsy-workflow`` and ``x-scepsy-request-id``. Open one with
``workflow_request`` (a context manager usable in sync and asyncio code; asyncio tasks started
inside it inherit it) and send its tags in one of three ways:

* explicitly, with the OpenAI SDK::

      with workflow_request("rag") as req:
          client.chat.completions.create(..., extra_headers=req.headers)
          # or: req.bind(client).chat.completions.create(...)   (OpenAI or AsyncOpenAI)

* implicitly, through an httpx client that adds the tags of the current request to every call
  (for frameworks that own the calls, e.g. LangChain's ``ChatOpenAI(http_client=...,
  http_async_client=...)``): ``tagged_http_client()``, ``tagged_async_http_client()``;

* natively over gRPC: ``RouterClient`` (asyncio) and ``SyncRouterClient`` send the current
  request's tags as metadata.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from protos.scepsy.v1 import router_pb2, router_pb2_grpc
from services.router.schema import REQUEST_ID_HEADER, WORKFLOW_HEADER
from services.runtime import channels

if TYPE_CHECKING:
    import httpx

T = TypeVar("T")
Message = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class WorkflowRequest:
    """The identity of one workflow request."""

    workflow: str
    request_id: str

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers carrying this identity."""
        return {WORKFLOW_HEADER: self.workflow, REQUEST_ID_HEADER: self.request_id}

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata carrying this identity."""
        return tuple(self.headers.items())

    def bind(self, client: T) -> T:
        """A copy of an ``openai.OpenAI``/``AsyncOpenAI`` client whose calls carry the tags."""
        bound: T = client.with_options(default_headers=self.headers)  # type: ignore[attr-defined]
        return bound


_current: ContextVar[WorkflowRequest | None] = ContextVar("scepsy_workflow_request", default=None)


@contextmanager
def workflow_request(workflow: str, request_id: str | None = None) -> Iterator[WorkflowRequest]:
    """Open a workflow request (a fresh random id unless given) for the calls made inside."""
    if not workflow:
        raise ValueError("workflow: must not be empty")
    request = WorkflowRequest(workflow, request_id or uuid.uuid4().hex)
    token = _current.set(request)
    try:
        yield request
    finally:
        _current.reset(token)


def current_request() -> WorkflowRequest | None:
    """The workflow request open in this context, if any."""
    return _current.get()


def _tag(request: httpx.Request) -> None:
    current = _current.get()
    if current is not None:
        request.headers.update(current.headers)


async def _tag_async(request: httpx.Request) -> None:
    _tag(request)


def tagged_http_client(**kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` (arguments as for it) tagging each request with the current
    workflow request."""
    import httpx

    return httpx.Client(event_hooks={"request": [_tag]}, **kwargs)


def tagged_async_http_client(**kwargs: Any) -> httpx.AsyncClient:
    """The asyncio counterpart of ``tagged_http_client``."""
    import httpx

    return httpx.AsyncClient(event_hooks={"request": [_tag_async]}, **kwargs)


def generate_request(
    model: str,
    *,
    prompt: str = "",
    messages: Sequence[Message] = (),
    max_tokens: int = 0,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    extra_json: str = "",
) -> router_pb2.GenerateRequest:
    """A ``GenerateRequest``: a completion of ``prompt`` or a chat of ``messages``."""
    return router_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        messages=[router_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        max_tokens=max_tokens,
        temperature=temperature,
        stop=list(stop),
        extra_json=extra_json,
    )


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    current = _current.get()
    tags = current.metadata if current is not None else ()
    return tags + ((("authorization", f"Bearer {api_key}"),) if api_key else ())


class RouterClient:
    """asyncio gRPC client of ``scepsy.v1.Router``; use as ``async with RouterClient(target)``."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self._channel = channels.aio_channel(target)  # TLS per SCEPSY_TLS_* (channels)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._api_key = api_key

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self, request: router_pb2.GenerateRequest, deadline_s: float | None = None
    ) -> router_pb2.GenerateResponse:
        response: router_pb2.GenerateResponse = await self._stub.Generate(
            request, metadata=_metadata(self._api_key), timeout=deadline_s
        )
        return response

    async def generate_stream(
        self, request: router_pb2.GenerateRequest, deadline_s: float | None = None
    ) -> AsyncIterator[router_pb2.GenerateChunk]:
        call = self._stub.GenerateStream(
            request, metadata=_metadata(self._api_key), timeout=deadline_s
        )
        async for chunk in call:
            yield chunk

    async def list_models(self) -> list[str]:
        reply = await self._stub.ListModels(
            router_pb2.ListModelsRequest(), metadata=_metadata(self._api_key)
        )
        return list(reply.models)


class SyncRouterClient:
    """Blocking gRPC client of ``scepsy.v1.Router``; use as ``with SyncRouterClient(target)``."""

    def __init__(self, target: str, api_key: str | None = None) -> None:
        self._channel = channels.channel(target)  # TLS per SCEPSY_TLS_* (channels)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self._api_key = api_key

    def __enter__(self) -> SyncRouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self, request: router_pb2.GenerateRequest, deadline_s: float | None = None
    ) -> router_pb2.GenerateResponse:
        response: router_pb2.GenerateResponse = self._stub.Generate(
            request, metadata=_metadata(self._api_key), timeout=deadline_s
        )
        return response

    def generate_stream(
        self, request: router_pb2.GenerateRequest, deadline_s: float | None = None
    ) -> Iterator[router_pb2.GenerateChunk]:
        yield from self._stub.GenerateStream(
            request, metadata=_metadata(self._api_key), timeout=deadline_s
        )

    def list_models(self) -> list[str]:
        reply = self._stub.ListModels(
            router_pb2.ListModelsRequest(), metadata=_metadata(self._api_key)
        )
        return list(reply.models)
