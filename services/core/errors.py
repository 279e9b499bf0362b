"""The domain exception tree. Every error a caller can act on derives from ``ScepsyError``.

The runtime maps each class to a gRPC status code in one table (``services.runtime.errors``);
the CLI prints the message and exits non-zero. Messages name the offending field and value.

Besides its message every error carries fields a caller reads instead of parsing text; the
runtime sends them in the gRPC status details and ``services.runtime.errors.error_from_rpc``
rebuilds the error from them on the client:

* ``reason``: machine-readable, snake_case. Each class has a default (``default_reason``); a raise
  site may be more specific (``PlacementInfeasible`` gives its kind, e.g. ``tp_exceeds_domain``).
* ``field``: the path of the input at fault (``workflows[0].rate``, ``mix.input_len``), or "".
* ``value``: the offending value as the message shows it, or "".
* ``details``: further facts by name, numbers as floats (``needed``, ``available``,
  ``best_throughput.<workflow>``). Over the wire every value travels as text; a class that
  rebuilds from details (``from_fields``) converts its own keys back.

**Message convention** of ``InvalidInputError``: ``"<field>: <problem>, got <value>"``, possibly
after the source it was read from (``"c.yaml: nodes[0].gpus: must be ..."``). An
``InvalidInputError`` raised without ``field`` / ``value`` takes them from the message
(``field_from_message``, ``value_from_message``), so raise sites that follow the convention need
no keyword arguments. Other classes derive nothing: their messages are not about one input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar, Self

# One segment of a field path: a name (model keys may have dashes), then any [index] or [key];
# or a command-line flag. Examples: workflows[0], rate, qwen-7b, --rates.
_SEGMENT = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_-]*(?:\[[^\[\]\s:]+\])*|--[a-z][a-z0-9-]*)")
_FIELD_PATH = re.compile(rf"{_SEGMENT.pattern}(?:\.{_SEGMENT.pattern})*")
# Leading source names that are files, not fields: "c.yaml: nodes[0].gpus: ..."
_FILE = re.compile(r".*\.(?:ya?ml|json|jsonl|csv|txt|toml)", re.IGNORECASE)
_GOT = re.compile(r".*[,;] got (.+)$", re.DOTALL)


def field_from_message(message: str) -> str:
    """The field path that ``message`` starts with, by the convention above, or "".

    The message's leading ``": "``-separated parts, before the problem text, are read in order:
    file names are skipped while no field part has been seen, then the parts that look like
    field paths are joined with ``.`` ("spec_yaml: workflows[0].rate: ..." gives
    ``spec_yaml.workflows[0].rate``, the request field and the path inside it). Reading stops at
    the first part that is neither ("perf params: alpha: ..." gives ""). A model name that looks
    like a field name ("big: tp and units must be >= 1") is taken for one: raise sites that know
    better pass ``field`` themselves.
    """
    parts = message.split(": ")[:-1]
    path: list[str] = []
    for part in parts:
        if _FILE.fullmatch(part):
            if path:
                break
            continue
        if not _FIELD_PATH.fullmatch(part):
            break
        path.append(part)
    return ".".join(path)


def value_from_message(message: str) -> str:
    """The text after the last ``", got "`` (or ``"; got "``) of ``message``, or ""."""
    match = _GOT.match(message)
    return match.group(1) if match else ""


class ScepsyError(Exception):
    """Base class: an error Scepsy reports to its caller rather than crashing on."""

    default_reason: ClassVar[str] = "error"

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        field: str | None = None,
        value: str | None = None,
        details: Mapping[str, str | float] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason
        self.field = field if field is not None else ""
        self.value = value if value is not None else ""
        self.details: Mapping[str, str | float] = dict(details or {})

    @classmethod
    def from_fields(
        cls,
        message: str,
        *,
        reason: str = "",
        field: str = "",
        value: str = "",
        details: Mapping[str, str | float] | None = None,
    ) -> Self:
        """The error of this class that a message and its fields describe: what a client
        rebuilds from a status. Raises ``ValueError`` or ``KeyError`` when they do not fit the
        class (a subclass reading a detail that is missing or not a number)."""
        return cls(message, reason=reason or None, field=field, value=value, details=details)


class InvalidInputError(ScepsyError):
    """Raised when user input (a file, a request field, a flag) is malformed or out of range.

    Without ``field`` / ``value`` they come from the message (module docstring); an explicit ""
    means none."""

    default_reason = "invalid_input"

    def __init__(
        self,
        message: str = "",
        *,
        reason: str | None = None,
        field: str | None = None,
        value: str | None = None,
        details: Mapping[str, str | float] | None = None,
    ) -> None:
        super().__init__(
            message,
            reason=reason,
            field=field_from_message(message) if field is None else field,
            value=value_from_message(message) if value is None else value,
            details=details,
        )


class ConfigError(InvalidInputError):
    """Raised when a service's configuration (flags or environment) fails validation."""

    default_reason = "invalid_config"


class InventoryError(InvalidInputError):
    """Raised when a declared cluster inventory (cluster YAML) is malformed."""

    default_reason = "invalid_inventory"


class UnknownGpuError(InvalidInputError):
    """Raised when a GPU type is not in the hardware catalogue."""

    default_reason = "unknown_gpu"


class NotFoundError(ScepsyError):
    """Raised when a named thing (node, model, plan, profile) does not exist."""

    default_reason = "not_found"


class InfeasibleError(ScepsyError):
    """Raised when a request is well-formed but cannot be satisfied (memory, GPUs, throughput)."""

    default_reason = "infeasible"


class UnavailableError(ScepsyError):
    """Raised when a dependency (Redis, an engine, NVML) cannot be reached right now."""

    default_reason = "unavailable"
