"""Benchmark: the ALP's predictions against real vLLM CPU engines behind the router.

Starts a Redis server, the router (its own process) and two tiny-model engines, each bound to its
own core, and registers them: engine A serves ``reranker`` and ``policy``, engine B
``generator`` and ``prm`` (one LLM of each workflow per engine). Then for RAG and beam search
(``driver.tiny_workflow``) it runs ``scepsy validate``'s procedure (``services.cli.validate``):
a pilot run gives the demand (n_m, p_m, stages, tool time) and each LLM's request mix, each
LLM is profiled on its engine by the ``vllm`` backend (measured), the ALP predicts throughput T
and the latency at fractions of it, and the workflow runs at each of those rates and above
capacity. Target: median error at most 15 % for latency and throughput, light load to 80 % of T.

    flock /tmp/scepsy-engines.lock .venv/bin/python scripts/bench_validate.py
        [--workflows rag,beam] [--load 0.2,0.5,0.8] [--requests 24] [--profiles measured]
        [--out DIR]

Needs the engine venv (``make engine-venv``; ``SCEPSY_ENGINE_VENV``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.cli.validate import (  # noqa: E402
    PROFILE_SOURCES,
    Validation,
    format_result,
    summary,
    write_outputs,
)
from services.core.errors import NotFoundError  # noqa: E402
from services.core.routing import Endpoint  # noqa: E402
from services.runtime.engines import (  # noqa: E402
    EngineSpec,
    LocalEngine,
    run_engine_module,
    stop_engines,
    vllm_executable,
)
from services.runtime.redis_server import RedisServer, free_port  # noqa: E402
from services.runtime.store import Store  # noqa: E402

NAMESPACE = "bench-validate"
ENGINES = {"a": ("reranker", "policy"), "b": ("generator", "prm")}
TARGET_PCT = 15.0


async def wait_models(router_url: str, models: set[str], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(trust_env=False) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(router_url + "/v1/models") as reply:
                    if models <= {m["id"] for m in (await reply.json())["data"]}:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the router never listed {sorted(models)}")


async def run_all(
    args: argparse.Namespace, redis_url: str, router_url: str, urls: dict[str, str]
) -> list[dict[str, Any]]:
    store = Store.connect(redis_url, namespace=NAMESPACE)
    results = []
    try:
        for name, url in urls.items():
            for model in ENGINES[name]:
                await store.put_endpoint(Endpoint(model, f"{model}-0", url))
        await wait_models(router_url, {m for ms in ENGINES.values() for m in ms})
        for workflow in args.workflows.split(","):
            ns = argparse.Namespace(
                workflow=workflow,
                router=router_url,
                scale="tiny",
                gpu="cpu",
                profiles=args.profiles,
                load=args.load,
                rates=None,
                requests=args.requests,
                seconds=args.seconds,
                pilot_rate=args.pilot_rate,
                pilot_requests=args.pilot_requests,
                capacity_requests=args.capacity_requests,
                profile_budget=args.profile_budget,
                profile_via=args.profile_via,
                seed=0,
            )
            result = await Validation(ns, store).run()
            print(format_result(result), flush=True)
            if args.out is not None:
                for note in write_outputs(result, args.out / workflow):
                    print(note)
            results.append(result)
    finally:
        await store.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows", default="rag,beam")
    parser.add_argument("--load", default="0.2,0.5,0.8")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=45.0, help="at most per rate")
    parser.add_argument("--pilot-rate", type=float, default=0.3)
    parser.add_argument("--pilot-requests", type=int, default=10)
    parser.add_argument("--capacity-requests", type=int, default=30)
    parser.add_argument("--profile-budget", type=float, default=100.0)
    parser.add_argument("--profiles", choices=PROFILE_SOURCES, default="joint")
    parser.add_argument("--profile-via", choices=("router", "engine"), default="router")
    parser.add_argument("--out", type=Path, help="validate.csv / validate.png per workflow")
    args = parser.parse_args()

    try:
        vllm_executable()
    except NotFoundError as exc:
        print(f"no engine venv, nothing measured: {exc}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="scepsy-bench-validate-"))
    model_dir = work / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    redis = RedisServer(workdir=work).start()
    http_port = free_port()
    router_url = f"http://127.0.0.1:{http_port}"
    env = dict(os.environ, SCEPSY_REDIS_URL=redis.url)
    router_argv = [sys.executable, "-m", "services.router", "--namespace", NAMESPACE,
                   "--http-port", str(http_port), "--log-level", "warning",
                   "--max-in-flight", "10000", "--queue-size", "10000"]  # fmt: skip
    router = subprocess.Popen(
        router_argv,
        cwd=REPO,
        env=env,
        stdout=(work / "router.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    engines: list[LocalEngine] = []
    started = time.monotonic()
    try:
        for core, (name, served) in enumerate(ENGINES.items()):
            spec = EngineSpec.cpu(
                model_dir,
                served[0],
                extra_args=["--served-model-name", *served],
                env={"VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1))},
            )
            engine = LocalEngine(spec, work / f"engine-{name}.log")
            engine.start()
            engines.append(engine)
        for engine in engines:
            engine.wait_ready(time.monotonic() + 300)
        urls = {name: e.base_url for name, e in zip(ENGINES, engines, strict=True)}
        results = asyncio.run(run_all(args, redis.url, router_url, urls))
    finally:
        stop_engines(engines)
        router.terminate()
        router.wait(timeout=15)
        redis.stop()

    print("\nALP vs real vLLM CPU engines (tiny model, 2 engines, 1 core each)")
    print(
        f"{'workflow':<9} {'rate/s':>7} {'load':>5} {'pred s':>7} {'meas s':>7} {'lat err%':>8} "
        f"{'pred/s':>7} {'meas/s':>7} {'thr err%':>8} {'win pred':>8} {'win meas':>8} "
        f"{'win err%':>8}"
    )
    for r in results:
        for row in r["rows"]:
            print(
                f"{r['workflow']:<9} {row.rate:7.3f} {row.load:5.2f} {row.predicted_latency:7.3f} "
                f"{row.measured_latency:7.3f} {row.latency_error:8.1f} "
                f"{row.predicted_throughput:7.3f} {row.measured_throughput:7.3f} "
                f"{row.throughput_error:8.1f} {row.predicted_window:8.3f} "
                f"{row.measured_window:8.3f} {row.window_error:8.1f}"
            )
        print(
            f"{r['workflow']:<9} {'capacity':>7} {'':>5} {'':>7} {'':>7} {'':>8} "
            f"{r['predicted_throughput']:7.3f} {r['measured_throughput']:7.3f} "
            f"{r['throughput_error']:8.1f}"
        )
    print(
        f"\n{'workflow':<9} {'median lat err%':>15} {'(window medians)':>16} "
        f"{'median thr err%':>15} {'capacity err%':>13} target"
    )
    for r in results:
        s = summary(r)
        ok = all(
            math.isfinite(v) and v <= TARGET_PCT
            for v in (s["median_latency_error"], s["median_throughput_error"])
        )
        print(
            f"{r['workflow']:<9} {s['median_latency_error']:15.1f} "
            f"{s['median_window_latency_error']:16.1f} "
            f"{s['median_throughput_error']:15.1f} {s['capacity_error']:13.1f} "
            f"{'ok' if ok else 'OVER TARGET'}"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
