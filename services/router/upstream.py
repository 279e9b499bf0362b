"""One HTTP call to an engine's OpenAI-compatible API, and what the router learns from it.

``Upstream`` wraps an open aiohttp response. Non-streamed answers are read whole (``read``);
streamed ones are read as server-sent events, a network read at a time (``batches``: the
complete events that arrived together, forwarded together) or one by one (``events``). Each
event keeps its raw bytes; its JSON payload is parsed only when asked for (``Event.payload``),
so forwarding a stream costs a few byte searches per chunk. On the way, token usage (the events
that carry a ``usage`` object) and the time of the first token are noted for the trace. An
answer is ``complete`` once the whole body (or the ``[DONE]`` event) was read.

The dispatcher can end a call from outside (``abort``: its replica was ejected, or its stream
sat idle too long); the reader then gets ``UpstreamAbortedError`` naming the reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from services.router.errors import UpstreamAbortedError, UpstreamError
from services.router.registry import Replica

DONE = b"[DONE]"
_NULL_USAGE = (b'"usage":null', b'"usage": null')


class Event:
    """One SSE event: its bytes as received (``data: ...\\n\\n``) and its data; ``payload`` is
    the data parsed as a JSON object (None for ``[DONE]`` and for data that is not one)."""

    __slots__ = ("_parsed", "data", "done", "raw")

    def __init__(self, raw: bytes, data: bytes, done: bool = False) -> None:
        self.raw = raw
        self.data = data
        self.done = done
        self._parsed: dict[str, Any] | bool | None = False  # False: not parsed yet

    @property
    def payload(self) -> dict[str, Any] | None:
        if self._parsed is False:
            self._parsed = _json_object(self.data) if not self.done else None
        return self._parsed  # type: ignore[return-value]

    @property
    def has_usage(self) -> bool:
        """True when the event may carry a ``usage`` object (not ``"usage": null``)."""
        data = self.data
        return b'"usage"' in data and not any(null in data for null in _NULL_USAGE)


class Upstream:
    def __init__(
        self, replica: Replica, response: aiohttp.ClientResponse, started: float, call_id: str
    ) -> None:
        self.replica = replica
        self.call_id = call_id
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", "application/json")
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.complete = False
        self.progress = 0  # network reads of the body so far (the idle watchdog watches it)
        self.abort_reason: str | None = None
        self._started = started

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self._started

    def abort(self, reason: str) -> None:
        """End the call now (from another task): the reader raises ``UpstreamAbortedError``."""
        if self.abort_reason is None and not self.complete:
            self.abort_reason = reason
            self.response.close()

    def _broken(self, what: str, exc: BaseException | None = None) -> UpstreamError:
        if self.abort_reason is not None:
            return UpstreamAbortedError(f"replica {self.replica.id}: {self.abort_reason}")
        detail = f": {exc}" if exc is not None else ""
        return UpstreamError(f"replica {self.replica.id}: {what}{detail}")

    async def read(self) -> bytes:
        """The whole body; usage is taken from it when it is a JSON completion."""
        try:
            body = await self.response.read()
        except aiohttp.ClientError as exc:
            raise self._broken("answer broke off", exc) from exc
        if self.abort_reason is not None:
            raise self._broken("answer broke off")
        self.complete = True
        if self.ok:
            self._note_usage(_json_object(body))
        return body

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The SSE events of a streamed answer, as they arrive: the complete events of each
        network read together (never an empty list)."""
        buffer = b""
        content = self.response.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    break
                self.progress += 1
                self.replica.activity += 1
                if b"\r" in data:
                    data = data.replace(b"\r\n", b"\n")
                buffer += data
                end = buffer.rfind(b"\n\n")
                if end < 0:
                    continue
                ready, buffer = buffer[: end + 2], buffer[end + 2 :]
                events = [self._event(part + b"\n\n") for part in ready.split(b"\n\n") if part]
                if not events:
                    continue
                yield events
                if events[-1].done or any(e.done for e in events):
                    self.complete = True
                    return
        except aiohttp.ClientError as exc:
            raise self._broken("stream broke off", exc) from exc
        if buffer.strip():
            yield [self._event(buffer.rstrip(b"\n") + b"\n\n")]
        raise self._broken("stream ended without [DONE]")

    async def events(self) -> AsyncIterator[Event]:
        """The SSE events of a streamed answer, one by one, as they arrive."""
        async for batch in self.batches():
            for event in batch:
                yield event

    def _event(self, raw: bytes) -> Event:
        lines = raw.split(b"\n")
        data = b"".join(line[5:].strip() for line in lines if line.startswith(b"data:"))
        if data == DONE:
            return Event(raw, data, done=True)
        event = Event(raw, data)
        if self.first_token_at is None and _has_token(event.payload):
            self.first_token_at = time.monotonic()
        if event.has_usage:
            self._note_usage(event.payload)
        return event

    def _note_usage(self, payload: Any) -> None:
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if isinstance(usage, dict):
            self.prompt_tokens = _count(usage.get("prompt_tokens"), self.prompt_tokens)
            self.completion_tokens = _count(usage.get("completion_tokens"), self.completion_tokens)

    def release(self) -> None:
        """Give the connection back to the pool, or close it when the answer was not read
        through (which is how an engine learns that a call was abandoned)."""
        if self.complete:
            self.response.release()
        else:
            self.response.close()


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _has_token(payload: dict[str, Any] | None) -> bool:
    if payload is None:
        return False
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and delta.get("content"):
            return True
        if choice.get("text"):
            return True
    return False


def _count(value: Any, default: int) -> int:
    valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if valid else default
