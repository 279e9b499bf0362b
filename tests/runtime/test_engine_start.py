"""``scepsy engine start --replicas 2`` on real vLLM CPU engines: a replica that dies is reported
and started again, while the other one keeps answering; SIGTERM then stops every engine.

The engine venv (``make engine-venv``) is needed: without it the test skips locally and fails under
CI. Two engines at most run here (the tiny random Llama).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from services.runtime.engines import port_is_free, process_group_alive, run_engine_module

pytestmark = [pytest.mark.engine, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def tiny_model(vllm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(out)])
    return out


def _complete(url: str, timeout_s: float = 30.0) -> str:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with _HTTP.open(request, timeout=timeout_s) as reply:
        text: str = json.load(reply)["choices"][0]["text"]
    return text


def _lines(stream: IO[str], into: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        if line.startswith("{"):
            into.put(json.loads(line))


def _next_event(events: queue.Queue[dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    try:
        return events.get(timeout=timeout_s)
    except queue.Empty:
        raise AssertionError(f"no event from `scepsy engine start` within {timeout_s} s") from None


@pytest.fixture
def started(
    vllm: Path, tiny_model: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[dict[str, Any]]]]:
    process = subprocess.Popen(
        [
            sys.executable, "-m", "services.cli", "engine", "start",
            "--model-dir", str(tiny_model), "--name", "tiny", "--replicas", "2",
            "--log-dir", str(tmp_path / "logs"), "--json",
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=_lines, args=(process.stdout, events), daemon=True).start()
    try:
        yield process, events
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


def test_a_dead_replica_is_reported_and_restarted_while_the_other_keeps_serving(
    started: tuple[subprocess.Popen[str], queue.Queue[dict[str, Any]]],
) -> None:
    process, events = started
    rows = _next_event(events, timeout_s=600)["engines"]
    assert [r["replica"] for r in rows] == [0, 1]
    victim, survivor = rows
    assert _complete(victim["url"]) == _complete(survivor["url"])

    os.killpg(victim["pid"], signal.SIGKILL)  # the engine and its workers, at once
    # the survivor keeps answering while the victim is down (and the command keeps running)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert _complete(survivor["url"])
        time.sleep(0.5)
    assert process.poll() is None, "engine start stopped when one replica died"

    exited = _next_event(events, timeout_s=30)  # reported...
    assert exited["event"] == "engine_exited"
    assert exited["replica"] == 0 and exited["code"] == -signal.SIGKILL
    assert exited["log"] == victim["log"]
    restarting = _next_event(events, timeout_s=30)  # ...and started again on its port
    assert restarting["event"] == "engine_restarting" and restarting["replica"] == 0
    back = _next_event(events, timeout_s=600)
    assert back["event"] == "engine_serving", back
    assert back["replica"] == 0 and back["url"] == victim["url"]
    assert back["pid"] != victim["pid"] and back["restarts"] == 1
    assert _complete(back["url"]) == _complete(survivor["url"])

    # SIGTERM stops both engines and every process they started, and frees their ports
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    for pid in (back["pid"], survivor["pid"]):
        assert process_group_alive(pid) == []
    for row in (back, survivor):
        assert port_is_free(row["port"])
    with pytest.raises(urllib.error.URLError):
        _complete(survivor["url"], timeout_s=2)
