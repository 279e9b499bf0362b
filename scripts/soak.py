"""A long run of the router under load and faults, with a memory check (outside CI).

Starts a persistent, password-locked Redis (as ``scepsy up`` does), two engine-like upstream
processes (``services.router.scripted_upstream``) and a router process, then calls the router at
``--rate`` calls/s (half streamed) for ``--minutes``. Every ``--chaos-every`` seconds one fault,
in turn: an upstream SIGKILLed and started again on its port, Redis restarted with its data,
Redis restarted empty. The router's resident memory is sampled every 10 s.

Prints a table of outcomes (complete, clear errors by status, hung) and memory (first sample
after the warm-up, last, most), and exits 1 when a call hung or memory grew more than
``--max-growth-mb`` between the warm-up and the end.

    .venv/bin/python scripts/soak.py [--minutes 30] [--rate 50] [--chaos-every 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.routing import Endpoint  # noqa: E402
from services.runtime.redis_server import RedisServer, free_port  # noqa: E402
from services.runtime.store import Store  # noqa: E402

CALL_BOUND_S = 30.0


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="scepsy-soak-"))
        self.redis = RedisServer.embedded(self.work / "home")
        self.ports = [free_port(), free_port()]
        self.upstreams: list[subprocess.Popen[bytes]] = []
        self.router: subprocess.Popen[bytes] | None = None
        self.http = free_port()
        self.outcomes: Counter[str] = Counter()
        self.memory: list[tuple[float, float]] = []
        self.faults: list[str] = []

    def upstream(self, i: int) -> subprocess.Popen[bytes]:
        return spawn(
            ["services.router.scripted_upstream", "--model", "m", "--port", str(self.ports[i]),
             "--tokens", "16", "--token-delay", "0.01"],
            self.work / f"upstream-{i}.log",
        )  # fmt: skip

    async def start(self) -> str:
        self.redis.start()
        self.upstreams = [self.upstream(i) for i in range(2)]
        store = Store.connect(self.redis.url, 2.0, "soak")
        for i, port in enumerate(self.ports):
            await wait_http(f"http://127.0.0.1:{port}/health")
            await store.put_endpoint(Endpoint("m", f"m-{i}", f"http://127.0.0.1:{port}"))
        await store.close()
        env_args = ["services.router", "--redis-url", self.redis.public_url,
                    "--redis-password-file", str(self.redis.password_file),
                    "--namespace", "soak", "--http-port", str(self.http),
                    "--log-level", "warning", "--health-interval-s", "0.5"]  # fmt: skip
        self.router = spawn(env_args, self.work / "router.log")
        url = f"http://127.0.0.1:{self.http}"
        await wait_http(url + "/health")
        return url

    def stop(self) -> None:
        for p in [*self.upstreams, *([self.router] if self.router else [])]:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.redis.stop()

    async def fault(self, n: int) -> None:
        kind = n % 3
        if kind == 0:
            i = random.randrange(2)
            self.upstreams[i].send_signal(signal.SIGKILL)
            self.upstreams[i].wait()
            await asyncio.sleep(1.0)
            self.upstreams[i] = self.upstream(i)
            self.faults.append(f"upstream {i} killed and restarted")
        else:
            await asyncio.to_thread(self.redis.restart, kind == 1)
            self.faults.append(f"redis restarted {'with' if kind == 1 else 'without'} data")

    async def call(self, session: aiohttp.ClientSession, url: str, stream: bool) -> None:
        body = {"model": "m", "prompt": "soak", "stream": stream}
        try:
            async with session.post(url + "/v1/completions", json=body) as reply:
                text = await reply.text()
                if reply.status != 200:
                    self.outcomes[f"HTTP {reply.status}"] += 1
                elif stream and '"error"' in text:
                    self.outcomes["stream error event"] += 1
                else:
                    self.outcomes["complete"] += 1
        except TimeoutError:
            self.outcomes["hung"] += 1
        except aiohttp.ClientError as exc:
            self.outcomes[f"client error {type(exc).__name__}"] += 1

    async def run(self) -> None:
        url = await self.start()
        args = self.args
        started = time.monotonic()
        end = started + args.minutes * 60
        timeout = aiohttp.ClientTimeout(total=CALL_BOUND_S)
        calls: set[asyncio.Task[None]] = set()
        next_fault, next_sample, faults = started + args.chaos_every, started + 30.0, 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            i = 0
            while (now := time.monotonic()) < end:
                due = started + i / args.rate
                if due > now:
                    await asyncio.sleep(min(due - now, 0.05))
                    continue
                task = asyncio.create_task(self.call(session, url, stream=i % 2 == 0))
                calls.add(task)
                task.add_done_callback(calls.discard)
                i += 1
                if now >= next_fault:
                    await self.fault(faults)
                    faults, next_fault = faults + 1, now + args.chaos_every
                if now >= next_sample and self.router is not None:
                    self.memory.append((now - started, rss_mb(self.router.pid)))
                    next_sample = now + 10.0
            await asyncio.gather(*calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=50.0, help="calls per second")
    parser.add_argument("--chaos-every", type=float, default=60.0, help="seconds between faults")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    args = parser.parse_args()
    soak = Soak(args)
    try:
        asyncio.run(soak.run())
    finally:
        soak.stop()
    total = sum(soak.outcomes.values())
    print(f"{'outcome':<36} {'calls':>8}")
    for outcome, count in soak.outcomes.most_common():
        print(f"{outcome:<36} {count:>8}")
    print(f"{'total':<36} {total:>8}")
    print("faults:", "; ".join(soak.faults) or "none")
    growth = 0.0
    if soak.memory:
        first, last = soak.memory[0][1], soak.memory[-1][1]
        growth = last - first
        most = max(m for _, m in soak.memory)
        print(f"router RSS MB: after warm-up {first:.1f}, last {last:.1f}, most {most:.1f}, "
              f"growth {growth:+.1f}")  # fmt: skip
    ok = soak.outcomes["hung"] == 0 and growth <= args.max_growth_mb
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
