"""The domain exception tree. Every error a caller can act on derives from ``ScepsyError``.

The runtime maps each class to a gRPC status code in one table (``services.runtime.errors``);
the CLI prints the message and exits non-zero. Messages name the offending field and value.
"""

from __future__ import annotations


class ScepsyError(Exception):
    """Base class: an error Scepsy reports to its caller rather than crashing on."""


class InvalidInputError(ScepsyError):
    """Raised when user input (a file, a request field, a flag) is malformed or out of range."""


class ConfigError(InvalidInputError):
    """Raised when a service's configuration (flags or environment) fails validation."""


class InventoryError(InvalidInputError):
    """Raised when a declared cluster inventory (cluster YAML) is malformed."""


class UnknownGpuError(InvalidInputError):
    """Raised when a GPU type is not in the hardware catalogue."""


class NotFoundError(ScepsyError):
    """Raised when a named thing (node, model, plan, profile) does not exist."""


class InfeasibleError(ScepsyError):
    """Raised when a request is well-formed but cannot be satisfied (memory, GPUs, throughput)."""


class UnavailableError(ScepsyError):
    """Raised when a dependency (Redis, an engine, NVML) cannot be reached right now."""
