"""What the router accepts: OpenAI request bodies and the workflow identity of a call.

The router checks only what it relies on (the model, streaming, the prompt or messages, and the
types of the common sampling fields) and passes every other field to the engine untouched, so
engine-specific parameters keep working; the engine validates the rest and its errors are
forwarded as they are. Every error names the offending field (``InvalidFieldError.param``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from services.core.errors import InvalidInputError
from services.core.workload.trace import UNTAGGED_WORKFLOW

WORKFLOW_HEADER = "x-scepsy-workflow"
REQUEST_ID_HEADER = "x-scepsy-request-id"
MAX_TAG_LENGTH = 256
MAX_JSON_DEPTH = 64

Kind = Literal["chat", "completions"]
PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Identity:
    """The workflow request a call belongs to (both None for an untagged call)."""

    workflow: str | None = None
    request_id: str | None = None

    @property
    def affinity(self) -> str | None:
        if self.request_id is None:
            return None
        return f"{self.workflow or UNTAGGED_WORKFLOW}/{self.request_id}"


class InvalidFieldError(InvalidInputError):
    """Raised when one field of a request is missing or has the wrong type or value."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes, limit: int) -> int:
    """How deep arrays and objects nest in ``raw`` (brackets inside strings skipped), counted up
    to ``limit + 1``. Checked before ``json.loads``, whose recursion would fail deep input with
    a ``RecursionError`` (a 500) instead of a clear 400; malformed input is left to the parser.
    Each round removes the innermost empty pairs at C speed, so no Python loop runs per byte."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    run = re.compile(rb"[\[{]{%d}" % (limit + 1))
    depth = 0
    while brackets and depth <= limit:
        if run.search(brackets):
            # That many opening brackets in a row (the common deep input, found at once, and
            # what unbalanced input leaves over).
            return limit + 1
        # Mark both kinds of innermost pair before deleting, so one round is one level.
        inner = brackets.replace(b"[]", b"\0\0").replace(b"{}", b"\0\0").replace(b"\0", b"")
        if inner == brackets:
            break  # unbalanced: the parser names the error
        brackets = inner
        depth += 1
    return min(depth, limit + 1)


def parse_json(raw: bytes | str, what: str, param: str | None) -> Any:
    """``raw`` parsed as JSON (orjson), nested at most ``MAX_JSON_DEPTH`` levels;
    ``InvalidFieldError`` naming ``what`` (e.g. "request body") otherwise. The depth is counted
    only when there are enough brackets to nest that deep (most bodies have a handful)."""
    data = raw.encode(errors="surrogatepass") if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and (
        json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH
    ):
        raise InvalidFieldError(param, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return orjson.loads(data)
    except (ValueError, RecursionError) as exc:
        raise InvalidFieldError(param, f"{what} is not valid JSON: {exc}") from None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or ``InvalidFieldError``."""
    body = parse_json(raw, "request body", None)
    if not isinstance(body, dict):
        raise InvalidFieldError(
            None, f"request body must be a JSON object, got {type(body).__name__}"
        )
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_stop(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


_OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (lambda v: isinstance(v, bool), "a boolean"),
    "max_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "max_completion_tokens": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "n": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (_is_number, "a number"),
    "top_p": (_is_number, "a number"),
    "seed": (_is_int, "an integer"),
    "stop": (_is_stop, "a string or a list of strings"),
    "stream_options": (lambda v: isinstance(v, dict), "an object"),
}


def validate_body(body: Mapping[str, Any], kind: Kind) -> None:
    """Check the fields the router relies on; ``InvalidFieldError`` names the first bad one."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidFieldError("model", f"'model' must be a non-empty string, got {model!r}")
    for name, (ok, expected) in _OPTIONAL_FIELDS.items():
        value = body.get(name)
        if value is not None and not ok(value):
            raise InvalidFieldError(name, f"'{name}' must be {expected}, got {value!r}")
    if kind == "chat":
        _check_messages(body.get("messages"))
    else:
        _check_prompt(body.get("prompt"))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidFieldError(
            "messages", f"'messages' must be a non-empty list, got {_short(messages)}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidFieldError(f"messages.{i}", f"'messages.{i}' must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidFieldError(
                f"messages.{i}.role", f"'messages.{i}.role' must be a non-empty string"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidFieldError(
                f"messages.{i}.content",
                f"'messages.{i}.content' must be a string or a list of parts",
            )


def _check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt) or all(_is_int(p) for p in prompt):
            return
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt):
            return
    raise InvalidFieldError(
        "prompt",
        f"'prompt' must be a string, a list of strings or a list of token ids, "
        f"got {_short(prompt)}",
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_of(workflow: str | None, request_id: str | None) -> Identity:
    """The workflow identity from the two tags (HTTP headers or gRPC metadata)."""
    return Identity(_tag(WORKFLOW_HEADER, workflow), _tag(REQUEST_ID_HEADER, request_id))


def _tag(name: str, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > MAX_TAG_LENGTH or not value.isprintable():
        raise InvalidFieldError(
            name, f"{name}: must be at most {MAX_TAG_LENGTH} printable characters"
        )
    return value


def with_usage(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body to send upstream for a streamed call, asking the engine for token usage (the
    trace needs it), and whether the client asked for it itself."""
    options = dict(body.get("stream_options") or {})
    asked = options.get("include_usage") is True
    options["include_usage"] = True
    return {**body, "stream_options": options}, asked
