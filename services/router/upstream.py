"""One HTTP call to an engine's OpenAI-compatible API, and what the router learns from it.

``Upstream`` wraps an open ``Http1Response`` (``services.router.http1``). Non-streamed answers are
read whole (``read``); streamed ones as server-sent events, a network read at a time
(``batches``: the complete events that arrived together, as one ``Batch`` of raw bytes, forwarded
as they are; ``pipe``: the same batches handed to a callback straight from the network callback,
which is how the HTTP front end forwards streams) or one by one (``events``). A batch is not
split into events unless something in it must be looked at: the events before the first token
(its time is noted for the trace) and an event carrying a ``usage`` object (token counts for the
trace; a client that did not ask for usage does not get the usage-only event the router asked
for). The ``[DONE]`` event is the last one, so it is found at the end of a batch. An answer is
``complete`` once the whole body (or the ``[DONE]`` event) was read.

The dispatcher can end a call from outside (``abort``: its replica was ejected, or its stream
sat idle too long); the reader then gets ``UpstreamAbortedError`` naming the reason.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from services.router.errors import UpstreamAbortedError, UpstreamError
from services.router.http1 import Http1Error, Http1Response
from services.router.registry import Replica

DONE = b"[DONE]"
_monotonic = time.monotonic
_USAGE = b'"usage"'
_NULL_USAGE = (b'"usage":null', b'"usage": null')


class Event:
    """One SSE event: its bytes as received (``data: ...\\n\\n``) and its data; ``payload`` is
    the data parsed as a JSON object (None for ``[DONE]`` and for data that is not one)."""

    __slots__ = ("_parsed", "data", "done", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        if raw.startswith(b"data:") and raw.count(b"\n") <= 2:
            data = raw[5:].strip()  # the usual event: one data line
        else:
            lines = raw.split(b"\n")
            data = b"\n".join(line[5:].strip() for line in lines if line.startswith(b"data:"))
        self.data = data
        self.done = data == DONE
        self._parsed: dict[str, Any] | bool | None = False  # False: not parsed yet

    @property
    def payload(self) -> dict[str, Any] | None:
        if self._parsed is False:
            self._parsed = _json_object(self.data) if not self.done else None
        return self._parsed  # type: ignore[return-value]

    @property
    def has_usage(self) -> bool:
        """True when the event may carry a ``usage`` object (not ``"usage": null``)."""
        return _has_usage(self.data)

    @property
    def usage_only(self) -> bool:
        """A usage event without choices (the one ``include_usage`` asks for)."""
        payload = self.payload
        return (
            payload is not None and not payload.get("choices") and payload.get("usage") is not None
        )


def _has_usage(data: bytes) -> bool:
    count = data.count(_USAGE)
    return count > 0 and count > sum(data.count(null) for null in _NULL_USAGE)


class Batch:
    """The complete SSE events of one network read, as bytes (``raw``); ``done`` when the
    ``[DONE]`` event is among them; ``events`` splits them when asked."""

    __slots__ = ("_events", "done", "raw", "usage")

    def __init__(
        self,
        raw: bytes,
        done: bool,
        events: list[Event] | None = None,
        usage: bool | None = None,
    ) -> None:
        self.raw = raw
        self.done = done
        self._events = events
        # whether an event may carry a usage object (None: not looked at yet)
        self.usage = usage

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            self._events = [Event(part + b"\n\n") for part in self.raw.split(b"\n\n") if part]
        return self._events

    def without_usage_only(self) -> bytes:
        """The raw bytes without the usage-only event (for a client that did not ask for it)."""
        usage = self.usage
        if usage is None:
            usage = self.usage = _has_usage(self.raw)
        if not usage:
            return self.raw
        return b"".join([e.raw for e in self.events if not (e.has_usage and e.usage_only)])


class Upstream:
    def __init__(
        self, replica: Replica, response: Http1Response, started: float, call_id: str
    ) -> None:
        self.replica = replica
        self.call_id = call_id
        self.response = response
        self.status = response.status
        self.content_type = response.headers.get("content-type", "application/json")
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.complete = False
        # monotonic time of the answer's headers, then of each network read of a stream's body
        # (the dispatcher's idle watchdog watches it)
        self.read_at = time.monotonic()
        self._buffer = b""  # a streamed body's unfinished event
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
        except Http1Error as exc:
            raise self._broken("answer broke off", exc) from exc
        if self.abort_reason is not None:
            raise self._broken("answer broke off")
        self.complete = True
        if self.ok and _USAGE in body:
            self._note_usage(_json_object(body))
        return body

    async def batches(self) -> AsyncIterator[Batch]:
        """The SSE events of a streamed answer, as they arrive: the complete events of each
        network read together (never an empty batch). The answer is ``complete`` when the
        batch holding ``[DONE]`` is handed out."""
        response = self.response
        try:
            while True:
                data = await response.readany()
                if not data:
                    break
                batch = self._read(data)
                if batch is None:
                    continue
                yield batch
                if batch.done:
                    return
        except Http1Error as exc:
            raise self._broken("stream broke off", exc) from exc
        batch = self._tail()
        if batch is not None:
            yield batch
            if batch.done:
                return
        raise self._broken("stream ended without [DONE]")

    async def pipe(
        self, send: Callable[[Batch], bool], drain: Callable[[], Awaitable[None]]
    ) -> None:
        """The streamed answer's batches handed to ``send`` as they arrive, as ``batches``
        yields them, but called straight from the network callback: no task switch, future or
        generator step per read. ``send`` returns False when its client reads slower than the
        engine writes: reading pauses until ``drain`` returns. Returns once the batch holding
        ``[DONE]`` was sent (the answer is ``complete``); raises as ``batches`` does, and
        whatever ``send`` raised."""
        response = self.response

        def on_data(data: bytes) -> None:
            batch = self._read(data)
            if batch is None:
                return
            if batch.done:
                response.unpipe()
            if not send(batch) and not batch.done:
                response.pause()

        try:
            while await response.pipe(on_data) == "paused":
                await drain()
                response.resume()
        except Http1Error as exc:
            raise self._broken("stream broke off", exc) from exc
        if self.complete:
            return
        batch = self._tail()
        if batch is not None:
            send(batch)
            if batch.done:
                return
        raise self._broken("stream ended without [DONE]")

    def _read(self, data: bytes) -> Batch | None:
        """The batch of complete events that ``data`` (one network read) completes, None when
        it completes none; an event's unfinished rest waits for the next read."""
        self.read_at = _monotonic()
        self.replica.activity += 1
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if self._buffer:
            data = self._buffer + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return None
        end += 2
        if end == len(data):
            ready, self._buffer = data, b""
        else:
            ready, self._buffer = data[:end], data[end:]
        return self._counted(self._batch(ready))

    def _tail(self) -> Batch | None:
        """The last event when the body ended without its closing blank line."""
        rest, self._buffer = self._buffer, b""
        if not rest.strip():
            return None
        return self._counted(self._batch(rest.rstrip(b"\n") + b"\n\n"))

    def _counted(self, batch: Batch | None) -> Batch | None:
        if batch is not None and batch.done:
            self.complete = True
        return batch

    def _batch(self, ready: bytes) -> Batch | None:
        """A batch of ``ready`` (complete events), noting the first token and usage."""
        done = ready.endswith(b"[DONE]\n\n")
        events: list[Event] | None = None
        if self.first_token_at is None:
            events = [Event(part + b"\n\n") for part in ready.split(b"\n\n") if part]
            if not events:
                return None
            if any(_has_token(e.payload) for e in events if not e.done):
                self.first_token_at = time.monotonic()
        usage = _has_usage(ready)
        if usage:
            if events is None:
                events = [Event(part + b"\n\n") for part in ready.split(b"\n\n") if part]
            for event in events:
                if event.has_usage:
                    self._note_usage(event.payload)
        if events is not None:
            done = any(e.done for e in events)
        elif done:  # [DONE] is the last event: only the last one is looked at
            start = ready.rfind(b"\n\n", 0, len(ready) - 2)
            done = Event(ready[start + 2 if start >= 0 else 0 :]).done
        return Batch(ready, done, events, usage)

    async def events(self) -> AsyncIterator[Event]:
        """The SSE events of a streamed answer, one by one, as they arrive."""
        async for batch in self.batches():
            for event in batch.events:
                yield event

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
