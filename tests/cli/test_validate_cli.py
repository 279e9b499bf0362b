"""``scepsy validate``: bad input is exit 2 naming the flag; with a real router process and a real
tiny-model engine (serving both RAG deployment names), a short run prints predicted against
measured latency and throughput and writes the CSV and the plot."""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli.main import main
from services.cli.validate import RateRow, Validation, pilot_size
from services.core.errors import NotFoundError
from services.core.perf.analytic import RequestMix
from services.core.perf.profile import ProfileKey
from services.core.planning.plan import PlanInputs, make_plan, spec_from_text
from services.core.planning.profiles import SpecProfiles
from services.core.sim.replay import ReplayRequest
from services.profiler.joint import JointLlm, JointSweep, monotone
from services.profiler.vllm_backend import SweepConfig
from services.runtime.driver import CallOutcome, DriveResult, RequestOutcome
from services.runtime.engines import EngineSpec, LocalEngine, run_engine_module, vllm_executable
from services.runtime.redis_server import free_port
from services.runtime.store import Store

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rates", "1,x"], "error: --rates: comma-separated numbers"),
        (["--rates", "1", "--load", "0.5"], "error: --rates: give --rates or --load"),
        (["--load", "0,0.5"], "error: --load: numbers > 0"),
        (["--requests", "1"], "error: --requests: must be >= 2, got 1"),
        (["--router", "127.0.0.1:8000"], "error: --router: an http(s) base URL"),
        (["--repeats", "0"], "error: --repeats: must be >= 1, got 0"),
        (["--point-window", "-1"], "error: --point-window: must be >= 0 s, got -1.0"),
        (["--point-window", "nan"], "error: --point-window: must be >= 0 s, got nan"),
        (["--pilot-precision", "0"], "error: --pilot-precision: must be > 0, got 0.0"),
        (["--pilot-max-requests", "0"], "error: --pilot-max-requests: must be >= 1, got 0"),
    ],
)
def test_bad_flags_are_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["validate", "--workflow", "rag", "--router", "http://127.0.0.1:1", *flags]
    # --router given twice: the last one wins (argparse), so the bad-router case applies
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.out == ""


def _pilot(*requests: list[tuple[str, int, int]], failed: int = 0) -> DriveResult:
    """A pilot run: per request its calls (LLM, prompt tokens, completion tokens); ``failed``
    more requests that failed (with calls that would change every figure)."""

    def outcome(calls: list[tuple[str, int, int]], status: str) -> RequestOutcome:
        made = tuple((m, CallOutcome(0.0, 1.0, 0.1, p, c)) for m, p, c in calls)
        return RequestOutcome("r", 0.0, 0.0, 1.0, status, made, 0.0)  # type: ignore[arg-type]

    done = [outcome(calls, "ok") for calls in requests]
    done += [outcome([("gen", 999, 999)], "error") for _ in range(failed)]
    return DriveResult("rag", 1.0, tuple(done))


def test_the_pilot_is_long_enough_for_each_llms_tokens_per_request_to_the_precision() -> None:
    # every request alike: nothing to estimate, the requests run are enough
    same = _pilot(*[[("rank", 50, 1), ("gen", 90, 30)]] * 5)
    assert pilot_size(same, 0.05) == 5
    # gen's completions 10, 20, 30: cv 0.5, so (0.5 / 0.2)^2 = 6.25 -> 7 requests
    spread = _pilot(*[[("rank", 50, 1), ("gen", 90, c)] for c in (10, 20, 30)], failed=2)
    assert pilot_size(spread, 0.2) == 7
    assert pilot_size(spread, 0.05) == 100  # (0.5 / 0.05)^2
    # a request without a call to an LLM counts 0 for it (beam's rounds): prompts 10, 0, 20
    # per request have cv 1; a second call in one request adds to that request's total
    rounds = _pilot([("gen", 10, 5)], [], [("gen", 5, 5), ("gen", 15, 5)])
    assert pilot_size(rounds, 0.4) == 7  # (1 / 0.4)^2 = 6.25
    # fewer than two ok requests: nothing to estimate from
    assert pilot_size(_pilot([("gen", 10, 5)], failed=3), 0.05) == 1


