"""``scepsy endpoints``, ``scepsy trace export`` and ``scepsy router`` (parsers as the CLI
registers them). The router as a real subprocess stopped by SIGTERM is tested in ``test_engines``,
with a real engine call in flight."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import router as router_cli
from services.cli import trace as trace_cli
from services.core.errors import NotFoundError
from services.core.workload.trace import TraceCall, dumps, read_trace
from services.runtime.store import Store

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


def test_a_taken_http_port_is_a_clear_error(redis_url: str, namespace: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "services.router", "--redis-url", redis_url,
             "--namespace", namespace, "--host", "127.0.0.1", "--http-port", str(port),
             "--metrics-port", "0"],
            check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: http_port: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in done.stderr
