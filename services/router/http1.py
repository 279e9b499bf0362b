"""A lean HTTP/1.1 client for the router's engine calls: ``POST`` with a JSON body over kept-alive
connections, the answer read whole or as it arrives.

aiohttp's client does much more per call than the router needs (cookies, redirects, tracing
signals, timers per read, a stream reader per chunk). ``Http1Pool`` keeps idle connections per
``host:port`` (at most ``keepalive_s`` idle, closed when the engine closes them) and writes each
request with one socket write; ``Http1Response`` parses the status and headers once and hands the
body on as it arrives: whole (``read``) or a network read at a time (``readany``), with the
chunked transfer coding removed. Only what engines answer is handled: ``Content-Length``,
``chunked``, or a body that ends with the connection.

Errors: ``Http1ConnectError`` when no connection could be made (refused, unreachable, no answer
within ``connect_timeout_s``); ``Http1DisconnectedError`` when the connection dropped before the
answer's headers (a request on a reused connection that the engine had just closed is sent once
more on a new one first); ``Http1BodyError`` when it dropped in the middle of the body. Deadlines
on the whole call are the caller's (``asyncio.timeout``); cancelling a call closes its
connection, which is how an engine learns that the call was abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

__all__ = [
    "Http1BodyError",
    "Http1ConnectError",
    "Http1DisconnectedError",
    "Http1Error",
    "Http1Pool",
    "Http1Response",
]

_MAX_HEAD = 64 * 1024  # bytes of status line and headers
_HIGH_WATER = 256 * 1024  # buffered body bytes before the socket is paused


class Http1Error(Exception):
    """The engine call failed at the HTTP level (no answer, or an answer cut short)."""


class Http1ConnectError(Http1Error):
    """No connection could be made."""


class Http1DisconnectedError(Http1Error):
    """The connection dropped (or the answer made no sense) before the headers were read."""


class Http1BodyError(Http1Error):
    """The connection dropped in the middle of the answer's body."""