def test_no_registered_engine_is_named(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["validate", "--workflow", "rag", "--router", "http://127.0.0.1:1"]
    argv += ["--redis-url", redis_url, "--namespace", namespace]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no engines registered for reranker, generator" in err
    assert "scepsy endpoints add" in err


# ------------------------------------------------------------------------------- real engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    try:
        vllm = vllm_executable()
    except NotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the engine tests: {exc}")
        pytest.skip(f"no engine venv ({exc})")
    model_dir = tmp_path_factory.mktemp("models") / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    spec = EngineSpec.cpu(
        model_dir, "reranker", extra_args=["--served-model-name", "reranker", "generator"]
    )
    with LocalEngine(spec, tmp_path_factory.mktemp("logs") / "engine.log", vllm=vllm) as e:
        e.start()
        e.wait_ready(time.monotonic() + 300)
        yield e


@pytest.fixture
def router(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    """The router as its own process (``validate`` runs its own event loop)."""
    port = free_port()
    env = dict(os.environ, SCEPSY_REDIS_URL=redis_url)
    argv = [sys.executable, "-m", "services.router", "--namespace", namespace, "--port", "0"]
    argv += ["--http-port", str(port), "--log-level", "warning", "--refresh-s", "0.2"]
    with (tmp_path / "router.log").open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            with opener.open(url + "/health", timeout=1):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "router.log"
            ).read_text()
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=15)


