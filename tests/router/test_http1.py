"""The router's HTTP/1.1 client for engine calls (``services.router.http1``) against real servers
on loopback: a scripted engine (aiohttp) and raw sockets that answer exactly the bytes a test
gives, split as the test splits them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from services.router.http1 import (
    Http1BodyError,
    Http1ConnectError,
    Http1DisconnectedError,
    Http1Pool,
)
from services.router.scripted_upstream import ScriptedUpstream
from services.runtime.redis_server import free_port
from tests.router.conftest import wait_until

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RawServer = Callable[[Answer], Awaitable[tuple[str, list[int]]]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawServer]:
    """A TCP server running ``answer`` per connection; yields its URL and a list that counts the
    connections it accepted."""
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> tuple[str, list[int]]:
        accepted: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            try:
                await answer(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", accepted

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def _answers(*parts: bytes, pause_s: float = 0.02, keep: bool = True) -> Answer:
    """Answer each request with ``parts`` (written one by one, with a pause between)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await _request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(pause_s)
            if not keep:
                return

    return answer


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def test_a_scripted_engine_answers_plain_and_streamed_calls_on_one_kept_connection() -> None:
    engine = ScriptedUpstream("m", tokens=3)
    url = f"http://127.0.0.1:{await engine.start()}"
    pool = Http1Pool(connect_timeout_s=2.0)
    try:
        plain = await pool.post(url, "/v1/completions", b'{"model": "m", "prompt": "x"}')
        assert plain.status == 200 and plain.headers["content-type"].startswith("application/json")
        assert b'"text": "w0 w1 w2"' in await plain.read()
        plain.release()
        streamed = await pool.post(
            url, "/v1/completions", b'{"model": "m", "prompt": "x", "stream": true}'
        )
        body = b""
        while chunk := await streamed.readany():
            body += chunk
        streamed.release()
        assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")
        missing = await pool.post(url, "/v1/completions", b'{"model": "other", "prompt": "x"}')
        assert missing.status == 404 and b"does not exist" in await missing.read()
        missing.release()
        assert engine.connections == 1  # one connection, kept alive across the three calls
    finally:
        pool.close()
        await engine.stop()


async def test_chunks_split_anywhere_are_decoded(raw_server: RawServer) -> None:
    # the chunk sizes, data and CRLFs arrive cut at awkward places, with an extension and trailers
    wire = CHUNKED_HEAD + b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\n"
    cuts = [len(CHUNKED_HEAD) - 3, len(CHUNKED_HEAD) + 1, len(CHUNKED_HEAD) + 9, len(wire) - 4]
    parts = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    url, accepted = await raw_server(_answers(*parts))
    pool = Http1Pool(connect_timeout_s=2.0)
    for _ in range(2):
        response = await pool.post(url, "/v1/completions", b"{}")
        assert await response.read() == b"hello world"
        response.release()
    assert len(accepted) == 1  # the whole body was read: the connection was kept
    pool.close()


async def test_content_length_and_connection_close_bodies(raw_server: RawServer) -> None:
    sized = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"
    url, accepted = await raw_server(_answers(sized, b"cde"))
    pool = Http1Pool(connect_timeout_s=2.0)
    response = await pool.post(url, "/x", b"{}")
    assert await response.read() == b"abcde"
    response.release()
    # HTTP/1.0 without a length: the body is what comes until the engine closes
    url10, _ = await raw_server(_answers(b"HTTP/1.0 200 OK\r\n\r\nuntil ", b"closed", keep=False))
    response = await pool.post(url10, "/x", b"{}")
    assert await response.read() == b"until closed"
    response.release()
    pool.close()
    assert len(accepted) == 1


async def test_a_stream_released_at_done_returns_its_connection_once_the_last_chunk_came(
    raw_server: RawServer,
) -> None:
    event = b"data: [DONE]\n\n"
    url, accepted = await raw_server(
        _answers(CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(event), event), b"0\r\n\r\n", pause_s=0.1)
    )
    pool = Http1Pool(connect_timeout_s=2.0)
    response = await pool.post(url, "/x", b"{}")
    assert await response.readany() == event
    response.release()  # before the last chunk arrived
    await asyncio.sleep(0.3)
    again = await pool.post(url, "/x", b"{}")
    assert await again.readany() == event
    again.close()
    assert len(accepted) == 1
    pool.close()


