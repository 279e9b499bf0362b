"""A lean HTTP/1.1 server for the router's OpenAI-compatible front end, on asyncio protocols.

The router's own CPU per call is what limits it on a small host, and aiohttp's server does much
per request that the router does not need (an application with signals and middlewares, a
request object with lazy properties, multidicts, a response object with cookies). ``HttpServer``
parses each request once (request line, headers, a ``Content-Length`` or chunked body), runs its
handler in a task of its own and writes the answer in one socket write; a streamed answer
(``Request.stream``) sends its headers with its first bytes, in chunked transfer coding, and its
last bytes with the end of the body.

What clients rely on is kept: kept-alive connections (HTTP/1.1 by default, HTTP/1.0 with
``Connection: keep-alive``), requests pipelined on one connection answered in order, ``Expect:
100-continue``, a body over ``max_body_bytes`` answered 413 (read and dropped, so that the
client reads the answer), malformed requests answered 400 and the connection closed, unknown
paths 404, a known path with another method 405 with ``Allow``. A client that disconnects
cancels its handler (and with it the engine call). ``stop`` stops accepting, lets handlers
running finish for up to ``grace_s``, then closes every connection. Errors inside handlers are
answered by ``on_error`` (the OpenAI-shaped errors of ``http_api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
from collections.abc import Awaitable, Callable
from typing import Any, cast

__all__ = ["HttpError", "HttpServer", "Request", "Response", "Stream"]

_MAX_HEAD = 64 * 1024  # request line and headers
_MAX_PENDING = 1 << 20  # pipelined bytes buffered while a handler runs
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}


class Response:
    """A whole answer: status, headers (``(name, value)`` pairs) and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        content_type: str | None = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = dict(headers) if headers else {}
        if content_type is not None:
            self.headers.setdefault("Content-Type", content_type)


