"""Domain errors across gRPC: the one table mapping them to status codes, the rich status the
server sends, and the domain error a client rebuilds from it.

**Server.** ``ErrorMappingInterceptor`` wraps every unary and server-streaming handler. A
``ScepsyError`` aborts with its table code (``status_of``) and its message, unchanged, plus a
``google.rpc.Status`` in the trailing metadata (``grpc-status-details-bin``, ``rich_status``)
holding

* ``google.rpc.ErrorInfo``: ``reason`` the error's reason, ``domain`` ``scepsy.v1``,
  ``metadata``: ``error_class`` (the class name), ``field`` and ``value`` when not empty, and
  every ``details`` entry as text (floats as ``repr``, which reads back exactly). A details key
  named like one of those three is overwritten by it;
* for INVALID_ARGUMENT with a known field, ``google.rpc.BadRequest`` with one ``FieldViolation``
  (``field``, ``description`` the message, ``reason``).

When the message and the status would be too large for the default gRPC metadata limit
(``MAX_TRAILER_BYTES``, about 1700 characters of message), the error goes as code and message
alone, as a plain abort would. Anything else a handler raises is logged and becomes INTERNAL, a
plain status without the exception text.

A request whose bytes do not decode as the method's request message is INVALID_ARGUMENT
(``"request is not a valid <full message name>: <why>"``, reason ``invalid_input``, field
``request``), with the same rich status: the interceptor wraps the request deserializer so that
it never raises (grpc would answer UNKNOWN) and the handler aborts before calling the servicer.

**Client.** ``error_from_rpc`` turns a failed call (sync or aio) into the domain error:

1. with a ``scepsy.v1`` ErrorInfo, the class it names when it is one of ``REBUILT`` and the code is
   that class's table code: ``from_fields`` rebuilds it, so ``PlacementInfeasible`` comes back with
   its ``kind``, ``model``, ``needed`` and ``available`` and ``AllocationInfeasible`` with its
   ``reasons`` and ``best_throughput``;
2. otherwise (another class, a rebuild that fails, no ErrorInfo) the class of the code:
   INVALID_ARGUMENT ``InvalidInputError``, NOT_FOUND ``NotFoundError``, FAILED_PRECONDITION
   ``InfeasibleError``, UNAVAILABLE and DEADLINE_EXCEEDED ``UnavailableError``, any other
   ``ScepsyError``; with the ErrorInfo's fields when there is one, else with the code's name as
   reason (``invalid_argument``, ``internal``) and, for INVALID_ARGUMENT, field and value from the
   message.

The message is the server's, except for UNAVAILABLE and DEADLINE_EXCEEDED (often raised by the
channel, not the server): ``"<target>: unavailable: <details>"`` / ``"<target>: deadline
exceeded: <details>"``, ``target`` being what the caller names the peer (e.g. ``"placer at
10.0.0.5:50053"``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.core import errors
from services.core.placement.rules import PlacementInfeasible
from services.core.planning.search import AllocationInfeasible
from services.runtime.logging import get_logger

log = get_logger(__name__)

DOMAIN = "scepsy.v1"
DETAILS_KEY = "grpc-status-details-bin"
# The message and the status both travel in the trailers, which gRPC clients refuse, at random,
# above 8 KiB (the default soft limit; always above the 16 KiB hard one); leave room for the
# trailers' other entries.
MAX_TRAILER_BYTES = 7168

STATUS_OF: dict[type[errors.ScepsyError], grpc.StatusCode] = {
    errors.InvalidInputError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.InfeasibleError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
}

# The classes a client rebuilds by name (step 1 of the module docstring).
REBUILT: dict[str, type[errors.ScepsyError]] = {
    cls.__name__: cls
    for cls in (
        errors.ScepsyError,
        errors.InvalidInputError,
        errors.ConfigError,
        errors.InventoryError,
        errors.UnknownGpuError,
        errors.NotFoundError,
        errors.InfeasibleError,
        errors.UnavailableError,
        PlacementInfeasible,
        AllocationInfeasible,
    )
}

_CLASS_OF_CODE: dict[grpc.StatusCode, type[errors.ScepsyError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInputError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InfeasibleError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.UnavailableError,
}
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_CLASS, _FIELD, _VALUE = "error_class", "field", "value"


def status_of(exc: errors.ScepsyError) -> grpc.StatusCode:
    """Most specific mapping along the exception's class hierarchy."""
    return _code_of_class(type(exc))


def _code_of_class(cls: type[errors.ScepsyError]) -> grpc.StatusCode:
    for base in cls.__mro__:
        if base in STATUS_OF:
            return STATUS_OF[base]
    return grpc.StatusCode.UNKNOWN


# ------------------------------------------------------------------------------------ server
def rich_status(exc: errors.ScepsyError, code: grpc.StatusCode | None = None) -> grpc.Status:
    """The status ``exc`` aborts with (module docstring); ``code`` defaults to ``status_of``."""
    code = code or status_of(exc)
    message = str(exc)
    status = status_pb2.Status(code=code.value[0], message=message)
    metadata = {k: _text(v) for k, v in exc.details.items()}
    metadata[_CLASS] = type(exc).__name__
    if exc.field:
        metadata[_FIELD] = exc.field
    if exc.value:
        metadata[_VALUE] = exc.value
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=metadata)
    )
    if code == grpc.StatusCode.INVALID_ARGUMENT and exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=message, reason=exc.reason
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    size = _trailer_bytes(message, status)
    if size > MAX_TRAILER_BYTES:
        log.warning("error_details_dropped", reason=exc.reason, trailer_bytes=size)
        return _Status(code, message, ())
    return cast(grpc.Status, rpc_status.to_status(status))