async def test_closing_the_pool_closes_connections_in_use_and_waiting_for_a_last_chunk(
    raw_server: RawServer,
) -> None:
    # One stream released at [DONE] whose last chunk never comes, one answer still being read:
    # closing the pool closes both (the engine sees each end), and the reader is told.
    event = b"data: [DONE]\n\n"
    ended: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        ended.append(await reader.read())  # b"" once the client closed its end

    url, accepted = await raw_server(answer)
    pool = Http1Pool(connect_timeout_s=2.0)
    released = await pool.post(url, "/x", b"{}")
    assert await released.readany() == event
    released.release()  # waits for the last chunk, which never comes
    reading = await pool.post(url, "/x", b"{}")
    assert await reading.readany() == event
    reader = asyncio.create_task(reading.readany())
    await asyncio.sleep(0.05)
    assert len(accepted) == 2 and not ended and not reader.done()
    pool.close()
    with pytest.raises(Http1BodyError, match="pool closed"):
        await asyncio.wait_for(reader, 5)
    await wait_until(lambda: len(ended) == 2)
    assert ended == [b"", b""]
    with pytest.raises(Http1ConnectError, match="pool closed"):
        await pool.post(url, "/x", b"{}")

    # closed while a connection was being made: that one is closed too, not handed out
    async def until_closed(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
        ended.append(await reader.read())

    url, accepted = await raw_server(until_closed)
    other = Http1Pool(connect_timeout_s=2.0)
    connecting = asyncio.create_task(other.post(url, "/x", b"{}"))
    await asyncio.sleep(0)  # the post is inside create_connection now
    other.close()
    with pytest.raises(Http1ConnectError, match="pool closed"):
        await asyncio.wait_for(connecting, 5)
    await wait_until(lambda: len(ended) == 3)
    assert len(accepted) == 1 and ended[2] == b""


async def test_failures_are_told_apart() -> None:
    pool = Http1Pool(connect_timeout_s=2.0)
    with pytest.raises(Http1ConnectError, match="cannot connect"):
        await pool.post(f"http://127.0.0.1:{free_port()}", "/x", b"{}")
    pool.close()


async def test_disconnects_before_and_during_the_answer(raw_server: RawServer) -> None:
    pool = Http1Pool(connect_timeout_s=2.0)
    url, _ = await raw_server(_answers(keep=False))  # reads the request, closes
    with pytest.raises(Http1DisconnectedError):
        await pool.post(url, "/x", b"{}")
    url, _ = await raw_server(_answers(CHUNKED_HEAD + b"5\r\nhel", keep=False))
    response = await pool.post(url, "/x", b"{}")
    with pytest.raises(Http1BodyError, match="mid-answer"):
        await response.read()
    response.close()
    url, _ = await raw_server(_answers(b"SSH-2.0-not http\r\n\r\n"))
    with pytest.raises(Http1DisconnectedError, match="malformed"):
        await pool.post(url, "/x", b"{}")
    pool.close()


async def test_a_kept_connection_the_engine_closed_is_replaced(raw_server: RawServer) -> None:
    # the engine answers one call per connection and closes it without saying so
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    url, accepted = await raw_server(_answers(answer, keep=False, pause_s=0))
    pool = Http1Pool(connect_timeout_s=2.0)
    for _ in range(3):
        response = await pool.post(url, "/x", b"{}")
        assert await response.read() == b"ok"
        response.release()
    assert len(accepted) == 3
    pool.close()


async def test_closing_an_answer_ends_its_reader_and_the_connection(raw_server: RawServer) -> None:
    url, _ = await raw_server(_answers(CHUNKED_HEAD + b"2\r\nhi\r\n", pause_s=30))
    pool = Http1Pool(connect_timeout_s=2.0)
    response = await pool.post(url, "/x", b"{}")
    assert await response.readany() == b"hi"
    reader = asyncio.create_task(response.readany())
    await asyncio.sleep(0.05)
    response.close()
    with pytest.raises(Http1BodyError):
        await asyncio.wait_for(reader, 2)
    pool.close()


async def test_pipe_hands_the_body_to_a_sink_as_it_arrives_and_pauses_when_asked(
    raw_server: RawServer,
) -> None:
    parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (b"one ", b"two ", b"three")]
    url, accepted = await raw_server(_answers(CHUNKED_HEAD + parts[0], *parts[1:], b"0\r\n\r\n"))
    pool = Http1Pool(connect_timeout_s=2.0)
    response = await pool.post(url, "/x", b"{}")
    seen: list[bytes] = []

    def pause_after_first(data: bytes) -> None:
        seen.append(data)
        response.pause()  # a client that reads slower than the engine writes

    assert await response.pipe(pause_after_first) == "paused"
    assert seen == [b"one "]
    await asyncio.sleep(0.1)  # the engine wrote more meanwhile; nothing is read while paused
    assert seen == [b"one "]
    response.resume()
    assert await response.pipe(seen.append) == "end"
    assert b"".join(seen) == b"one two three"
    response.release()
    again = await pool.post(url, "/x", b"{}")  # read through: the connection is kept
    assert await again.read() == b"one two three"
    again.release()
    assert len(accepted) == 1
    pool.close()


async def test_pipe_raises_what_its_sink_raised_and_unpipe_stops_it(raw_server: RawServer) -> None:
    parts = [b"%x\r\n%s\r\n" % (len(p), p) for p in (b"a", b"b")]
    url, _ = await raw_server(_answers(CHUNKED_HEAD + parts[0], parts[1], b"0\r\n\r\n"))
    pool = Http1Pool(connect_timeout_s=2.0)
    response = await pool.post(url, "/x", b"{}")

    def broken(data: bytes) -> None:
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError, match="client went away"):
        await response.pipe(broken)
    response.close()
    response = await pool.post(url, "/x", b"{}")
    seen: list[bytes] = []

    def first_only(data: bytes) -> None:
        seen.append(data)
        response.unpipe()

    assert await response.pipe(first_only) == "unpiped"
    assert seen == [b"a"]
    response.close()
    pool.close()


async def test_get_reads_a_whole_answer_on_a_kept_connection(raw_server: RawServer) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            assert head.startswith(b"GET /health HTTP/1.1\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url, accepted = await raw_server(answer)
    pool = Http1Pool(connect_timeout_s=2.0)
    assert [await pool.get(url, "/health") for _ in range(3)] == [(200, b"ok")] * 3
    assert len(accepted) == 1
    pool.close()
