"""Benchmark: the ALP's predictions against real vLLM CPU engines behind the router.

Starts a Redis server, the router (its own process) and two tiny-model engines, each bound to its
own core, and registers them: engine A serves ``reranker`` and ``policy``, engine B
``generator`` and ``prm`` (one LLM of each workflow per engine). Then for RAG and beam search
(``driver.tiny_workflow``) it runs ``scepsy validate``'s procedure (``services.cli.validate``):
a pilot run gives the demand (n_m, p_m, stages, tool time) and each LLM's request mix, each
LLM is profiled (by default jointly: every LLM at once through the router, the pilot's requests
replayed in the workflow's order), the ALP predicts throughput T and the latency at fractions of
it, and the workflow runs at each of those rates (each run right after a joint operating step at
its rate, ``--point-window`` s) and above capacity. The table gives each rate's error from the
profiles with the operating steps and from the sweep's points only. Target: median error at most
15 % for latency and throughput, light load to 80 % of T.

    flock /tmp/scepsy-engines.lock .venv/bin/python scripts/bench_validate.py
        [--workflows rag,beam] [--load 0.2,0.5,0.8] [--requests 500] [--seconds 30]
        [--profiles measured] [--joint-order workflow|independent] [--point-window 10]
        [--repeats-per-rate 2] [--no-confine] [--out DIR]
        [--per-call [--per-call-rates rag=1.5/4.0,beam=0.4/1.0] [--reps 2] [--conditions FDTWO]]

``--per-call`` measures, instead, where a workflow's calls differ from a joint profile's: at each
workflow rate, interleaved (the order rotating per repetition), per LLM the mean and median call
latency of one joint-sweep step with fixed groups of round(p_m) (F), one with group sizes drawn
from the pilot's fan-outs (D), D with every call tagged as the workflow's (T: the router's
tracing of tagged calls), and the workflow driver running the programs (W: program stepping,
stages in order), and a joint step in the workflow's order (O: the pilot's requests replayed wave
by wave, ``--joint-order workflow``; ``--conditions`` picks which run, default FDTWO). It prints
the ratios D/F, T/D, W/T, W/O per LLM, rate and repetition and their
geometric means: on a shared host single windows vary by 2-4x, only pairs measured side by side
and their counts above 1 say anything.

Needs the engine venv (``make engine-venv``; ``SCEPSY_ENGINE_VENV``).
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
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.cli.validate import (  # noqa: E402
    PROFILE_SOURCES,
    Validation,
    _stats_of,
    format_result,
    run_pilot,
    summary,
    write_outputs,
)
from services.core.errors import NotFoundError  # noqa: E402
from services.core.perf.analytic import RequestMix  # noqa: E402
from services.core.routing import Endpoint  # noqa: E402
from services.core.sim.replay import TraceReplay  # noqa: E402
from services.core.workload.demand import WorkflowDemand  # noqa: E402
from services.profiler.joint import JointLlm, JointSweep, fan_outs  # noqa: E402
from services.profiler.vllm_backend import SweepConfig  # noqa: E402
from services.router.schema import REQUEST_ID_HEADER, WORKFLOW_HEADER  # noqa: E402
from services.runtime.driver import (  # noqa: E402
    CallOutcome,
    WorkflowDriver,
    direct_session,
    send_completion,
    tiny_workflow,
)
from services.runtime.engines import (  # noqa: E402
    EngineSpec,
    LocalEngine,
    run_engine_module,
    stop_engines,
    vllm_executable,
)
from services.runtime.hostload import Sampler  # noqa: E402
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


class TaggedSweep(JointSweep):
    """A joint sweep whose calls carry a workflow's tags, each call its own request id."""

    def __init__(self, *args: Any, workflow: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.workflow = workflow

    async def _call(self, session: aiohttp.ClientSession, d: JointLlm) -> CallOutcome:
        prompt, completion = d.mix.draw(1, self._rng)
        return await send_completion(
            session, self.base_url, d.name, int(prompt[0]), int(completion[0]),
            np.random.default_rng(), timeout_s=self.config.call_timeout_s, clock=time.monotonic,
            headers={WORKFLOW_HEADER: self.workflow, REQUEST_ID_HEADER: uuid.uuid4().hex},
        )  # fmt: skip


async def per_call(args: argparse.Namespace, router_url: str) -> list[dict[str, Any]]:
    """The ``--per-call`` comparison (module docstring); one row per condition run."""
    rates = {
        w.split("=")[0]: [float(x) for x in w.split("=")[1].split("/")]
        for w in args.per_call_rates.split(",")
    }
    cfg = SweepConfig(warmup_s=1.5, window_s=args.per_call_window, drain_s=10.0)
    rows: list[dict[str, Any]] = []
    async with direct_session() as session:
        for name in args.workflows.split(","):
            workflow = tiny_workflow(name)
            driver = WorkflowDriver(router_url, workflow, session)
            pilot = await run_pilot(
                driver, args.pilot_rate, args.pilot_requests, args.pilot_precision,
                args.pilot_max_requests, 1, print,
            )  # fmt: skip
            stats = _stats_of(pilot, workflow.name)
            sizes = fan_outs(pilot.trace().calls)
            fixed = [
                JointLlm(
                    d.model,
                    RequestMix.from_samples(stats.llm(d.model).sample),
                    d.n,
                    max(1, round(d.p)),
                )
                for d in WorkflowDemand.from_stats(stats).llms
            ]
            drawn = [replace(j, sizes=sizes.get(j.name, ())) for j in fixed]
            names = {j.name: j.name for j in fixed}
            pilot_requests = TraceReplay.of(pilot.trace(), workflow.name, names).requests
            print(f"{name}: fixed groups {[j.group for j in fixed]}, fan-outs {sizes}", flush=True)
            for lam in rates[name]:
                for rep in range(args.reps):
                    conds = args.conditions
                    order = conds[rep % len(conds) :] + conds[: rep % len(conds)]
                    for cond in order:
                        seed = 100 * rep + 7
                        if cond == "W":
                            count = max(8, round(lam * (cfg.warmup_s + cfg.window_s)))
                            run = await driver.run(lam, count, seed=seed, warmup=count // 10)
                            per: dict[str, list[float]] = {}
                            for r in run.measured:
                                for model, c in r.calls:
                                    if c.ok:
                                        per.setdefault(model, []).append(c.latency)
                            mean = {m: float(np.mean(v)) for m, v in per.items()}
                            p50 = {m: float(np.median(v)) for m, v in per.items()}
                            calls = {m: len(v) for m, v in per.items()}
                        else:
                            llms = fixed if cond == "F" else drawn
                            sweep: JointSweep
                            if cond == "T":
                                sweep = TaggedSweep(router_url, llms, cfg, seed=seed, workflow=name)
                            else:
                                ordered = pilot_requests if cond == "O" else ()
                                sweep = JointSweep(
                                    router_url, llms, cfg, seed=seed, requests=ordered
                                )
                            points = await sweep._step(session, lam)
                            mean = {m: p.mean_latency for m, p in points.items()}
                            p50 = {m: p.p50_latency for m, p in points.items()}
                            calls = {m: p.ok for m, p in points.items()}
                        row = {"workflow": name, "rate": lam, "rep": rep, "cond": cond,
                               "mean": mean, "p50": p50, "calls": calls}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    return rows


def per_call_report(rows: list[dict[str, Any]]) -> None:
    cells: dict[tuple[str, float, int, str], dict[str, dict[str, float]]] = {}
    for r in rows:
        for stat in ("mean", "p50"):
            for model, value in r[stat].items():
                cells.setdefault((r["workflow"], r["rate"], r["rep"], model), {}).setdefault(
                    stat, {}
                )[r["cond"]] = value
    pairs = (("D", "F"), ("T", "D"), ("W", "T"), ("W", "D"), ("W", "F"), ("W", "O"))
    print("\nper-call latency ratios (mean; p50), per workflow, rate, repetition, LLM")
    ratios: dict[tuple[str, str], list[float]] = {}
    for key, by_stat in sorted(cells.items()):
        parts = []
        for a, b in pairs:
            text = []
            for stat in ("mean", "p50"):
                c = by_stat.get(stat, {})
                if a in c and b in c and c[a] > 0 and c[b] > 0:
                    x = c[a] / c[b]
                    ratios.setdefault((f"{a}/{b}", stat), []).append(x)
                    text.append(f"{x:.2f}")
            parts.append(f"{a}/{b} " + "; ".join(text))
        print(f"  {key[0]} {key[1]:g}/s rep {key[2]} {key[3]:<9} " + ", ".join(parts))
    for (pair, stat), xs in sorted(ratios.items()):
        geo = math.exp(float(np.mean(np.log(xs))))
        above = sum(x > 1 for x in xs)
        print(
            f"  {pair} {stat:<4}: geometric mean {geo:.2f}, median {float(np.median(xs)):.2f}, "
            f"{above}/{len(xs)} above 1, range {min(xs):.2f}-{max(xs):.2f}"
        )


def host_report(result: dict[str, Any], sampler: Sampler) -> None:
    """Each operating step and run of ``result`` beside what the host's CPUs did meanwhile."""
    names = list(sampler.names)
    print(
        f"\nhost during {result['workflow']}'s windows (cores used; steal: share of CPU time "
        "the hypervisor gave away)"
    )
    print(
        f"  {'window':<10} {'rate/s':>7} {'s':>5} {'latency':>8} "
        + " ".join(f"{n:>9}" for n in names)
        + f" {'host':>6} {'steal%':>6}   per-LLM mean call latency"
    )
    for w in result["windows"]:
        share = sampler.share(w["start"], w["end"])
        if share is None:
            continue
        cores = sampler.cores(share)
        kind = "run" if w["kind"] == "run" else "operating"
        latency = w.get("latency", math.nan)
        llms = ", ".join(f"{m} {v:.3f}" for m, v in w["llm_latency"].items())
        print(
            f"  {kind:<10} {w['rate']:7.3f} {w['end'] - w['start']:5.1f} {latency:8.3f} "
            + " ".join(f"{cores[n]:9.2f}" for n in names)
            + f" {share.busy:6.2f} {share.steal * 100:6.1f}   {llms}"
        )


async def run_all(
    args: argparse.Namespace,
    redis_url: str,
    router_url: str,
    urls: dict[str, str],
    sampler: Sampler | None = None,
) -> list[dict[str, Any]]:
    store = Store.connect(redis_url, namespace=NAMESPACE)
    results = []
    try:
        for name, url in urls.items():
            for model in ENGINES[name]:
                await store.put_endpoint(Endpoint(model, f"{model}-0", url))
        await wait_models(router_url, {m for ms in ENGINES.values() for m in ms})
        if args.per_call:
            return await per_call(args, router_url)
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
                pilot_precision=args.pilot_precision,
                pilot_max_requests=args.pilot_max_requests,
                capacity_requests=args.capacity_requests,
                profile_budget=args.profile_budget,
                profile_via=args.profile_via,
                joint_order=args.joint_order,
                point_window=args.point_window,
                repeats=args.repeats_per_rate,
                seed=0,
            )
            result = await Validation(ns, store).run()
            print(format_result(result), flush=True)
            if sampler is not None:
                host_report(result, sampler)
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
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0, help="at most per rate")
    parser.add_argument("--pilot-rate", type=float, default=1.0)
    parser.add_argument("--pilot-requests", type=int, default=12, help="at least")
    parser.add_argument(
        "--pilot-precision", type=float, default=0.05, help="see scepsy validate --help"
    )
    parser.add_argument("--pilot-max-requests", type=int, default=120, help="at most")
    parser.add_argument("--capacity-requests", type=int, default=30)
    parser.add_argument("--profile-budget", type=float, default=100.0)
    parser.add_argument("--profiles", choices=PROFILE_SOURCES, default="joint")
    parser.add_argument("--profile-via", choices=("router", "engine"), default="router")
    parser.add_argument("--out", type=Path, help="validate.csv / validate.png per workflow")
    parser.add_argument("--per-call", action="store_true", help="the per-call comparison only")
    parser.add_argument("--per-call-rates", default="rag=1.5/4.0,beam=0.4/1.0")
    parser.add_argument("--per-call-window", type=float, default=10.0, help="s per condition")
    parser.add_argument("--reps", type=int, default=2, help="repetitions per rate (--per-call)")
    parser.add_argument(
        "--conditions", default="FDTWO", help="--per-call's conditions, letters of FDTWO"
    )
    parser.add_argument("--joint-order", choices=("workflow", "independent"), default="workflow")
    parser.add_argument(
        "--point-window", type=float, default=10.0, help="s, joint step before each rate (0: none)"
    )
    parser.add_argument(
        "--repeats-per-rate", type=int, default=2, help="workflow runs per rate, round robin"
    )
    parser.add_argument(
        "--confine",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="every process of each engine on its core (EngineSpec.cpus), not only its OpenMP "
        "threads (default; --no-confine: the OpenMP threads only)",
    )
    args = parser.parse_args()
    if not args.conditions or set(args.conditions) - set("FDTWO"):
        parser.error(f"--conditions: letters of FDTWO, got {args.conditions!r}")

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
        start_new_session=True,  # its own process group, for the host report
    )
    engines: list[LocalEngine] = []
    started = time.monotonic()
    try:
        for i, (name, served) in enumerate(ENGINES.items()):
            core = i % (os.cpu_count() or 1)
            spec = EngineSpec.cpu(
                model_dir,
                served[0],
                extra_args=["--served-model-name", *served],
                env={"VLLM_CPU_OMP_THREADS_BIND": str(core)},
                cpus=(core,) if args.confine else None,
            )
            engine = LocalEngine(spec, work / f"engine-{name}.log")
            engine.start()
            engines.append(engine)
        for engine in engines:
            engine.wait_ready(time.monotonic() + 300)
        urls = {name: e.base_url for name, e in zip(ENGINES, engines, strict=True)}
        # engines run in their own sessions: each one's process group is its pid
        groups = {f"engine {n}": e.pid for n, e in zip(ENGINES, engines, strict=True) if e.pid}
        groups.update(router=router.pid, client=os.getpgid(0))
        sampler = Sampler(groups).start()
        try:
            results = asyncio.run(run_all(args, redis.url, router_url, urls, sampler))
        finally:
            sampler.stop()
    finally:
        stop_engines(engines)
        router.terminate()
        router.wait(timeout=15)
        redis.stop()
    if args.per_call:
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "per_call.json").write_text(json.dumps(results))
        per_call_report(results)
        print(f"({time.monotonic() - started:.0f} s)")
        return 0

    print("\nALP vs real vLLM CPU engines (tiny model, 2 engines, 1 core each)")
    print(
        f"{'workflow':<9} {'rate/s':>7} {'load':>5} {'pred s':>7} {'meas s':>7} {'lat err%':>8} "
        f"{'pred/s':>7} {'meas/s':>7} {'thr err%':>8} {'win pred':>8} {'win meas':>8} "
        f"{'win err%':>8} {'sweep s':>7} {'swp err%':>8} {'spread%':>7}"
    )
    for r in results:
        for row in r["rows"]:
            print(
                f"{r['workflow']:<9} {row.rate:7.3f} {row.load:5.2f} {row.predicted_latency:7.3f} "
                f"{row.measured_latency:7.3f} {row.latency_error:8.1f} "
                f"{row.predicted_throughput:7.3f} {row.measured_throughput:7.3f} "
                f"{row.throughput_error:8.1f} {row.predicted_window:8.3f} "
                f"{row.measured_window:8.3f} {row.window_error:8.1f} "
                f"{row.sweep_latency:7.3f} {row.sweep_error:8.1f} {row.repeat_spread:7.1f}"
            )
        print(
            f"{r['workflow']:<9} {'capacity':>7} {'':>5} {'':>7} {'':>7} {'':>8} "
            f"{r['predicted_throughput']:7.3f} {r['measured_throughput']:7.3f} "
            f"{r['throughput_error']:8.1f}"
        )
    print(
        f"\n{'workflow':<9} {'median lat err%':>15} {'(window medians)':>16} "
        f"{'(sweep only)':>12} {'spread%':>7} {'median thr err%':>15} {'capacity err%':>13} "
        "target"
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
            f"{s['median_sweep_latency_error']:12.1f} {s['median_repeat_spread']:7.1f} "
            f"{s['median_throughput_error']:15.1f} {s['capacity_error']:13.1f} "
            f"{'ok' if ok else 'OVER TARGET'}"
        )
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