class _Connection(asyncio.Protocol):
    """One TCP connection: at most one request at a time, its answer parsed as it arrives."""

    __slots__ = (
        "_body_left",
        "_buffered",
        "_chunk_left",
        "_chunked",
        "_chunks",
        "_crlf",
        "_done",
        "_error",
        "_head",
        "_head_waiter",
        "_keep_alive",
        "_linger",
        "_paused",
        "_pending",
        "_sink",
        "_sink_error",
        "_sink_state",
        "_waiter",
        "closed",
        "idle_since",
        "key",
        "loop",
        "open",
        "response",
        "transport",
    )

    def __init__(self, key: str, open_: set[_Connection]) -> None:
        self.key = key
        self.open = open_  # the pool's open connections: this one while it is
        self.loop = asyncio.get_running_loop()  # kept: each look-up is a system call (3.11)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.response: Http1Response | None = None
        self._reset()

    def _reset(self) -> None:
        self._head = b""
        self._head_waiter: asyncio.Future[None] | None = None
        self._pending = b""  # undecoded body bytes (a chunk header cut in two)
        self._chunks: list[bytes] = []  # decoded body bytes not read yet
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the whole body arrived
        self._error: BaseException | None = None
        self._chunked = False
        self._body_left = -1  # Content-Length left; -1: chunked or until the connection ends
        self._chunk_left = 0  # bytes left in the current chunk
        self._crlf = False  # the CRLF after a chunk's data is due
        self._keep_alive = True
        self._paused = False
        self._linger: Http1Pool | None = None  # released before the body's end arrived
        # ``pipe``: body bytes handed to this callable as they arrive, without a task switch
        self._sink: Callable[[bytes], None] | None = None
        self._sink_error: Exception | None = None  # the sink raised it
        self._sink_state: str | None = None  # "paused" or "unpiped", asked by the sink

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it
        self.open.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._linger = None
        self.open.discard(self)
        if self.response is None:
            return
        if self._head_waiter is not None:
            self._fail_head(Http1DisconnectedError(_why("connection closed", exc)))
        elif not self._done:
            if self._body_left == -1 and not self._chunked:
                self._finish()  # a body that ends with the connection
            else:
                self._fail_body(Http1BodyError(_why("connection closed mid-answer", exc)))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def data_received(self, data: bytes) -> None:
        if self._head_waiter is not None:
            head = self._head + data if self._head else data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > _MAX_HEAD:
                    self._fail_head(Http1DisconnectedError("answer headers too long"))
                    self._close()
                else:
                    self._head = head
                return
            self._head = b""
            try:
                self._parse_head(head[:end])
            except (ValueError, IndexError) as exc:
                self._fail_head(Http1DisconnectedError(f"malformed answer: {exc}"))
                self._close()
                return
            waiter, self._head_waiter = self._head_waiter, None
            if not waiter.done():
                waiter.set_result(None)
            data = head[end + 4 :]
            if self._body_left == 0:
                self._finish()
                return
            if not data:
                return
        elif self.response is None or self._done:
            return  # nothing asked for it (an engine talking out of turn): ignored
        if self._chunked:
            self._feed_chunked(data)
        elif self._body_left >= 0:
            if len(data) >= self._body_left:
                data = data[: self._body_left]
                self._body_left = 0
                self._deliver(data)
                self._finish()
                return
            self._body_left -= len(data)
            self._deliver(data)
        else:
            self._deliver(data)

    # ------------------------------------------------------------------- parsing
    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if not parts[0].startswith(b"HTTP/1."):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        response = self.response
        assert response is not None
        response.status = status
        response.headers = headers
        connection = headers.get("connection", "").lower()
        self._keep_alive = parts[0] == b"HTTP/1.1" and connection != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
        elif "content-length" in headers:
            self._body_left = int(headers["content-length"])
            if self._body_left < 0:
                raise ValueError("negative Content-Length")
        elif status in (204, 304) or 100 <= status < 200:
            self._body_left = 0
        else:
            self._keep_alive = False  # the body ends with the connection

    def _feed_chunked(self, data: bytes) -> None:
        buf = self._pending + data if self._pending else data
        pos, size = 0, len(buf)
        out: list[bytes] = []
        while pos < size:
            if self._chunk_left:
                take = min(self._chunk_left, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if self._chunk_left:
                    break
                self._crlf = True
            if self._crlf:
                if size - pos < 2:
                    break
                pos += 2
                self._crlf = False
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            try:
                length = int(buf[pos:end].split(b";", 1)[0], 16)
            except ValueError:
                self._pending = b""
                if out:
                    self._deliver(b"".join(out))
                self._fail_body(Http1BodyError("malformed chunk size"))
                self._close()
                return
            if length == 0:  # the last chunk; trailers, if any, end with an empty line
                if buf.find(b"\r\n", end + 2) < 0:
                    break
                self._pending = b""
                if out:
                    self._deliver(b"".join(out))
                self._finish()
                return
            pos = end + 2
            self._chunk_left = length
        self._pending = buf[pos:]
        if out:
            self._deliver(b"".join(out))

    # ------------------------------------------------------------------- the body
    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self._linger is not None:  # body after the end the reader saw: not reusable
            self._linger = None
            self._close()
            return
        sink = self._sink
        if sink is not None:  # ``_to_sink``, inline: this runs once per network read
            try:
                sink(data)
            except Exception as exc:  # handed to the task in ``pipe``, not to the event loop
                self._sink = None
                self._sink_error = exc
                self._wake()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._done = True
        pool = self._linger
        if pool is not None:  # the reader had what it needed; now the connection is free
            self._linger = None
            self.response = None
            if self.reusable:
                pool._put(self)
            else:
                self._close()
            return
        self._wake()

    def _fail_head(self, exc: BaseException) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        self._keep_alive = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _fail_body(self, exc: BaseException) -> None:
        self._error = exc
        self._keep_alive = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _to_sink(self, data: bytes) -> None:
        sink = self._sink
        assert sink is not None
        try:
            sink(data)
        except Exception as exc:  # handed to the task in ``pipe``, not to the event loop
            self._sink = None
            self._sink_error = exc
            self._wake()

    async def pipe(self, sink: Callable[[bytes], None]) -> str:
        """Hand the body to ``sink`` as it arrives (buffered bytes first), from the protocol's
        callback, until the body ends ("end") or the sink asked to stop ("unpiped", ``unpipe``)
        or to wait ("paused", ``pause``: reading stays paused until ``resume``)."""
        self._sink = sink
        self._sink_state = cast(str | None, None)  # set by the sink (mypy: not narrowed)
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            self._buffered = 0
            self._to_sink(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self._paused and self._sink is not None:
            self.resume()  # paused at the high-water mark while nobody read
        try:
            while True:
                if self._sink_error is not None:
                    error, self._sink_error = self._sink_error, None
                    raise error
                if self._sink_state is not None:
                    state, self._sink_state = self._sink_state, None
                    return state
                if self._error is not None:
                    raise self._error
                if self._done:
                    return "end"
                self._waiter = self.loop.create_future()
                await self._waiter
        finally:
            self._sink = None

    def unpipe(self) -> None:
        """From inside the sink: stop handing it bytes; ``pipe`` returns "unpiped"."""
        self._sink = None
        self._sink_state = "unpiped"
        self._wake()

    def pause(self) -> None:
        """From inside the sink: stop reading; ``pipe`` returns "paused"."""
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._sink = None
        self._sink_state = "paused"
        self._wake()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def readany(self) -> bytes:
        while True:
            if self._chunks:
                chunks, self._chunks = self._chunks, []
                self._buffered = 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = self.loop.create_future()
            await self._waiter

    async def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            data = await self.readany()
            if not data:
                return b"".join(parts)
            parts.append(data)

    def start(self, response: Http1Response, request: bytes) -> asyncio.Future[None]:
        if self.transport is None or self.closed or self.transport.is_closing():
            raise Http1DisconnectedError("connection closed")
        self._reset()
        self.response = response
        self._head_waiter = waiter = self.loop.create_future()
        self.transport.write(request)
        return waiter

    @property
    def reusable(self) -> bool:
        return self._done and self._keep_alive and not self.closed and not self._chunks


class Http1Response:
    """An answer: ``status`` and ``headers`` (names in lower case) once ``Http1Pool.post``
    returned; the body through ``read`` or ``readany``; then ``release`` (the connection goes
    back to the pool if the body was read through) or ``close``."""

    __slots__ = ("_connection", "_pool", "headers", "status")

    def __init__(self, pool: Http1Pool, connection: _Connection) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self.status = 0
        self.headers: dict[str, str] = {}

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived."""
        connection = self._connection
        return connection is not None and connection._done

    async def read(self) -> bytes:
        """The whole body (``Http1BodyError`` if the connection dropped before its end)."""
        connection = self._connection
        if connection is None:
            raise Http1BodyError("answer closed")
        return await connection.read()

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last read (waiting for some); ``b""`` at the
        end."""
        connection = self._connection
        if connection is None:
            raise Http1BodyError("answer closed")
        return await connection.readany()

    async def pipe(self, sink: Callable[[bytes], None]) -> str:
        """The body handed to ``sink`` as it arrives, straight from the network callback (no
        task switch per read): see ``_Connection.pipe``. An exception the sink raises is raised
        here."""
        connection = self._connection
        if connection is None:
            raise Http1BodyError("answer closed")
        return await connection.pipe(sink)

    def unpipe(self) -> None:
        if self._connection is not None:
            self._connection.unpipe()

    def pause(self) -> None:
        if self._connection is not None:
            self._connection.pause()

    def resume(self) -> None:
        if self._connection is not None:
            self._connection.resume()

    def release(self) -> None:
        """Done with the answer: the connection is kept for the next call when the body was
        read through, else closed."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reusable:
            connection.response = None
            self._pool._put(connection)
        elif (
            connection._keep_alive
            and connection._error is None
            and connection._head_waiter is None
            and not connection.closed
            and not connection._chunks
        ):
            # The reader saw the end it needed (an SSE [DONE]) before the chunked body's last
            # chunk came: the connection joins the pool when it does.
            connection._linger = self._pool
        else:
            connection.response = None
            connection._close()

    def close(self) -> None:
        """Abandon the answer: its connection is closed (a reader waiting on it gets
        ``Http1BodyError``)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection._fail_body(Http1BodyError("answer closed"))
        if connection._head_waiter is not None:
            connection._fail_head(Http1DisconnectedError("answer closed"))
        connection.response = None
        connection._close()


class Http1Pool:
    """Kept-alive HTTP/1.1 connections to engines (see the module doc)."""

    def __init__(self, connect_timeout_s: float, keepalive_s: float = 30.0) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: dict[str, deque[_Connection]] = {}
        self._open: set[_Connection] = set()  # idle, in use, or waiting for a body's end
        self._addresses: dict[str, tuple[str, int, bytes]] = {}
        self._closed = False

    def _address(self, base_url: str) -> tuple[str, int, bytes]:
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise Http1ConnectError(f"not an http:// URL: {base_url!r}")
            port = parts.port or 80
            address = (parts.hostname, port, parts.netloc.encode("idna"))
            self._addresses[base_url] = address
        return address

    async def post(self, base_url: str, path: str, body: bytes) -> Http1Response:
        """``POST base_url + path`` with a JSON ``body``; returns once the answer's headers
        arrived."""
        if self._closed:
            raise Http1ConnectError("connection pool closed")
        host, port, netloc = self._address(base_url)
        request = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                netloc,
                b"\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        return await self._send(base_url, host, port, request)

    async def get(self, base_url: str, path: str) -> tuple[int, bytes]:
        """``GET base_url + path``, read whole: (status, body). A caller's deadline that ends
        it closes its connection."""
        if self._closed:
            raise Http1ConnectError("connection pool closed")
        host, port, netloc = self._address(base_url)
        request = b"GET %b HTTP/1.1\r\nHost: %b\r\nAccept: */*\r\n\r\n" % (path.encode(), netloc)
        response = await self._send(base_url, host, port, request)
        try:
            body = await response.read()
        except BaseException:
            response.close()
            raise
        response.release()
        return response.status, body

    async def _send(self, base_url: str, host: str, port: int, request: bytes) -> Http1Response:
        key = base_url
        while True:
            connection = self._take(key)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(key, host, port)
            response = Http1Response(self, connection)
            try:
                await connection.start(response, request)
            except Http1DisconnectedError:
                response.close()
                if reused:
                    continue  # the engine closed a kept-alive connection: once more, afresh
                raise
            except BaseException:
                response.close()
                raise
            return response

    async def _connect(self, key: str, host: str, port: int) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(key, self._open), host, port
                )
        except TimeoutError:
            raise Http1ConnectError(
                f"cannot connect to {host}:{port}: no answer in {self._connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise Http1ConnectError(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        if self._closed:  # closed while this connection was being made: it must not outlive it
            connection._close()
            raise Http1ConnectError("connection pool closed")
        return connection

    def _take(self, key: str) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recent: the least likely to have timed out
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection._close()
        return None

    def _put(self, connection: _Connection) -> None:
        if self._closed:
            connection._close()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.key, deque()).append(connection)

    def close(self) -> None:
        """Close every connection: idle, in use (a reader of its answer gets
        ``Http1BodyError``), or released at an SSE ``[DONE]`` and waiting for the body's last
        chunk. None outlives the pool: one left open would be a socket that only the garbage
        collector closes, after its event loop is gone."""
        self._closed = True
        self._idle.clear()
        for connection in list(self._open):
            connection._fail_body(Http1BodyError("connection pool closed"))
            connection._fail_head(Http1DisconnectedError("connection pool closed"))
            connection._close()
        self._open.clear()


def _why(what: str, exc: BaseException | None) -> str:
    return f"{what}: {exc}" if exc is not None else what
