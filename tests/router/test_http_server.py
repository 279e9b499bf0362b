"""The router's HTTP/1.1 server (``services.router.http_server``) over loopback, spoken to as raw
bytes: what clients rely on (kept-alive and pipelined requests, HTTP/1.0, ``Expect:
100-continue``, chunked request bodies, streamed answers) and what hostile ones send (malformed
request lines and headers, bodies over the limit, a client that goes away mid-call)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from services.router.http_server import HttpError, HttpServer, Request, Response, Stream

LIMIT = 1024


def _error(exc: BaseException) -> Response:
    status = exc.status if isinstance(exc, HttpError) else 500
    return Response(status, orjson.dumps({"error": {"message": str(exc), "code": status}}))


class App:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.server = HttpServer(
            _error,
            LIMIT,
            lambda path: Response(404, b'{"error": "no route"}'),
            lambda method, allowed: Response(405, b"{}", headers={"Allow": ", ".join(allowed)}),
        )
        self.server.add("POST", "/echo", self.echo)
        self.server.add("POST", "/stream", self.stream)
        self.server.add("POST", "/slow", self.slow)
        self.server.add("POST", "/boom", self.boom)
        self.server.add("POST", "/later", self.later)

    async def echo(self, request: Request) -> Response:
        return Response(200, request.body, headers={"X-Path": request.path})

    async def stream(self, request: Request) -> Stream:
        out = request.stream(200, {"Content-Type": "text/event-stream"})
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await out.write(part)
        await out.write_eof(b"data: [DONE]\n\n")
        return out

    async def slow(self, request: Request) -> Response:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return Response(200, b"late")

    async def later(self, request: Request) -> Response:
        await asyncio.sleep(0.5)
        return Response(200, b"done")

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("a bug")


@pytest.fixture
async def app() -> AsyncIterator[tuple[App, int]]:
    app = App()
    port = await app.server.start("127.0.0.1", 0)
    yield app, port
    await app.server.stop(1.0)


async def _exchange(port: int, data: bytes, until: bytes = b"", timeout_s: float = 5.0) -> bytes:
    """Send ``data``; everything read until ``until`` was seen or the server closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout_s):
            while not (until and out.count(until) >= 1 and out.endswith(until)):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
    finally:
        writer.close()
    return out


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %b HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%b\r\n%b" % (
        path.encode(),
        len(body),
        extra,
        body,
    )


async def test_pipelined_requests_on_a_kept_connection_are_answered_in_order(
    app: tuple[App, int],
) -> None:
    _, port = app
    out = await _exchange(port, _post("/echo?q=1", b"one") + _post("/echo", b"two"), until=b"two")
    first, second = out.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert b"X-Path: /echo\r\n" in first and first.endswith(b"\r\n\r\none")
    assert second.endswith(b"two") and b"Connection: close" not in out


async def test_http10_closes_and_expect_continue_is_answered(app: tuple[App, int]) -> None:
    _, port = app
    out = await _exchange(port, b"POST /echo HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi")
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hi")
    assert b"Connection: close" in out
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"ok")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK") and await reader.readexactly(2) == b"ok"
    writer.close()


async def test_a_chunked_request_body_is_read(app: tuple[App, int]) -> None:
    _, port = app
    request = (
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    )
    assert (await _exchange(port, request, until=b"abcde")).endswith(b"\r\n\r\nabcde")


async def test_a_streamed_answer_is_chunked_and_ends(app: tuple[App, int]) -> None:
    _, port = app
    out = await _exchange(port, _post("/stream", b""), until=b"0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and b"Content-Type: text/event-stream" in head
    assert body == (b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST \xff HTTP/1.1\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nX: " + b"a" * 70_000, 431),
    ],
)
async def test_malformed_requests_are_refused_and_the_connection_closed(
    app: tuple[App, int], request_bytes: bytes, status: int
) -> None:
    _, port = app
    out = await _exchange(port, request_bytes)
    assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
    assert b"Connection: close" in out
    assert orjson.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == status


async def test_a_body_over_the_limit_is_413_after_it_was_read(app: tuple[App, int]) -> None:
    _, port = app
    big = b"x" * (LIMIT * 3)
    out = await _exchange(port, _post("/echo", big) + _post("/echo", b"next"), until=b"next")
    assert out.startswith(b"HTTP/1.1 413 ")
    assert out.endswith(b"next")  # the connection was kept and the next request answered


async def test_routes_errors_and_bugs(app: tuple[App, int]) -> None:
    _, port = app
    out = await _exchange(port, b"GET /echo HTTP/1.1\r\n\r\n", until=b"{}")
    assert out.startswith(b"HTTP/1.1 405 ") and b"Allow: POST" in out
    out = await _exchange(port, b"GET /nothing HTTP/1.1\r\n\r\n", until=b"}")
    assert out.startswith(b"HTTP/1.1 404 ")
    out = await _exchange(port, _post("/boom", b""), until=b"}}")
    assert out.startswith(b"HTTP/1.1 500 ") and b"a bug" in out


async def test_a_client_that_goes_away_cancels_its_handler(app: tuple[App, int]) -> None:
    server, port = app
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/slow", b""))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.wait_for(server.cancelled.wait(), 5)


async def test_stop_lets_a_running_handler_finish(app: tuple[App, int]) -> None:
    server, port = app
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_post("/later", b""))
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler runs
    await server.server.stop(5.0)
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"done")
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
