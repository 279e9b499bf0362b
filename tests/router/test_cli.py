"""``scepsy endpoints``, ``scepsy trace export`` and ``scepsy router`` (parsers as the CLI
registers them; the router as a real subprocess for the SIGTERM test)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from services.cli import router as router_cli
from services.cli import trace as trace_cli
from services.core.errors import NotFoundError
from services.core.trace import TraceCall, dumps, read_trace
from services.runtime.redis_server import free_port
from services.runtime.store import Store
from tests.router.conftest import StartEngine, register, wait_until

REPO = Path(__file__).resolve().parents[2]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="scepsy")
    sub = parser.add_subparsers(dest="command", required=True)
    router_cli.register(sub)
    trace_cli.register(sub)
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_endpoints_add_list_remove(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--redis-url", redis_url, "--namespace", namespace]
    out = _run(["endpoints", "add", "llama", "http://10.0.0.5:8000/", *flags], capsys)
    assert out == "added llama replica 10.0.0.5:8000 at http://10.0.0.5:8000\n"
    _run(["endpoints", "add", "llama", "http://10.0.0.6:8000", "--replica", "big", "--weight",
          "2", *flags], capsys)  # fmt: skip
    listed = json.loads(_run(["endpoints", "list", "--json", *flags], capsys))
    assert listed["endpoints"] == [
        {"model": "llama", "replica": "10.0.0.5:8000", "url": "http://10.0.0.5:8000",
         "weight": 1.0},
        {"model": "llama", "replica": "big", "url": "http://10.0.0.6:8000", "weight": 2.0},
    ]  # fmt: skip
    table = _run(["endpoints", "list", *flags], capsys)
    assert table.splitlines()[0].split() == ["MODEL", "REPLICA", "URL", "WEIGHT"]
    removed = _run(
        ["endpoints", "remove", "llama", "http://10.0.0.6:8000", "--json", *flags], capsys
    )
    assert json.loads(removed) == {"model": "llama", "removed": ["big"]}
    _run(["endpoints", "remove", "llama", "10.0.0.5:8000", *flags], capsys)
    assert "no endpoints" in _run(["endpoints", "list", *flags], capsys)
    with pytest.raises(NotFoundError, match="no replica"):
        _run(["endpoints", "remove", "llama", "http://10.0.0.5:8000", *flags], capsys)


async def test_trace_export_writes_the_stream_once_per_call(
    store: Store, redis_url: str, namespace: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    calls = [
        TraceCall("wf", f"r{i // 2}", f"c{i}", "m", float(i), i + 0.5, 10, 5, status="ok")
        for i in range(2500)
    ]
    lines = [dumps(c) for c in calls]
    await store.append_trace(lines, max_len=100_000)
    await store.append_trace(lines[:3], max_len=100_000)  # a retried write stored twice
    out = tmp_path / "t.jsonl"
    argv = ["trace", "export", "--out", str(out), "--redis-url", redis_url,
            "--namespace", namespace, "--json"]  # fmt: skip
    printed = await asyncio.to_thread(_run, argv, capsys)
    assert json.loads(printed) == {"out": str(out), "calls": 2500}
    assert read_trace(out).calls == tuple(calls)


def test_router_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="scepsy")
    router_cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["router", "--help"])
    text = capsys.readouterr().out
    for flag in ("--http-port", "--policy", "--max-in-flight", "--api-keys", "--trace-max-len"):
        assert flag in text


async def _wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/health") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, "router did not start"
            await asyncio.sleep(0.1)


async def test_sigterm_stops_accepting_finishes_in_flight_calls_and_exits(
    start_engine: StartEngine, store: Store, redis_url: str, namespace: str
) -> None:
    engine = await start_engine("m", first_token_delay_s=1.0)
    await register(store, "m", engine)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.router", "--redis-url", redis_url,
        "--namespace", namespace, "--http-port", str(port), "--drain-s", "0.2",
        "--log-format", "json",
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_healthy(url)
        async with aiohttp.ClientSession() as session:

            async def call() -> int:
                body = {"model": "m", "prompt": "slow"}
                async with session.post(url + "/v1/completions", json=body) as reply:
                    await reply.read()
                    return reply.status

            in_flight = asyncio.create_task(call())
            await wait_until(lambda: engine.in_flight > 0)
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # past drain_s: no longer accepting, the call still runs
            assert not in_flight.done()
            async with aiohttp.ClientSession() as fresh:
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fresh.get(url + "/health")
            assert await in_flight == 200
            code = await asyncio.wait_for(process.wait(), 15)
            assert code == 0
            assert time.monotonic() - sent < 10
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert '"event": "router_stopped"' in logs