@pytest.mark.engine
@pytest.mark.slow
def test_validate_prints_predicted_against_measured_and_writes_the_plot(
    engine: LocalEngine,
    router: str,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_flags = ["--redis-url", redis_url, "--namespace", namespace]
    for model in ("reranker", "generator"):
        assert main(["endpoints", "add", model, engine.base_url, *store_flags]) == 0
    time.sleep(1.0)  # the router refreshes its replicas every 0.2 s
    capsys.readouterr()
    argv = ["validate", "--workflow", "rag", "--router", router, "--profiles", "analytic"]
    argv += ["--rates", "0.3,0.6", "--requests", "6", "--pilot-requests", "4", "--repeats", "2"]
    argv += ["--capacity-requests", "8", "--out", str(tmp_path / "out"), *store_flags]
    argv += ["--pilot-max-requests", "4"]  # 4 requests: no more
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "workflow rag (tiny) on cpu" in out
    # each rate ran twice (6 requests each, pooled), each repeat's mean and their spread printed
    assert "each repeat's mean latency" in out and "median spread of the repeats" in out
    assert "reranker n=" in out and "generator n=1.00" in out
    assert "throughput (capacity): predicted" in out and "median error: latency" in out
    with (tmp_path / "out" / "validate.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["rate"]) for r in rows] == [0.3, 0.6]
    for r in rows:
        assert float(r["measured_latency_s"]) > 0 and float(r["predicted_latency_s"]) > 0
        assert int(r["errors"]) == 0 and int(r["requests"]) == 12
        measured, predicted = float(r["measured_latency_s"]), float(r["predicted_latency_s"])
        # the latencies are written to 5 significant digits: their ratio to about 1e-4, so the
        # error recomputed from them to about 0.01 percentage points (more when it is small)
        assert float(r["latency_error_pct"]) == pytest.approx(
            abs(predicted / measured - 1) * 100, rel=1e-3, abs=0.02
        )
    assert (tmp_path / "out" / "validate.png").stat().st_size > 1000


# ------------------------------------------------------------------------------- joint profiles
QUICK = SweepConfig(
    warmup_s=0.5,
    window_s=2.0,
    drain_s=3.0,
    budget_s=60.0,
    rate_steps=(0.1, 0.3, 0.6, 1.0, 1.6, 2.5, 4.0),  # unused by the joint sweep's own steps
)


@pytest.mark.engine
@pytest.mark.slow
def test_joint_sweep_measures_every_llm_at_its_share_and_fanout(engine: LocalEngine) -> None:
    rerank = JointLlm("reranker", RequestMix.fixed(40, 1), calls=4.0, group=4)
    generate = JointLlm("generator", RequestMix.fixed(40, 16), calls=1.0, group=1)
    sweep = JointSweep(
        engine.base_url,
        [rerank, generate],
        QUICK,
        probe_requests=4,
        rate_steps=(0.2, 0.6, 1.2, 2.0, 3.0, 4.5),
    )
    result = asyncio.run(sweep.run())
    assert len(result.rates) >= 2 and list(result.rates) == sorted(result.rates)
    for step, lam in enumerate(result.rates):
        # each LLM is offered its share of the workflow rate: lam x n calls/s
        assert result.points["reranker"][step].rate == pytest.approx(4 * lam)
        assert result.points["generator"][step].rate == pytest.approx(lam)
        # reranker calls arrive in groups of 4: the window holds whole groups
        assert result.points["reranker"][step].calls % 4 == 0
    assert result.stop_reason == "saturated" and result.binding in {"reranker", "generator"}
    # the workflow's capacity is the binding LLM's: min over LLMs of saturation x r / n
    caps = {d.name: result.saturation_rate(d.name) * d.replicas / d.calls for d in result.llms}
    assert result.capacity() == min(caps.values()) == caps[result.binding]
    # ... and it fell behind at the last step (its saturation is measured, not extrapolated)
    assert result.points[result.binding][-1].saturated
    key = ProfileKey("tiny-llama", "cpu", 1, 1.0, "vllm-joint", rerank.mix.id)
    profile = result.profile("reranker", key)
    assert all(p.rate < profile.saturation_rate for p in profile.points)
    assert profile.points[0].mean_latency > 0
    doc = result.to_dict()
    assert doc["binding"] == result.binding and set(doc["points"]) == {"reranker", "generator"}


@pytest.mark.engine
@pytest.mark.slow
def test_a_joint_sweep_in_the_workflows_order_replays_each_request_wave_by_wave(
    engine: LocalEngine,
) -> None:
    # RAG's shape: 4 reranker calls at once, 0.2 s of tool time, then the generator
    pilot = [
        ReplayRequest(
            ((0.0, (("reranker", 30 + i, 1),) * 4), (0.2, (("generator", 30 + i, 8),))), 0.0
        )
        for i in range(3)
    ]
    rerank = JointLlm("reranker", RequestMix.fixed(31, 1), calls=4.0, group=4)
    generate = JointLlm("generator", RequestMix.fixed(31, 8), calls=1.0, group=1)
    sweep = JointSweep(
        engine.base_url,
        [rerank, generate],
        replace(QUICK, budget_s=40.0),
        probe_requests=4,
        rate_steps=(0.2, 0.6, 1.2, 2.0),
        requests=pilot,
    )
    # which replayed request each call belongs to (a context variable the calls inherit)
    request = contextvars.ContextVar[int]("request")
    numbers = itertools.count()
    calls: list[tuple[int, str, float, float, bool]] = []
    replay, send = sweep._replay, sweep._send

    async def numbered(*args: object) -> None:
        request.set(next(numbers))
        await replay(*args)  # type: ignore[arg-type]

    async def recorded(session: object, name: str, prompt: int, completion: int) -> object:
        outcome = await send(session, name, prompt, completion)  # type: ignore[arg-type]
        calls.append((request.get(-1), name, outcome.start, outcome.end, outcome.ok))
        return outcome

    sweep._replay = numbered  # type: ignore[assignment, method-assign]
    sweep._send = recorded  # type: ignore[assignment, method-assign]
    result = asyncio.run(sweep.run())
    assert result.method["order"] == "workflow" and len(result.rates) >= 2
    for step, lam in enumerate(result.rates):
        assert result.points["reranker"][step].rate == pytest.approx(4 * lam)
        assert result.points["generator"][step].rate == pytest.approx(lam)
    by_request: dict[int, list[tuple[str, float, float, bool]]] = {}
    for number, name, start, end, ok in calls:
        if number >= 0:  # not the idle calls and the probe
            by_request.setdefault(number, []).append((name, start, end, ok))
    assert len(by_request) >= 4
    for replayed in by_request.values():
        reranks = [c for c in replayed if c[0] == "reranker"]
        assert len(reranks) == 4
        # the first wave is sent whole, at once: every call started before any ended (a spread
        # of start times would be the host's: 0.147 s on a CI run with engines on both cores)
        assert max(c[1] for c in reranks) < min(c[2] for c in reranks)
        for name, start, _, _ in replayed:
            if name == "generator":  # after every reranker call ended, and the tool time
                assert start >= max(c[2] for c in reranks) + 0.2 - 0.01


@pytest.mark.engine
@pytest.mark.slow
def test_validate_with_joint_profiles_names_them(
    engine: LocalEngine,
    router: str,
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_flags = ["--redis-url", redis_url, "--namespace", namespace]
    for model in ("reranker", "generator"):
        assert main(["endpoints", "add", model, engine.base_url, *store_flags]) == 0
    time.sleep(1.0)
    capsys.readouterr()
    argv = ["validate", "--workflow", "rag", "--router", router, "--profiles", "joint"]
    argv += ["--load", "0.3", "--requests", "6", "--pilot-requests", "4", "--json"]
    argv += ["--capacity-requests", "0", "--profile-budget", "45", "--point-window", "2"]
    argv += ["--pilot-max-requests", "7"]
    assert main([*argv, *store_flags]) == 0
    result = json.loads(capsys.readouterr().out)
    # 4 pilot requests are far from a 5 % error on the generator's tokens: 3 more, the most
    assert result["pilot_requests"] == 7
    assert result["allocation_source"] == "registered endpoints"
    assert result["replicas"] == {"reranker": 1, "generator": 1}
    assert all(s.startswith("joint (") for s in result["profiles"].values())
    joint = result["joint"]
    assert {d["name"] for d in joint["llms"]} == {"reranker", "generator"}
    # the joint sweep's capacity is the throughput the ALP predicts (same profiles)
    assert result["predicted_throughput"] == pytest.approx(joint["capacity"], rel=1e-6)
    (row,) = result["rows"]
    assert row["load"] == pytest.approx(0.3) and row["errors"] == 0
    # one operating step at the row's rate, each LLM at its share of it, before the run
    calls = {d["name"]: d["calls"] for d in joint["llms"]}
    for name, (step,) in joint["operating"].items():
        assert step["rate"] == pytest.approx(row["rate"] * calls[name])
        assert step["ok"] > 0
    # the prediction from the sweep's points alone is reported beside it
    assert row["sweep_latency"] > 0 and row["sweep_error"] is not None
    # what ran when, for a benchmark to line up with the host's load: the step, then the run
    step, run = result["windows"]
    assert (step["kind"], run["kind"]) == ("operating", "run")
    assert step["start"] < step["end"] <= run["start"] < run["end"]
    assert run["latency"] == pytest.approx(row["measured_latency"])


def test_a_rows_repeat_spread_is_its_repeats_largest_over_smallest_mean() -> None:
    row = RateRow(
        rate=1.0,
        load=0.5,
        predicted_latency=1.0,
        measured_latency=1.1,
        p50=1.0,
        p99=2.0,
        predicted_throughput=1.0,
        measured_throughput=1.0,
        requests=20,
        errors=0,
        llm_predicted={},
        llm_measured={},
        repeat_latencies=(1.0, 1.25, 1.1),
    )
    assert row.repeat_spread == pytest.approx(25.0)
    assert math.isnan(replace(row, repeat_latencies=(1.0,)).repeat_spread)
    assert math.isnan(replace(row, repeat_latencies=(1.0, math.nan)).repeat_spread)
    # no operating steps: no sweep-only prediction, no error for it
    assert math.isinf(row.sweep_error)


def test_monotone_pools_a_stalled_window_with_its_neighbours() -> None:
    # a stall at the third rate, a quiet fourth: pooled into their weighted mean
    assert monotone([1.0, 2.0, 9.0, 3.0, 10.0], [1, 1, 1, 2, 1]) == pytest.approx(
        [1.0, 2.0, 5.0, 5.0, 10.0]
    )
    assert monotone([3.0, 2.0, 1.0], [1, 1, 1]) == pytest.approx([2.0, 2.0, 2.0])
    assert monotone([1.0, 2.0], [5, 1]) == [1.0, 2.0]


PLAN_SPEC = """
version: 1
fraction_unit: 1
cluster: {gpu_type: cpu, gpus: 3}
models: {reranker: tiny-llama, generator: tiny-llama}
workflows:
  - name: rag
    rate: 2.0
    stats:
      stages: [[reranker], [generator]]
      llms:
        reranker: {n: 6, p: 6, prompt_tokens: 60, completion_tokens: 1}
        generator: {n: 1, p: 1, prompt_tokens: 100, completion_tokens: 32}
"""


async def test_validate_predicts_for_the_current_plans_allocation(store: Store) -> None:
    spec = spec_from_text(PLAN_SPEC)
    plan = await asyncio.to_thread(
        make_plan, PlanInputs(PLAN_SPEC, spec, spec.nodes, SpecProfiles(spec))
    )
    args = argparse.Namespace(workflow="rag", scale="tiny", gpu="cpu")
    validation = Validation(args, store)
    urls = {"reranker": ["http://a"], "generator": ["http://b"]}
    # no plan yet: the registered endpoints, whole devices
    found = await validation.allocation(urls)
    assert validation.allocation_source == "registered endpoints"
    assert {m: a.replicas for m, a in found.items()} == {"reranker": 1, "generator": 1}
    await store.put_plan(plan)
    found = await validation.allocation(urls)
    assert validation.allocation_source == f"plan {plan.id}"
    assert found == {m: plan.allocation[m] for m in ("reranker", "generator")}
