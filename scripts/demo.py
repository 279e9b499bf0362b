"""``make demo``: the whole loop on this host with real vLLM CPU engines.

1. a temporary ``SCEPSY_HOME`` and the locally built tiny model (both LLMs' weights);
2. ``scepsy up --cluster`` on a declared ``cpu`` node of this host (3 devices: at most three
   engines), the control loop's thresholds shortened through env so that it can act within
   the demo;
3. ``scepsy apply --spec --wait`` of a RAG workflow (a reranker fan-out, then a generator): the
   plan and the engines;
4. the RAG workflow driven through the router at the spec's rate (``WorkflowDriver``, every call
   tagged with the workflow, every request span in the router's trace): measured latency and
   throughput next to the plan's prediction;
5. the rate doubles; the loop sees the drift and re-plans by itself (nobody calls ``apply``):
   its decision (why, old and new plan, moves) and the agents applying it;
6. the workflow driven again at the new rate: the new plan's prediction against the measurement;
   ``scepsy down``, and a check that no process of the demo is left.

Any failed step exits 1. ``--json`` prints one JSON document at the end; ``--quick`` (CI) drives
shorter. A plot of predicted vs measured is written (PNG with matplotlib, else CSV).

Run it: ``make demo`` (builds the venvs first) or
``SCEPSY_ENGINE_VENV=.venv-engine .venv/bin/python scripts/demo.py [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.runtime import cpu_rag  # noqa: E402
from services.runtime.cpu_rag import CLUSTER, PROGRAM, WORKFLOW  # noqa: E402

SCEPSY = [sys.executable, "-m", "services.cli.main"]


@dataclass(frozen=True)
class Sizes:
    drive_s: float  # each measured drive
    window_s: float
    sustain_s: float
    min_interval_s: float
    min_requests: int
    replan_timeout_s: float
    settle_timeout_s: float


FULL = Sizes(48.0, 30.0, 10.0, 30.0, 5, 150.0, 420.0)
QUICK = Sizes(32.0, 24.0, 6.0, 20.0, 4, 120.0, 300.0)


class StepFailed(Exception):
    pass


@dataclass
class Demo:
    args: argparse.Namespace
    sizes: Sizes
    home: Path
    env: dict[str, str]
    steps: list[dict[str, Any]] = field(default_factory=list)
    doc: dict[str, Any] = field(default_factory=dict)
    models: cpu_rag.Models | None = None
    rates: cpu_rag.DemoRates | None = None
    t0: float = field(default_factory=time.monotonic)

    # -- output -------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=sys.stderr if self.args.json else sys.stdout, flush=True)

    @contextmanager
    def step(self, n: int, title: str) -> Iterator[dict[str, Any]]:
        self.say(f"\n== {n}. {title} " + "=" * max(0, 70 - len(title)))
        record: dict[str, Any] = {"step": n, "title": title, "ok": False}
        self.steps.append(record)
        start = time.monotonic()
        try:
            yield record
            record["ok"] = True
        except StepFailed as exc:
            record["error"] = str(exc)
            self.say(f"FAILED: {exc}")
            raise
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            self.say(f"FAILED: {record['error']}")
            raise StepFailed(record["error"]) from exc
        finally:
            record["seconds"] = round(time.monotonic() - start, 1)
            self.say(f"-- step {n}: {'ok' if record['ok'] else 'failed'} in {record['seconds']} s")

    # -- the CLI --------------------------------------------------------------------------------
    def scepsy(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SCEPSY, *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def must(self, *args: str, timeout: float = 600) -> str:
        done = self.scepsy(*args, timeout=timeout)
        if done.returncode != 0:
            raise StepFailed(
                f"scepsy {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done.stdout

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.home / "state.json").read_text())
        return doc


# ------------------------------------------------------------------------------------ tables
def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------ steps
def prepare(demo: Demo) -> None:
    from services.runtime.engines import run_engine_module
    from services.runtime.models import DEFAULT_DIR, build_smollm2

    with demo.step(1, "a temporary SCEPSY_HOME, the models, the demo's rates") as rec:
        tiny = demo.home / "tiny"
        start = time.monotonic()
        run_engine_module("services.profiler.tiny_model", ["--out", str(tiny)])
        rec["tiny_build_s"] = round(time.monotonic() - start, 1)
        (demo.home / "cluster.yaml").write_text(CLUSTER)
        demo.say(f"SCEPSY_HOME={demo.home}")
        demo.say(f"tiny model (random weights) built in {rec['tiny_build_s']} s: {tiny}")
        if demo.args.tiny_generator:
            # both serve the tiny model, planned as the catalogue's Qwen3-0.6B (a stand-in)
            demo.models = cpu_rag.Models(str(tiny), str(tiny))
            demo.say(
                "generator and reranker both serve it (planned as Qwen/Qwen3-0.6B): the answers "
                "are random tokens; this run shows planning, serving and the loop, not answers"
            )
        else:
            start = time.monotonic()
            built = build_smollm2(DEFAULT_DIR, log=demo.say)
            rec["smollm2"] = built
            smol = built["model_dir"]
            demo.say(
                f"generator: SmolLM2-135M-Instruct ({'built' if built['built'] else 'cached'} in "
                f"{time.monotonic() - start:.1f} s: {smol}); reranker: the tiny model; each "
                "planned from its own config.json"
            )
            demo.models = cpu_rag.Models(
                smol, str(tiny), cpu_rag.config_arch(smol), cpu_rag.config_arch(tiny), 512
            )
        demo.doc["models"] = vars(demo.models)
        # rates at which the planner's allocation differs (offline plans, the planner's own path)
        start = time.monotonic()
        rates = cpu_rag.demo_rates(demo.models)
        if rates is None:
            raise StepFailed(
                "no rate pair found whose plans differ (gen x1 + rerank x2, then gen x2 + "
                "rerank x1): the performance model changed; see services/runtime/cpu_rag.py"
            )
        demo.rates = rates
        rec["rates_s"] = round(time.monotonic() - start, 1)
        rows: list[tuple[str, ...]] = [("offline plan", "rate req/s", "allocation", "latency s")]
        for what, off in (
            ("before", rates.before),
            ("loop fires", rates.trigger),
            ("doubled", rates.after),
        ):
            alloc = " + ".join(f"{m} x{n}" for m, n in off.allocation.items())
            rows.append((what, fmt(off.rate), alloc, fmt(off.latency_s)))
        demo.say(f"the demo's rates, read off offline plans in {rec['rates_s']} s:")
        demo.say(table(rows))
        rec["rates"] = {
            "before": rates.before.rate,
            "trigger": rates.trigger.rate,
            "after": rates.after.rate,
        }
        demo.doc["rates"] = rec["rates"]


def up(demo: Demo) -> None:
    s = demo.sizes
    with demo.step(2, "scepsy up: this host as a node with 3 `cpu` devices") as rec:
        loop_env = {
            "SCEPSY_LOOP_INTERVAL_S": "2",
            "SCEPSY_LOOP_WINDOW_S": f"{s.window_s:g}",
            "SCEPSY_LOOP_SUSTAIN_S": f"{s.sustain_s:g}",
            "SCEPSY_LOOP_MIN_INTERVAL_S": f"{s.min_interval_s:g}",
            "SCEPSY_LOOP_SETTLE_S": "5",
            "SCEPSY_LOOP_RETRY_S": "10",
            "SCEPSY_LOOP_MIN_REQUESTS": str(s.min_requests),
            # on 2 shared cores an LLM's time share swings with the load itself (seen: gen
            # 0.92 -> 0.53 when the rate doubled), so the demo's loop judges the rate
            "SCEPSY_LOOP_SHARE_DELTA": "0.6",
        }
        demo.env.update(loop_env)
        demo.say(
            "control loop, shortened for the demo (defaults in README 'Control loop'; shares "
            "judged loosely: on 2 shared cores they swing with the load itself):"
        )
        demo.say(table([("env", "value"), *sorted(loop_env.items())]))
        demo.say(CLUSTER.rstrip())
        start = time.monotonic()
        demo.must("up", "--cluster", str(demo.home / "cluster.yaml"), timeout=240)
        rec["seconds_up"] = round(time.monotonic() - start, 1)
        services = demo.state()["services"]
        demo.say(
            table(
                [("service", "address")]
                + [
                    (name, str(svc.get("http_address") or svc.get("address", "")))
                    for name, svc in sorted(services.items())
                ]
            )
        )
        rec["loop_env"] = loop_env


def write_spec(demo: Demo, rate: float) -> Path:
    assert demo.models is not None
    path = demo.home / "spec.yaml"
    path.write_text(cpu_rag.spec_text(demo.models, rate))
    return path


async def plan_of(plan_id: str | None) -> Any:
    from services.cli.cluster import resolve_redis_url
    from services.runtime.store import Store

    store = Store.connect(resolve_redis_url(None))
    try:
        pid = plan_id or await store.current_plan_id()
        return None if pid is None else await store.get_plan(pid)
    finally:
        await store.close()


def plan_dict(plan: Any) -> dict[str, Any]:
    wf = {w.workflow: w for w in plan.workflows}[WORKFLOW]
    return {
        "id": plan.id,
        "allocation": {
            m: {"replicas": a.replicas, "gpus": a.gpus} for m, a in sorted(plan.allocation.items())
        },
        "target_rps": wf.target_rps,
        "predicted_latency_s": wf.latency_s,
        # the ALP's throughput is the most the plan serves at this mix; at the target rate
        # below it the workflow's throughput is the target
        "predicted_throughput_rps": min(wf.target_rps, wf.throughput_rps),
        "predicted_capacity_rps": wf.throughput_rps,
        "llms": {
            m.model: {"utilization": m.utilization, "call_latency_s": m.call_latency_s}
            for m in plan.llms
        },
    }


def show_plan(demo: Demo, plan: dict[str, Any]) -> None:
    demo.say(
        f"plan {plan['id']}: rag at {plan['target_rps']:g} req/s, predicted latency "
        f"{fmt(plan['predicted_latency_s'])} s, capacity {fmt(plan['predicted_capacity_rps'])}"
        " req/s"
    )
    rows: list[tuple[str, ...]] = [("model", "replicas", "devices", "utilization", "call s")]
    for m, a in plan["allocation"].items():
        llm = plan["llms"].get(m, {})
        rows.append(
            (
                m,
                str(a["replicas"]),
                fmt(a["gpus"]),
                fmt(llm.get("utilization")),
                fmt(llm.get("call_latency_s")),
            )
        )
    demo.say(table(rows))


def show_engines(demo: Demo, listed: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, ...]] = [("engine", "model", "state", "cores", "endpoint")]
    for e in listed:
        rows.append(
            (
                str(e.get("id", "")),
                str(e.get("model", "")),
                str(e.get("state", "")),
                ",".join(str(c) for c in e.get("cpus", [])),
                str(e.get("endpoint", "")),
            )
        )
    if len(rows) > 1:
        demo.say(table(rows))


def apply(demo: Demo) -> None:
    with demo.step(3, "scepsy apply --spec spec.yaml --wait") as rec:
        spec = write_spec(demo, base_rate(demo))
        demo.say(spec.read_text().rstrip())
        start = time.monotonic()
        out = demo.must("apply", "--spec", str(spec), "--wait", "--json", timeout=600)
        rec["seconds_to_ready"] = round(time.monotonic() - start, 1)
        applied = json.loads(out)
        plan = asyncio.run(plan_of(applied["plan"]))
        rec["plan"] = plan_dict(plan)
        rec["engines"] = applied["engines"]
        show_plan(demo, rec["plan"])
        demo.say(f"engines ready in {rec['seconds_to_ready']} s:")
        show_engines(demo, applied["engines"])
        demo.doc["plan_before"] = rec["plan"]
        demo.doc["engines_before"] = applied["engines"]
        if not demo.args.tiny_generator:
            rec["answer"] = ask(demo)


QUESTION = (
    "Context: The Eiffel Tower in Paris was completed in 1889 for the World's Fair.\n"
    "Question: In which year was the Eiffel Tower completed? Answer in one sentence."
)


def ask(demo: Demo) -> dict[str, Any]:
    """One real question to the generator through the router."""
    from openai import OpenAI

    router = "http://" + demo.state()["services"]["router"]["http_address"] + "/v1"
    client = OpenAI(base_url=router, api_key="unused", timeout=120, max_retries=0)
    start = time.monotonic()
    reply = client.chat.completions.create(
        model="gen", messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0
    )
    seconds = time.monotonic() - start
    answer = (reply.choices[0].message.content or "").strip()
    tokens = reply.usage.completion_tokens if reply.usage else 0
    demo.say(f"one real question to gen through the router:\n  Q: {QUESTION}\n  A: {answer}")
    demo.say(f"  ({tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s)")
    return {"question": QUESTION, "answer": answer, "tokens": tokens, "seconds": round(seconds, 2)}


async def drive(
    demo: Demo, rate: float, seconds: float, seed: int, stop: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Drive the RAG workflow at ``rate`` (evenly spaced arrivals, so that the loop's window sees
    the rate itself, not Poisson noise) for ``seconds``, or until ``stop()``."""
    from services.cli.cluster import resolve_redis_url
    from services.runtime.driver import WorkflowDriver, direct_session
    from services.runtime.store import Store

    router = "http://" + demo.state()["services"]["router"]["http_address"]
    store = Store.connect(resolve_redis_url(None))
    outcomes: list[Any] = []
    try:
        async with direct_session() as session:
            # the program's roles (reranker, generator) -> the spec's models, the router's names
            driver = WorkflowDriver(router, PROGRAM, session, models=PROGRAM.models, store=store)
            if stop is None:
                n = max(2, int(rate * seconds))
                result = await driver.run(rate, n, seed=seed, offsets=[i / rate for i in range(n)])
                outcomes = list(result.requests)
            else:
                import numpy as np

                tasks: list[asyncio.Task[Any]] = []
                i = 0
                t0 = time.monotonic()
                while not stop() and time.monotonic() - t0 < seconds:
                    rng = np.random.default_rng([seed, i])
                    tasks.append(asyncio.create_task(driver.request(rng)))
                    i += 1
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                outcomes = list(await asyncio.gather(*tasks))
    finally:
        await store.close()
    ok = [o for o in outcomes if o.status == "ok"]
    lat = sorted(o.latency for o in ok)
    span = (max(o.end for o in ok) - min(o.start for o in ok)) if len(ok) > 1 else 0.0
    return {
        "rate": rate,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": len(outcomes) - len(ok),
        "calls": sum(len(o.calls) for o in outcomes),
        "failed_calls": sum(1 for o in outcomes for _, c in o.calls if not c.ok),
        "first_error": next((c.error for o in outcomes for _, c in o.calls if not c.ok), ""),
        "latency_mean_s": sum(lat) / len(lat) if lat else None,
        "latency_p50_s": lat[len(lat) // 2] if lat else None,
        "latency_max_s": lat[-1] if lat else None,
        "throughput_rps": len(ok) / span if span > 0 else None,
    }


def compare(demo: Demo, plan: dict[str, Any], measured: dict[str, Any]) -> None:
    demo.say(
        table(
            [
                ("", "predicted (plan)", "measured"),
                ("rate req/s", fmt(plan["target_rps"]), fmt(measured["rate"])),
                (
                    "throughput req/s",
                    fmt(plan["predicted_throughput_rps"]),
                    fmt(measured["throughput_rps"]),
                ),
                (
                    "latency mean s",
                    fmt(plan["predicted_latency_s"]),
                    fmt(measured["latency_mean_s"]),
                ),
                ("capacity req/s", fmt(plan["predicted_capacity_rps"]), "(not probed)"),
                ("latency p50 s", "", fmt(measured["latency_p50_s"])),
                (
                    "requests ok/all",
                    "",
                    f"{measured['ok']}/{measured['requests']} "
                    f"({measured['calls']} calls, {measured['failed_calls']} failed)",
                ),
            ]
        )
    )


def base_rate(demo: Demo) -> float:
    assert demo.rates is not None
    return demo.rates.before.rate


def serve_before(demo: Demo) -> None:
    s = demo.sizes
    rate = base_rate(demo)
    with demo.step(4, f"drive rag through the router at {rate:g} req/s") as rec:
        measured = asyncio.run(drive(demo, rate, s.drive_s, seed=1))
        rec["measured"] = measured
        compare(demo, demo.doc["plan_before"], measured)
        demo.doc["measured_before"] = measured
        # the trace: what the control loop computes from the router's trace stream (rate, n_m,
        # p_m, time shares, token mix per workflow), against which it judges drift
        demo.say("\nthe router's trace, as the control loop's statistics (`scepsy loop status`):")
        demo.say(demo.must("loop", "status").rstrip())
        rec["loop_status"] = json.loads(demo.must("loop", "status", "--json"))
        if measured["errors"]:
            raise StepFailed(
                f"{measured['errors']} of {measured['requests']} requests failed, first: "
                f"{measured['first_error']}"
            )


async def decisions(limit: int = 20) -> list[dict[str, Any]]:
    from services.cli.cluster import resolve_redis_url
    from services.runtime.store import Store

    store = Store.connect(resolve_redis_url(None))
    try:
        return await store.loop_decisions(limit)
    finally:
        await store.close()


async def drive_until_replan(
    demo: Demo, rate: float, timeout_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Drive at ``rate`` until the loop records a new re-plan (its decision) or ``timeout_s``."""
    seen = {(d["at"], d["action"]) for d in await decisions()}
    found: dict[str, Any] = {}
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(2.0)
            for d in await decisions():
                new = (d["at"], d["action"]) not in seen and d["action"] == "replan"
                if new and d["outcome"] in ("changed", "unchanged", "failed"):
                    found.update(d)
                    stop.set()
                    return

    watcher = asyncio.create_task(watch())
    try:
        measured = await drive(demo, rate, timeout_s, seed=2, stop=stop.is_set)
    finally:
        stop.set()
        await watcher
    return found, measured


def replan(demo: Demo) -> None:
    s = demo.sizes
    high = 2 * base_rate(demo)
    with demo.step(5, f"the rate doubles to {high:g} req/s: the loop re-plans by itself") as rec:
        before = {e["id"]: e["model"] for e in demo.doc["engines_before"]}
        start = time.monotonic()
        found, measured = asyncio.run(drive_until_replan(demo, high, s.replan_timeout_s))
        rec["detect_s"] = round(time.monotonic() - start, 1)
        rec["load_while_detecting"] = measured
        if not found:
            raise StepFailed(f"no re-plan within {s.replan_timeout_s:g} s of the doubled rate")
        rec["decision"] = found
        demo.say(f"the loop decided after {rec['detect_s']} s of the doubled rate:")
        demo.say(demo.must("loop", "decisions", "--limit", "1", timeout=60).rstrip())
        if found["outcome"] == "failed":
            raise StepFailed(f"the loop's re-plan failed: {found.get('detail')}")
        if not found.get("reasons"):
            raise StepFailed("the loop's decision gives no reason")
        if measured["errors"]:
            raise StepFailed(f"{measured['errors']} requests failed while the loop decided")
        new = asyncio.run(plan_of(found.get("new_plan") or found.get("old_plan")))
        rec["plan"] = plan_dict(new)
        demo.doc["decision"] = found
        demo.doc["plan_after"] = rec["plan"]
        demo.say("old plan:")
        show_plan(demo, demo.doc["plan_before"])
        demo.say("new plan:")
        show_plan(demo, rec["plan"])
        moves = found.get("moves") or []
        demo.say(f"moves ({found.get('kept')} engines kept):")
        if moves:
            demo.say(
                table(
                    [("action", "model", "replica", "from", "to")]
                    + [
                        (m["action"], m["model"], str(m["replica"]), m["before"] or "-",
                         m["after"] or "-")
                        for m in moves
                    ]
                )
            )  # fmt: skip
        else:
            demo.say("  none: the new plan keeps every engine")
        # the agents apply it: wait (as `apply --wait` does) while the load goes on, and keep
        # the engines' states as they change
        start = time.monotonic()
        code, listed, timeline = asyncio.run(settled(demo, new, high))
        rec["apply_s"] = round(time.monotonic() - start, 1)
        rec["engines"] = listed
        rec["timeline"] = timeline
        demo.say(f"agents applied it in {rec['apply_s']} s (the load went on meanwhile):")
        if timeline:
            demo.say(
                table(
                    [("t s", "engine", "model", "state")]
                    + [(f"{t['t']:.1f}", t["id"], t["model"], t["state"]) for t in timeline]
                )
            )
        show_engines(demo, listed)
        if code != 0:
            raise StepFailed("the agents did not bring the new plan's engines up")
        after = {e["id"]: e["model"] for e in listed if e.get("state") == "ready"}
        rec["started"] = sorted(set(after) - set(before))
        rec["stopped"] = sorted(set(before) - set(after))
        rec["kept"] = sorted(set(before) & set(after))
        rec["moved_as_decided"] = moved_as_decided(before, after, moves)
        rec["new_before_old"] = new_before_old(timeline, rec["started"], rec["stopped"])
        demo.doc["moves"] = {
            k: rec[k] for k in ("started", "stopped", "kept", "moved_as_decided", "new_before_old")
        }
        demo.say(
            f"engines started {', '.join(rec['started']) or '-'}, stopped "
            f"{', '.join(rec['stopped']) or '-'}, kept {len(rec['kept'])}: "
            + ("as the decision said" if rec["moved_as_decided"] else "NOT as the decision said")
        )
        if rec["started"] and rec["stopped"]:
            demo.say(
                "every new engine was ready before an old one stopped serving"
                if rec["new_before_old"]
                else "an old engine drained before the new one was ready: the new one takes "
                "its device (the node has no free one); the model's other replicas served"
            )
        during = rec["load_during_apply"]
        demo.say(
            f"requests while the loop decided: {measured['ok']}/{measured['requests']} ok; "
            f"while the engines changed: {during['ok']}/{during['requests']} ok "
            f"({during['calls']} calls, {during['failed_calls']} failed)"
        )
        if during["errors"]:
            raise StepFailed(f"{during['errors']} requests failed while engines changed")
        if not rec["moved_as_decided"]:
            raise StepFailed(f"the engines did not change as the decision said: {moves}")


def moved_as_decided(
    before: dict[str, str], after: dict[str, str], moves: list[dict[str, Any]]
) -> bool:
    """The engines started and stopped, counted per model, are those of the decision's moves
    (a move or resize is a new engine for an old one)."""
    from collections import Counter

    started = Counter(after[e] for e in set(after) - set(before))
    stopped = Counter(before[e] for e in set(before) - set(after))
    want_started = Counter(m["model"] for m in moves if m["action"] != "stop")
    want_stopped = Counter(m["model"] for m in moves if m["action"] != "start")
    return started == want_started and stopped == want_stopped


def new_before_old(timeline: list[dict[str, Any]], started: list[str], stopped: list[str]) -> bool:
    """Every started engine was READY before any stopped engine left READY."""
    first_ready = [t["t"] for t in timeline if t["id"] in started and t["state"] == "ready"]
    left = [t["t"] for t in timeline if t["id"] in stopped and t["state"] != "ready"]
    if not started or not stopped:
        return True
    return len(first_ready) == len(started) and bool(left) and max(first_ready) <= min(left)


def list_engines(demo: Demo) -> list[dict[str, Any]]:
    import grpc

    from protos.scepsy.v1 import agent_pb2, agent_pb2_grpc
    from services.cli.apply import engine_dict

    address = demo.state()["services"]["agent/local"]["address"]
    with grpc.insecure_channel(address) as channel:
        reply = agent_pb2_grpc.NodeAgentStub(channel).ListEngines(
            agent_pb2.ListEnginesRequest(), timeout=10
        )
    return [engine_dict(e) for e in reply.engines]


async def watch_engines(demo: Demo, done: asyncio.Event, timeline: list[dict[str, Any]]) -> None:
    """Each engine's state changes on the agent, timed from now (gone: no longer listed)."""
    t0 = time.monotonic()
    last: dict[str, str] = {e["id"]: e["state"] for e in demo.doc["engines_before"]}
    models = {e["id"]: e["model"] for e in demo.doc["engines_before"]}
    while not done.is_set():
        try:
            now = {e["id"]: e for e in await asyncio.to_thread(list_engines, demo)}
        except Exception:  # the agent busy for a moment: the next poll sees the change
            now = None
        if now is not None:
            t = round(time.monotonic() - t0, 1)
            for eid, e in now.items():
                models[eid] = e["model"]
                if last.get(eid) != e["state"]:
                    timeline.append({"t": t, "id": eid, "model": e["model"], "state": e["state"]})
                    last[eid] = e["state"]
            for eid in [e for e in last if e not in now and last[e] != "gone"]:
                timeline.append({"t": t, "id": eid, "model": models[eid], "state": "gone"})
                last[eid] = "gone"
        with suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 1.0)


def wait_drained(demo: Demo, timeout_s: float) -> None:
    """Until no engine on the agent is draining (old ones stopped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(e["state"] == "draining" for e in list_engines(demo)):
        time.sleep(1.0)
    time.sleep(1.5)  # the watcher's next poll


async def settled(
    demo: Demo, plan: Any, rate: float
) -> tuple[int, list[dict[str, Any]], list[dict[str, Any]]]:
    from services.cli.apply import engine_dict, wait_settled
    from services.cli.cluster import resolve_redis_url
    from services.runtime.store import Store

    store = Store.connect(resolve_redis_url(None))
    done = asyncio.Event()
    timeline: list[dict[str, Any]] = []
    args = argparse.Namespace(timeout=demo.sizes.settle_timeout_s, rpc_timeout=30.0, json=True)
    try:
        load = asyncio.create_task(
            drive(demo, rate, demo.sizes.settle_timeout_s, seed=3, stop=done.is_set)
        )
        watcher = asyncio.create_task(watch_engines(demo, done, timeline))
        code, listed = await wait_settled(store, plan, args)
        # a stopped engine drains after the new plan's engines are up: see it go
        await asyncio.to_thread(wait_drained, demo, 60.0)
        done.set()
        await watcher
        demo.steps[-1]["load_during_apply"] = await load
    finally:
        done.set()
        await store.close()
    return code, [engine_dict(e) for e in listed], timeline


def serve_after(demo: Demo) -> None:
    high = 2 * base_rate(demo)
    with demo.step(6, f"drive again at {high:g} req/s on the new plan") as rec:
        measured = asyncio.run(drive(demo, high, demo.sizes.drive_s, seed=4))
        rec["measured"] = measured
        compare(demo, demo.doc["plan_after"], measured)
        demo.doc["measured_after"] = measured
        if measured["errors"]:
            raise StepFailed(
                f"{measured['errors']} of {measured['requests']} requests failed, first: "
                f"{measured['first_error']}"
            )


def plot(demo: Demo) -> None:
    before, after = demo.doc.get("measured_before"), demo.doc.get("measured_after")
    pb, pa = demo.doc.get("plan_before"), demo.doc.get("plan_after")
    if not (before and after and pb and pa):
        return
    out = Path(demo.args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        ("before", pb["target_rps"], pb["predicted_latency_s"], before["latency_mean_s"],
         pb["predicted_throughput_rps"], before["throughput_rps"]),
        ("after", pa["target_rps"], pa["predicted_latency_s"], after["latency_mean_s"],
         pa["predicted_throughput_rps"], after["throughput_rps"]),
    ]  # fmt: skip
    csv = out / "demo.csv"
    csv.write_text(
        "phase,rate,predicted_latency_s,measured_latency_s,predicted_rps,measured_rps\n"
        + "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    )
    demo.doc["files"] = [str(csv)]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        demo.say(f"matplotlib is not installed: figures written as CSV only: {csv}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r[0]}\n{r[1]:g} req/s" for r in rows]
    for ax, (p, m), title in (
        (axes[0], (2, 3), "mean latency (s)"),
        (axes[1], (4, 5), "throughput (req/s)"),
    ):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[p] or 0 for r in rows], 0.4, label="predicted")
        ax.bar([x + 0.2 for x in xs], [r[m] or 0 for r in rows], 0.4, label="measured")
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("scepsy demo: the plan's prediction vs the router's measurement")
    fig.tight_layout()
    png = out / "demo.png"
    fig.savefig(png, dpi=100)
    demo.doc["files"].append(str(png))
    demo.say(f"plot: {png} (figures also in {csv})")


def down(demo: Demo) -> list[str]:
    problems: list[str] = []
    if (demo.home / "state.json").exists():
        done = demo.scepsy("down", timeout=240)
        if done.returncode != 0:
            problems.append(f"scepsy down exited {done.returncode}: {done.stderr.strip()[-500:]}")
    deadline = time.monotonic() + 30
    left = leftovers(demo.home)
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = leftovers(demo.home)
    for pid in left:  # ours by their command line or environment (the demo's SCEPSY_HOME)
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        problems.append(f"processes left after down (killed): {left}")
    return problems


def leftovers(home: Path) -> list[int]:
    me = os.getpid()
    found: list[int] = []
    marker = str(home).encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if marker in (p / "cmdline").read_bytes() or marker in (p / "environ").read_bytes():
                stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.append(int(p.name))
        except OSError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="shorter drives (CI)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--out", default="out/demo", help="folder for the plot (default out/demo)")
    parser.add_argument("--keep-home", action="store_true", help="keep SCEPSY_HOME (logs)")
    parser.add_argument(
        "--tiny-generator",
        action="store_true",
        help="the generator serves the tiny random model, not SmolLM2 (default with --quick)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.tiny_generator = args.tiny_generator or args.quick
    home = Path(tempfile.mkdtemp(prefix="scepsy-demo-"))
    env = {**os.environ, "SCEPSY_HOME": str(home), "PYTHONPATH": str(REPO)}
    for key in ("SCEPSY_REDIS_URL", "REDIS_URL", "SCEPSY_LOOP"):
        env.pop(key, None)
    if not env.get("SCEPSY_ENGINE_VENV") and (REPO / ".venv-engine").is_dir():
        env["SCEPSY_ENGINE_VENV"] = str(REPO / ".venv-engine")
    os.environ.update({k: env[k] for k in ("SCEPSY_HOME", "SCEPSY_ENGINE_VENV") if k in env})
    for key in ("SCEPSY_REDIS_URL", "REDIS_URL"):
        os.environ.pop(key, None)
    demo = Demo(args, sizes, home, env)
    demo.doc = {"quick": args.quick, "home": str(home)}
    ok = True
    try:
        for step in (prepare, up, apply, serve_before, replan, serve_after):
            step(demo)
        plot(demo)
    except StepFailed:
        ok = False
    except KeyboardInterrupt:
        ok = False
        demo.say("interrupted")
    finally:
        with demo.step(7, "scepsy down") as rec:
            problems = down(demo)
            rec["problems"] = problems
            if problems:
                ok = False
                demo.say("\n".join(problems))
        if ok and not args.keep_home:
            shutil.rmtree(home, ignore_errors=True)
        elif not ok:
            demo.say(f"logs kept in {home}")
    seconds = round(time.monotonic() - demo.t0, 1)
    demo.doc.update({"ok": ok, "seconds": seconds, "steps": demo.steps})
    demo.say(f"\ndemo {'done' if ok else 'FAILED'} in {seconds} s")
    if args.json:
        print(json.dumps(demo.doc, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