class Request:
    """One parsed request: ``method``, ``path`` (without the query), ``headers`` (names in lower
    case), ``body``."""

    __slots__ = ("_connection", "body", "headers", "keep_alive", "method", "path", "stream_used")

    def __init__(
        self,
        connection: _Connection,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self._connection = connection
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.stream_used: Stream | None = None

    def stream(self, status: int, headers: dict[str, str]) -> Stream:
        """Answer with a body written as it comes (``Stream.write``, then ``write_eof``)."""
        self.stream_used = Stream(self._connection, status, headers, self.keep_alive)
        return self.stream_used


class Stream:
    """A streamed answer in chunked transfer coding; its head goes out with the first bytes."""

    __slots__ = ("_connection", "_head", "_keep_alive", "ended")

    def __init__(
        self, connection: _Connection, status: int, headers: dict[str, str], keep_alive: bool
    ) -> None:
        self._connection = connection
        self._keep_alive = keep_alive
        self._head: bytes | None = _head(
            status, headers, b"Transfer-Encoding: chunked\r\n", keep_alive
        )
        self.ended = False

    async def write(self, data: bytes) -> None:
        """Send ``data`` (one chunk); waits while the client reads slower than we write."""
        if not data:
            return
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head is not None:
            frame, self._head = self._head + frame, None
        connection = self._connection
        connection.send(frame)
        if connection.paused:
            await connection.drain()

    def send(self, data: bytes) -> bool:
        """Send ``data`` (one chunk) now; False when the client reads slower than we write
        (then ``drain`` before the next)."""
        if data:
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            if self._head is not None:
                frame, self._head = self._head + frame, None
            self._connection.send(frame)
        return not self._connection.paused

    async def drain(self) -> None:
        """Wait until the client took what was sent."""
        await self._connection.drain()

    def end(self, data: bytes = b"") -> None:
        """Send ``data`` and the end of the body, in one write."""
        if self.ended:
            return
        self.ended = True
        frame = b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        if self._head is not None:
            frame, self._head = self._head + frame, None
        self._connection.send(frame)

    async def write_eof(self, data: bytes = b"") -> None:
        """Send ``data`` and the end of the body, in one write."""
        self.end(data)


Handler = Callable[[Request], Awaitable[Response | Stream]]


class HttpServer:
    """Routes (``add``) and the listening socket (``start``/``stop``); see the module doc."""

    def __init__(
        self,
        on_error: Callable[[BaseException], Response],
        max_body_bytes: int,
        not_found: Callable[[str], Response],
        not_allowed: Callable[[str, list[str]], Response],
    ) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self.on_error = on_error
        self.not_found = not_found
        self.not_allowed = not_allowed
        self.max_body_bytes = max_body_bytes
        self._server: asyncio.Server | None = None
        self.connections: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    def route(self, method: str, path: str) -> Handler | Response:
        methods = self._routes.get(path)
        if methods is None:
            return self.not_found(path)
        handler = methods.get(method)
        if handler is None:
            return self.not_allowed(method, sorted(methods))
        return handler

    async def start(self, host: str, port: int) -> int:
        """Listen; the bound port (``OSError`` when it cannot)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; handlers running get ``grace_s`` to finish; close every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.connections):
            if connection.task is None:
                connection.close()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for connection in list(self.connections):
            connection.close()


class HttpError(Exception):
    """A request the server itself refuses (malformed, too large): handed to ``on_error``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed in order, one handler task at a time."""

    __slots__ = (
        "_buffer",
        "_closed",
        "_discard",
        "_discarded",
        "_drain",
        "_loop",
        "_server",
        "paused",
        "task",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()  # kept: each look-up is a system call (3.11)
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._closed = False
        self._discard = 0  # bytes of a refused body still to drop
        self._discarded: asyncio.Future[None] | None = None  # set once they are
        self._drain: asyncio.Future[None] | None = None
        self.paused = False
        self.task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: so does its call
        self._wake_drain(ConnectionResetError("client disconnected"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain(None)

    def data_received(self, data: bytes) -> None:
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
            if self._discard:
                return
            if self._discarded is not None and not self._discarded.done():
                self._discarded.set_result(None)
        self._buffer = self._buffer + data if self._buffer else data
        if self.task is None:
            self._next()
        elif len(self._buffer) > _MAX_PENDING:
            self.close()

    def eof_received(self) -> bool:
        return False  # a client that closed its side went away: close, cancel its handler

    # ------------------------------------------------------------------ writing
    def send(self, data: bytes) -> None:
        transport = self.transport
        if self._closed or transport is None or transport.is_closing():
            raise ConnectionResetError("client disconnected")
        transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("client disconnected")
        if self.paused:
            self._drain = self._loop.create_future()
            await self._drain

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: nobody may be waiting any more

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ parsing
    def _next(self) -> None:
        """Parse the next complete request in the buffer, if any, and start its handler."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                self._refuse(431, "request headers too large")
            return
        try:
            method, path, headers, keep_alive = _parse_head(buffer[:end])
            start = end + 4
            body, used = self._body(buffer, start, headers)
        except HttpError as exc:
            self._refuse(exc.status, str(exc))
            return
        if body is None:
            if used == -1:  # the whole body is refused: dropped as it comes, then a 413
                return
            if headers.get("expect", "").lower() == "100-continue" and len(buffer) == start:
                with contextlib.suppress(ConnectionError):
                    self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            return  # the body is not all here yet
        self._buffer = buffer[used:]
        request = Request(self, method, path, headers, body, keep_alive)
        self.task = self._loop.create_task(self._handle(request))
        self._server.tasks.add(self.task)
        self.task.add_done_callback(self._server.tasks.discard)

    def _body(self, buffer: bytes, start: int, headers: dict[str, str]) -> tuple[bytes | None, int]:
        """(body, end of the request in ``buffer``); (None, 0) while incomplete."""
        limit = self._server.max_body_bytes
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked" or "content-length" in headers:
                raise HttpError(400, "unsupported Transfer-Encoding")
            return _dechunk(buffer, start, limit)
        raw = headers.get("content-length", "0")
        if not raw.isdigit() or len(raw) > 18:
            raise HttpError(400, f"bad Content-Length {raw[:20]!r}")
        length = int(raw)
        if length > limit:
            self._too_large(length, buffer, start)
            return None, -1
        if len(buffer) - start < length:
            return None, 0
        return buffer[start : start + length], start + length

    def _too_large(self, length: int, buffer: bytes, start: int) -> None:
        """Answer 413 once the body (of a length clients still read an answer after) has been
        dropped; a larger one ends the connection."""
        limit = self._server.max_body_bytes
        message = f"request body of {length} bytes is over the limit of {limit} bytes"
        if length > 64 * limit + (1 << 20):
            self._refuse(413, message)
            return
        arrived = len(buffer) - start
        self._buffer = buffer[start + length :] if arrived >= length else b""
        self._discard = max(0, length - arrived)
        response = self._server.on_error(HttpError(413, message))
        if self._discard:
            # the answer goes out once the rest of the body has been dropped
            self.task = asyncio.get_running_loop().create_task(self._after_discard(response))
        else:
            with contextlib.suppress(ConnectionError):
                self.send(_serialize(response, True))
            if self._buffer:
                asyncio.get_running_loop().call_soon(self._next_if_idle)

    def _next_if_idle(self) -> None:
        if self.task is None and not self._closed:
            self._next()

    async def _after_discard(self, response: Response) -> None:
        if self._discard and not self._closed:
            self._discarded = asyncio.get_running_loop().create_future()
            await self._discarded
        self.task = None
        if not self._closed:
            with contextlib.suppress(ConnectionError):
                self.send(_serialize(response, True))
            if self._buffer:
                self._next()

    def _refuse(self, status: int, message: str) -> None:
        """A request that cannot be read: answered, and the connection closed."""
        response = self._server.on_error(HttpError(status, message))
        with contextlib.suppress(ConnectionError):
            self.send(_serialize(response, False))
        self.close()

    # ----------------------------------------------------------------- handling
    async def _handle(self, request: Request) -> None:
        keep_alive = request.keep_alive
        try:
            target = self._server.route(request.method, request.path)
            if isinstance(target, Response):
                answer: Response | Stream = target
            else:
                try:
                    answer = await target(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    answer = self._server.on_error(exc)
                    stream = request.stream_used
                    if stream is not None and stream._head is None:
                        raise ConnectionResetError from exc  # its head is out: cut it off
            if isinstance(answer, Stream):
                if not answer.ended:
                    await answer.write_eof()
            else:
                self.send(_serialize(answer, keep_alive))
        except (ConnectionError, asyncio.CancelledError):
            self.close()
            return
        finally:
            self.task = None
        if not keep_alive:
            self.close()
        elif self._buffer and not self._closed:
            self._next()


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str], bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpError(400, "malformed request line")
    version = parts[2]
    try:
        method = parts[0].decode("ascii")
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request line is not ASCII") from None
    if not method.isalpha() or not target.startswith("/"):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b" " in name:
            raise HttpError(400, "malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        if key == "content-length" and key in headers and headers[key] != text:
            raise HttpError(400, "conflicting Content-Length headers")
        headers[key] = text
    connection = headers.get("connection", "").lower()
    http11 = version == b"HTTP/1.1"
    keep_alive = "close" not in connection if http11 else "keep-alive" in connection
    return method, target.split("?", 1)[0], headers, keep_alive


def _dechunk(buffer: bytes, start: int, limit: int) -> tuple[bytes | None, int]:
    """A chunked request body from ``buffer[start:]``: (body, end), or (None, 0) while
    incomplete; ``HttpError`` when malformed or over ``limit``."""
    parts: list[bytes] = []
    size_total = 0
    pos = start
    while True:
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None, 0
        try:
            size = int(buffer[pos:end].split(b";", 1)[0], 16)
        except ValueError:
            raise HttpError(400, "malformed chunk size") from None
        if size < 0:
            raise HttpError(400, "malformed chunk size")
        pos = end + 2
        if size == 0:
            end = buffer.find(b"\r\n\r\n", pos - 2)  # trailers, if any, end with an empty line
            if end < 0:
                return None, 0
            return b"".join(parts), end + 4
        size_total += size
        if size_total > limit:
            raise HttpError(413, f"request body is over the limit of {limit} bytes")
        if len(buffer) < pos + size + 2:
            return None, 0
        parts.append(buffer[pos : pos + size])
        pos += size + 2


def _head(status: int, headers: dict[str, str], extra: bytes, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for name, value in headers.items():
        lines.append(b"%b: %b\r\n" % (name.encode("latin-1"), _clean(value)))
    lines.append(extra)
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _clean(value: Any) -> bytes:
    """A header value without line breaks (a replica id from Redis could hold one)."""
    text = str(value)
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return text.encode("latin-1", errors="replace")


def _serialize(response: Response, keep_alive: bool) -> bytes:
    body = response.body
    return (
        _head(response.status, response.headers, b"Content-Length: %d\r\n" % len(body), keep_alive)
        + body
    )
