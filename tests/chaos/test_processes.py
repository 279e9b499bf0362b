"""Processes killed under load: real router and engine-like upstream processes
(``python -m services.router.scripted_upstream``) signalled for real. Every call must complete
or end with a clear error within ``CALL_BOUND_S``; nothing is routed to a dead replica once a
health interval has passed. Real vLLM engines killed and stopped: ``test_engine_signals``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from services.core.routing import Endpoint
from services.runtime.redis_server import RedisServer, free_port
from services.runtime.store import Store

REPO = Path(__file__).resolve().parents[2]
CALL_BOUND_S = 10.0
HEALTH_INTERVAL_S = 0.2


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
            p.wait(10)


async def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} not up"
            await asyncio.sleep(0.05)


async def _setup(
    tmp_path: Path, redis: RedisServer, procs: list[subprocess.Popen[bytes]], n: int, **flags: str
) -> tuple[str, list[str], subprocess.Popen[bytes]]:
    urls = []
    store = Store.connect(redis.url, 2.0, "chaos")
    for i in range(n):
        port = free_port()
        procs.append(
            _spawn(
                ["services.router.scripted_upstream", "--model", "m", "--port", str(port),
                 "--tokens", "20", "--token-delay", "0.05"],
                tmp_path / f"up{i}.log",
            )
        )  # fmt: skip
        urls.append(f"http://127.0.0.1:{port}")
        await _wait_http(urls[-1] + "/health")
        await store.put_endpoint(Endpoint("m", f"m-{i}", urls[-1]))
    await store.close()
    http = free_port()
    argv = ["services.router", "--redis-url", redis.url, "--namespace", "chaos",
            "--http-port", str(http), "--health-interval-s", str(HEALTH_INTERVAL_S),
            "--health-timeout-s", "0.5", "--eject-after", "2", "--log-level", "warning",
            "--drain-s", "0.3", "--grace-s", "5"]  # fmt: skip
    for key, value in flags.items():
        argv += [f"--{key.replace('_', '-')}", value]
    router = _spawn(argv, tmp_path / "router.log")
    procs.append(router)
    await _wait_http(f"http://127.0.0.1:{http}/health")
    return f"http://127.0.0.1:{http}", urls, router


async def _client(url: str, stop: asyncio.Event, outcomes: Counter[str], stream: bool) -> None:
    """Calls until ``stop``; each outcome counted: 200 (complete), an HTTP error status, an
    error event inside a stream ("stream-error"), a refused connection, or "hung"."""
    timeout = aiohttp.ClientTimeout(total=CALL_BOUND_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while not stop.is_set():
            body = {"model": "m", "prompt": "p", "stream": stream}
            try:
                async with session.post(url + "/v1/completions", json=body) as reply:
                    text = await reply.text()
                    if reply.status != 200:
                        outcomes[str(reply.status)] += 1
                    elif stream and '"error"' in text:
                        outcomes["stream-error"] += 1
                        assert "replica" in text, text  # the error names what happened
                    elif stream and "[DONE]" not in text:
                        outcomes["truncated"] += 1
                    else:
                        outcomes["200"] += 1
            except TimeoutError:
                outcomes["hung"] += 1
            except aiohttp.ClientConnectionError:
                outcomes["refused"] += 1
                await asyncio.sleep(0.05)


async def _replica_calls(url: str) -> dict[str, float]:
    """The router's in-flight gauge per replica, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as reply:
        text = await reply.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("scepsy_router_in_flight{"):
            replica = line.split('replica="')[1].split('"')[0]
            out[replica] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
async def test_an_engine_dies_or_hangs_under_load(
    tmp_path: Path, redis_server: RedisServer, procs: list[subprocess.Popen[bytes]], sig: str
) -> None:
    """SIGKILL: connections reset at once. SIGSTOP: the process keeps its connections open and
    answers nothing (what a vLLM engine given SIGTERM does to its streams), so only the
    router's ejection ends the calls on it."""
    url, _, _ = await _setup(tmp_path, redis_server, procs, 2)
    victim = procs[0]
    stop, outcomes = asyncio.Event(), Counter[str]()
    clients = [
        asyncio.create_task(_client(url, stop, outcomes, stream=i % 2 == 0)) for i in range(6)
    ]
    await asyncio.sleep(1.0)
    os.kill(victim.pid, getattr(signal, sig))
    killed = time.monotonic()
    # after the ejection bound (one check forgiven for the calls it had just served, then
    # eject_after failed checks, each at most its timeout), the dead replica holds no call and
    # gets none
    await asyncio.sleep((1 + 2) * (HEALTH_INTERVAL_S + 0.5) + 1.0)
    assert (await _replica_calls(url)).get("m-0", 0) == 0
    before = sum(outcomes.values())
    await asyncio.sleep(1.0)
    assert (await _replica_calls(url)).get("m-0", 0) == 0
    stop.set()
    await asyncio.gather(*clients)
    print(f"chaos engine {sig}: {dict(outcomes)}")  # the figures (pytest -s)
    assert outcomes["hung"] == 0 and outcomes["truncated"] == 0, outcomes
    assert sum(outcomes.values()) > before
    assert outcomes["200"] > 0
    unexpected = set(outcomes) - {"200", "502", "stream-error"}
    assert not unexpected, outcomes
    assert time.monotonic() - killed < CALL_BOUND_S + 5


async def test_router_sigterm_with_calls_in_flight(
    tmp_path: Path, redis_server: RedisServer, procs: list[subprocess.Popen[bytes]]
) -> None:
    """In-flight calls finish, calls arriving during the drain get 503 with Retry-After, the
    process exits within its grace period; no call hangs."""
    url, _, router = await _setup(tmp_path, redis_server, procs, 1)
    stop, outcomes = asyncio.Event(), Counter[str]()
    clients = [asyncio.create_task(_client(url, stop, outcomes, stream=True)) for _ in range(4)]
    await asyncio.sleep(1.0)
    router.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = await asyncio.to_thread(router.wait, 15)
    stopped_in = time.monotonic() - started
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)
    print(f"chaos router SIGTERM: {dict(outcomes)}, exited in {stopped_in:.2f} s")
    assert code == 0 and stopped_in < 5 + 0.3 + 3
    assert outcomes["hung"] == 0 and outcomes["truncated"] == 0, outcomes
    assert outcomes["200"] > 0 and outcomes["503"] + outcomes["refused"] > 0, outcomes
    assert set(outcomes) <= {"200", "503", "refused"}, outcomes
    log = (tmp_path / "router.log").read_text()
    assert "router_stop_with_calls_in_flight" not in log  # every in-flight call finished
