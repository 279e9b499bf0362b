"""The one table mapping domain errors to gRPC status codes, applied at the server boundary.

``ErrorMappingInterceptor`` wraps every unary and server-streaming handler: a ``ScepsyError``
becomes ``context.abort(code, message)``; anything else is logged and becomes INTERNAL without
leaking the exception text.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.core import errors
from services.runtime.logging import get_logger

log = get_logger(__name__)

STATUS_OF: dict[type[errors.ScepsyError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InfeasibleError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: errors.ScepsyError) -> grpc.StatusCode:
    """Most specific mapping along the exception's class hierarchy."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


@contextlib.asynccontextmanager
async def _mapped(context: grpc.aio.ServicerContext[Any, Any], method: str) -> AsyncIterator[None]:
    """Turn what the handler raises into the status the caller sees."""
    try:
        yield
    except errors.ScepsyError as exc:
        await context.abort(status_of(exc), str(exc))
    except (grpc.aio.AbortError, grpc.aio.BaseError):
        raise
    except Exception:
        log.exception("rpc_failed", method=method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


def _wrap_unary(behaviour: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with _mapped(context, method):
            return await behaviour(request, context)
        raise AssertionError("unreachable: _mapped aborts or re-raises")

    return wrapped


def _wrap_stream(behaviour: Any, method: str) -> Any:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async with _mapped(context, method):
            async for item in behaviour(request, context):
                yield item

    return wrapped
