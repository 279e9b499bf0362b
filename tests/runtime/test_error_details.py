"""Errors as data over a real channel: the rich status the server sends, the error a client
rebuilds from it (aio and sync stubs), and what the channel itself reports."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.core import errors
from services.core.placement.rules import InfeasibleKind, PlacementInfeasible
from services.core.planning.search import AllocationInfeasible
from services.runtime.config import ServiceConfig
from services.runtime.errors import DETAILS_KEY, DOMAIN, error_from_rpc
from services.runtime.server import Server, ServiceBinding

UNARY = "/test.Raiser/Raise"
STREAM = "/test.Raiser/RaiseAfterOne"


@dataclass
class Raiser:
    """A service whose handlers raise ``exc`` (the stream after one item); ``delay_s`` first."""

    exc: Exception | None = None
    delay_s: float = 0.0

    async def unary(self, request: bytes, context: Any) -> bytes:
        await asyncio.sleep(self.delay_s)
        if self.exc is not None:
            raise self.exc
        return request

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        if self.exc is not None:
            raise self.exc

    def binding(self) -> ServiceBinding:
        handler = grpc.method_handlers_generic_handler(
            "test.Raiser",
            {
                "Raise": grpc.unary_unary_rpc_method_handler(self.unary),
                "RaiseAfterOne": grpc.unary_stream_rpc_method_handler(self.stream),
            },
        )
        return ServiceBinding(
            name="test.Raiser",
            add_to_server=lambda server: server.add_generic_rpc_handlers((handler,)),
        )


@pytest.fixture
async def raiser() -> AsyncIterator[tuple[Raiser, str]]:
    r = Raiser()
    server = Server(ServiceConfig(drain_s=0, grace_s=0.5), [r.binding()])
    await server.start()
    yield r, server.address
    await server.stop()


async def call(address: str, deadline_s: float = 5) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(UNARY)(b"x", timeout=deadline_s)
    return err.value


def rich(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    raw = dict(err.trailing_metadata() or ())[DETAILS_KEY]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def unpacked(status: status_pb2.Status, cls: Callable[[], Any]) -> list[Any]:
    out = []
    for detail in status.details:
        msg = cls()
        if detail.Unpack(msg):
            out.append(msg)
    return out


async def test_invalid_argument_carries_bad_request_and_error_info(
    raiser: tuple[Raiser, str],
) -> None:
    r, address = raiser
    message = "spec_yaml: workflows[0].rate: must be > 0, got -1.0"
    r.exc = errors.InvalidInputError(message)
    err = await call(address)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    status = rich(err)
    assert (status.code, status.message) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], message)
    [bad] = unpacked(status, error_details_pb2.BadRequest)
    [violation] = bad.field_violations
    assert (violation.field, violation.description, violation.reason) == (
        "spec_yaml.workflows[0].rate",
        message,
        "invalid_input",
    )
    [info] = unpacked(status, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("invalid_input", DOMAIN)
    assert dict(info.metadata) == {
        "error_class": "InvalidInputError",
        "field": "spec_yaml.workflows[0].rate",
        "value": "-1.0",
    }
    back = error_from_rpc(err)
    assert type(back) is errors.InvalidInputError
    assert (str(back), back.reason, back.field, back.value) == (
        message,
        "invalid_input",
        "spec_yaml.workflows[0].rate",
        "-1.0",
    )


async def test_invalid_argument_without_a_field_has_no_bad_request(
    raiser: tuple[Raiser, str],
) -> None:
    r, address = raiser
    r.exc = errors.ConfigError("perf params: alpha: must be in (0, 1]")
    err = await call(address)
    status = rich(err)
    assert unpacked(status, error_details_pb2.BadRequest) == []
    back = error_from_rpc(err)
    assert (type(back), back.reason, back.field) == (errors.ConfigError, "invalid_config", "")


async def test_allocation_infeasible_round_trips(raiser: tuple[Raiser, str]) -> None:
    r, address = raiser
    sent = AllocationInfeasible(
        ["big: rho 0.9 needs 9 replicas, 4 fit"], {"chat": 12.345678901234, "rag.v2": 0.1 + 0.2}
    )
    r.exc = sent
    err = await call(address)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    [info] = unpacked(rich(err), error_details_pb2.ErrorInfo)
    assert info.reason == "allocation_infeasible"
    assert info.metadata["best_throughput.chat"] == "12.345678901234"
    back = error_from_rpc(err)
    assert isinstance(back, AllocationInfeasible)
    assert (back.reasons, back.best_throughput, str(back), dict(back.details)) == (
        sent.reasons,
        sent.best_throughput,
        str(sent),
        dict(sent.details),
    )


async def test_placement_infeasible_round_trips_from_a_stream(raiser: tuple[Raiser, str]) -> None:
    r, address = raiser
    sent = PlacementInfeasible(
        InfeasibleKind.FRACTIONS_DO_NOT_PACK, "m: 3/4 on 1 GPU", model="m", needed=3, available=2
    )
    r.exc = sent
    async with grpc.aio.insecure_channel(address) as channel:
        items = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for item in channel.unary_stream(STREAM)(b"x", timeout=5):
                items.append(item)
    assert items == [b"first"]
    back = error_from_rpc(err.value)
    assert isinstance(back, PlacementInfeasible)
    assert (back.kind, back.model, back.needed, back.available, str(back)) == (
        sent.kind,
        "m",
        3.0,
        2.0,
        str(sent),
    )


async def test_sync_stubs_get_the_same_error(raiser: tuple[Raiser, str]) -> None:
    r, address = raiser
    r.exc = errors.NotFoundError("plan 'p1' not found", details={"plan": "p1"})

    def sync_call() -> grpc.RpcError:
        with grpc.insecure_channel(address) as channel:
            try:
                channel.unary_unary(UNARY)(b"x", timeout=5)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("the call succeeded")

    # a blocking call must not hold the loop the server runs on
    exc = await asyncio.to_thread(sync_call)
    back = error_from_rpc(exc)
    assert (type(back), str(back), back.reason, dict(back.details)) == (
        errors.NotFoundError,
        "plan 'p1' not found",
        "not_found",
        {"plan": "p1"},
    )


async def test_unexpected_exception_is_internal_without_text_or_details(
    raiser: tuple[Raiser, str],
) -> None:
    r, address = raiser
    r.exc = RuntimeError("secret stack detail")
    err = await call(address)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details() == f"internal error in {UNARY}"
    assert DETAILS_KEY not in dict(err.trailing_metadata() or ())
    back = error_from_rpc(err)
    assert (type(back), back.reason, str(back)) == (
        errors.ScepsyError,
        "internal",
        f"internal error in {UNARY}",
    )


async def test_a_class_the_client_does_not_know_falls_back_on_the_code(
    raiser: tuple[Raiser, str],
) -> None:
    class QuotaError(errors.InvalidInputError):
        default_reason = "over_quota"

    r, address = raiser
    r.exc = QuotaError("requests: at most 10, got 11")
    back = error_from_rpc(await call(address))
    assert (type(back), back.reason, back.field, back.value) == (
        errors.InvalidInputError,
        "over_quota",
        "requests",
        "11",
    )


@pytest.mark.parametrize("length", [3_000, 7_000])
async def test_details_too_large_for_metadata_are_left_out(
    raiser: tuple[Raiser, str], length: int
) -> None:
    # The status repeats the message: with it, the trailers would pass the client's 8 KiB limit
    # and the call could fail with another code (7000: even a status without details would).
    r, address = raiser
    message = f"names: too long, got {'x' * length}"
    r.exc = errors.InvalidInputError(message)
    err = await call(address)
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    assert DETAILS_KEY not in dict(err.trailing_metadata() or ())
    back = error_from_rpc(err)
    # the code and the message still say what and where
    assert (type(back), back.reason, back.field) == (
        errors.InvalidInputError,
        "invalid_argument",
        "names",
    )


async def test_deadline_exceeded_is_unavailable_naming_the_target(
    raiser: tuple[Raiser, str],
) -> None:
    r, address = raiser
    r.delay_s = 2.0
    err = await call(address, deadline_s=0.2)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    back = error_from_rpc(err, target=f"raiser at {address}")
    assert type(back) is errors.UnavailableError
    assert back.reason == "deadline_exceeded"
    assert str(back).startswith(f"raiser at {address}: deadline exceeded: ")


async def test_unreachable_peer_is_unavailable_naming_the_target() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    # nothing listens there now
    err = await call(address)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    back = error_from_rpc(err, target=f"placer at {address}")
    assert (type(back), back.reason) == (errors.UnavailableError, "unavailable")
    assert str(back).startswith(f"placer at {address}: unavailable: ")
