"""The router's errors and how each front end reports them.

Every class derives from the domain tree (``services.core.errors``) and says when it is raised.
``http_error`` gives the HTTP status and OpenAI error ``type`` (the error's ``code`` is the HTTP
status, as in vLLM's answers, so router-made and engine errors have one shape); ``grpc_status``
the gRPC code, falling back to the runtime's table for the other domain errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from services.core import errors
from services.runtime.errors import status_of


class ModelNotFoundError(errors.NotFoundError):
    """Raised when a call names a model that has no registered replica."""


class AuthenticationError(errors.ScepsyError):
    """Raised when a bearer token is required and missing or wrong."""


class OverloadedError(errors.UnavailableError):
    """Raised when every replica of the model is at its in-flight limit and the queue is full
    (or the call waited in the queue longer than ``queue_timeout_s``)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoHealthyReplicaError(errors.UnavailableError):
    """Raised when a model has replicas but none is healthy (all ejected or excluded)."""


class DrainingError(errors.UnavailableError):
    """Raised for calls arriving after the router began shutting down; another router instance
    (or this one restarted) may take the call after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamError(errors.UnavailableError):
    """Raised when the engine could not be reached, or its response broke off mid-way."""


class UpstreamAbortedError(UpstreamError):
    """Raised when the router ended a call itself: its replica was ejected (failed health
    checks, refused connections) or its stream sent nothing for ``stream_idle_timeout_s``. A
    call that had sent the client nothing yet is retried once on another replica first."""


class UpstreamTimeoutError(errors.UnavailableError):
    """Raised when an upstream call exceeds its deadline."""


class UpstreamStatusError(errors.ScepsyError):
    """Raised (gRPC only) when the engine answered with an HTTP error status; HTTP forwards
    the engine's answer as it is."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    type: str


_HTTP: tuple[tuple[type[errors.ScepsyError], HttpError], ...] = (
    (ModelNotFoundError, HttpError(404, "invalid_request_error")),
    (AuthenticationError, HttpError(401, "invalid_request_error")),
    (OverloadedError, HttpError(429, "rate_limit_error")),
    (UpstreamTimeoutError, HttpError(504, "timeout_error")),
    (UpstreamError, HttpError(502, "upstream_error")),
    (NoHealthyReplicaError, HttpError(503, "service_unavailable")),
    (DrainingError, HttpError(503, "service_unavailable")),
    (errors.InvalidInputError, HttpError(400, "invalid_request_error")),
    (errors.NotFoundError, HttpError(404, "invalid_request_error")),
    (errors.UnavailableError, HttpError(503, "service_unavailable")),
)

_GRPC: tuple[tuple[type[errors.ScepsyError], grpc.StatusCode], ...] = (
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UpstreamTimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
)

_GRPC_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
}


def http_error(exc: errors.ScepsyError) -> HttpError:
    """HTTP status and OpenAI error type/code of a domain error (500 when unmapped)."""
    for cls, mapped in _HTTP:
        if isinstance(exc, cls):
            return mapped
    return HttpError(500, "server_error")


def grpc_status(exc: errors.ScepsyError) -> grpc.StatusCode:
    """gRPC code of a domain error: the router's own first, then the runtime table."""
    if isinstance(exc, UpstreamStatusError):
        return _GRPC_OF_HTTP.get(exc.status, grpc.StatusCode.UNAVAILABLE)
    for cls, code in _GRPC:
        if isinstance(exc, cls):
            return code
    return status_of(exc)
