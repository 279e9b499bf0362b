"""One HTTP call to an engine's OpenAI-compatible API, and what the router learns from it.

``Upstream`` wraps an open aiohttp response. Non-streamed answers are read whole (``read``);
streamed ones are read as server-sent events (``events``), each yielded as its raw bytes with the
JSON payload parsed. On the way, token usage and the time of the first token are noted for the
trace. An answer is ``complete`` once the whole body (or the ``[DONE]`` event) was read.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from services.router.errors import UpstreamError
from services.router.registry import Replica

DONE = b"[DONE]"


@dataclass(slots=True)
class Event:
    """One SSE event: its bytes as received (``data: ...\\n\\n``) and its parsed payload
    (None for ``[DONE]`` and for payloads that are not JSON)."""

    raw: bytes
    payload: dict[str, Any] | None
    done: bool = False


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
        self._started = started

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self._started

    async def read(self) -> bytes:
        """The whole body; usage is taken from it when it is a JSON completion."""
        try:
            body = await self.response.read()
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"replica {self.replica.id}: answer broke off: {exc}") from exc
        self.complete = True
        if self.ok:
            with contextlib.suppress(ValueError):
                self._note_usage(json.loads(body))
        return body

    async def events(self) -> AsyncIterator[Event]:
        """The SSE events of a streamed answer, as they arrive."""
        lines: list[bytes] = []
        try:
            async for line in self.response.content:
                if line.strip():
                    lines.append(line)
                    continue
                if not lines:
                    continue
                event = self._event(b"".join(lines) + b"\n")
                lines = []
                yield event
                if event.done:
                    self.complete = True
                    return
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"replica {self.replica.id}: stream broke off: {exc}") from exc
        if lines:
            yield self._event(b"".join(lines) + b"\n")
        raise UpstreamError(f"replica {self.replica.id}: stream ended without [DONE]")

    def _event(self, raw: bytes) -> Event:
        data = b"".join(line[5:].strip() for line in raw.splitlines() if line.startswith(b"data:"))
        if data == DONE:
            return Event(raw, None, done=True)
        try:
            payload = json.loads(data)
        except ValueError:
            return Event(raw, None)
        if not isinstance(payload, dict):
            return Event(raw, None)
        if self.first_token_at is None and _has_token(payload):
            self.first_token_at = time.monotonic()
        self._note_usage(payload)
        return Event(raw, payload)

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


def _has_token(payload: dict[str, Any]) -> bool:
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