@dataclass(frozen=True, slots=True)
class _Status(grpc.Status):
    """A status without details (grpc offers only the abstract class)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _trailer_bytes(message: str, status: status_pb2.Status) -> int:
    """What the message and the status weigh in the trailers; gRPC percent-encodes the message's
    bytes outside printable ASCII, and '%'."""
    encoded = message.encode()
    escaped = sum(1 for b in encoded if not 0x20 <= b <= 0x7E or b == 0x25)
    return len(encoded) + 2 * escaped + int(status.ByteSize())


def _text(value: str | float) -> str:
    return value if isinstance(value, str) else repr(float(value))


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
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True, slots=True)
class _Malformed:
    """What a wrapped request deserializer gives for bytes it cannot decode: grpc answers
    UNKNOWN (and logs a traceback) when a deserializer raises, so it must not."""

    error: errors.InvalidInputError


def _tolerant(
    deserializer: Callable[[bytes], Any] | None,
) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # raw bytes: nothing can fail
        return None
    # A generated handler's deserializer is the message class's bound ``FromString``.
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "") or "request message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(
                errors.InvalidInputError(
                    f"request is not a valid {name}: {exc}", field="request", value=""
                )
            )

    return deserialize


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Malformed):
        await context.abort_with_status(rich_status(request.error))


@contextlib.asynccontextmanager
async def _mapped(context: grpc.aio.ServicerContext[Any, Any], method: str) -> AsyncIterator[None]:
    """Turn what the handler raises into the status the caller sees."""
    try:
        yield
    except errors.ScepsyError as exc:
        await context.abort_with_status(rich_status(exc))
    except (grpc.aio.AbortError, grpc.aio.BaseError):
        raise
    except Exception:
        log.exception("rpc_failed", method=method)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")


def _wrap_unary(behaviour: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await _refuse_malformed(request, context)
        async with _mapped(context, method):
            return await behaviour(request, context)
        raise AssertionError("unreachable: _mapped aborts or re-raises")

    return wrapped


def _wrap_stream(behaviour: Any, method: str) -> Any:
    if not inspect.isasyncgenfunction(behaviour):
        # a handler that writes its messages (``context.write``), such as Health/Watch
        async def writes(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await _refuse_malformed(request, context)
            async with _mapped(context, method):
                await behaviour(request, context)

        return writes

    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await _refuse_malformed(request, context)
        async with _mapped(context, method):
            async for item in behaviour(request, context):
                yield item

    return wrapped


# ------------------------------------------------------------------------------------ client
def error_from_rpc(exc: grpc.RpcError, *, target: str = "") -> errors.ScepsyError:
    """The domain error a failed call stands for (module docstring). ``exc`` is what a sync stub
    raises (a ``grpc.Call``) or a ``grpc.aio.AioRpcError``; ``target`` names the peer in the
    message of UNAVAILABLE and DEADLINE_EXCEEDED. Use as ``raise error_from_rpc(e) from e``."""
    code, message, trailing = _call_parts(exc)
    info = _error_info(_rich_status(code, trailing))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        verb = code.name.lower().replace("_", " ")
        message = f"{target}: {verb}: {message}" if target else f"{verb}: {message}"
    if info is None:
        # No Scepsy details: the status came from the channel or another server, and its code is
        # all there is to go on.
        return _CLASS_OF_CODE.get(code, errors.ScepsyError)(message, reason=code.name.lower())
    metadata = dict(info.metadata)
    name = metadata.pop(_CLASS, "")
    field = metadata.pop(_FIELD, "")
    value = metadata.pop(_VALUE, "")
    named = REBUILT.get(name)
    if named is not None and _code_of_class(named) == code:
        with contextlib.suppress(ValueError, KeyError):
            return named.from_fields(
                message, reason=info.reason, field=field, value=value, details=metadata
            )
    fallback = _CLASS_OF_CODE.get(code, errors.ScepsyError)
    return fallback(message, reason=info.reason or None, field=field, value=value, details=metadata)


def _call_parts(
    exc: grpc.RpcError,
) -> tuple[grpc.StatusCode, str, Iterable[tuple[str, str | bytes]]]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or "", exc.trailing_metadata() or ()
    if callable(getattr(exc, "code", None)):
        # What a sync stub raises is also a grpc.Call (grpc's _InactiveRpcError); the type stubs
        # keep the two classes apart.
        call = cast(grpc.Call, exc)
        return call.code(), call.details() or "", call.trailing_metadata() or ()
    return grpc.StatusCode.UNKNOWN, str(exc), ()


def _rich_status(
    code: grpc.StatusCode, trailing: Iterable[tuple[str, str | bytes]]
) -> status_pb2.Status | None:
    """The google.rpc.Status of the call, if it has one that agrees with its code (a proxy may
    have replaced the status and left the old details behind)."""
    for key, raw in trailing:
        if key == DETAILS_KEY and isinstance(raw, bytes):
            status = status_pb2.Status.FromString(raw)
            return status if _CODE_OF_NUMBER.get(status.code) == code else None
    return None


def _error_info(status: status_pb2.Status | None) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None
