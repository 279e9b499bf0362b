"""The planner service refines its plans on a replay of the router's recorded trace: the closed
form's best candidates are simulated (``services.core.sim.scoring``) and the plan records them,
through the store (the contract's Plan message)."""

from __future__ import annotations

import time

import pytest

from services.cli.plan import format_plan
from services.core.workload.trace import TraceCall, TraceRequest, dumps
from services.planner.config import PlannerConfig
from services.planner.service import Planner
from services.runtime.store import Store
from tests.planner.test_planner_service import CLUSTER

TOOL_S = 0.5  # tool time between a request's two waves

SPEC = """
version: 1
fraction_unit: 2
models: {small: Qwen/Qwen2.5-0.5B, tiny: Qwen/Qwen3-0.6B}
workflows:
  - {name: chat, rate: 2.0, trace: router}
"""


async def record_fanout_trace(store: Store, requests: int = 60) -> None:
    """Each request: 4 calls to small at once, TOOL_S of tool time, then 1 call to tiny."""
    now = time.time()
    lines = []
    for r in range(requests):
        t0 = now - 120 + r
        calls = [("small", t0, t0 + 0.3)] * 4 + [("tiny", t0 + 0.3 + TOOL_S, t0 + 0.5 + TOOL_S)]
        for i, (model, s, e) in enumerate(calls):
            call = TraceCall("chat", f"r{r}", f"c{i}", model, s, e, 300, 40, 0.05, "ok", "x/0")
            lines.append(dumps(call))
        lines.append(dumps(TraceRequest("chat", f"r{r}", t0, t0 + 0.5 + TOOL_S)))
    await store.append_trace(lines, max_len=10_000)


def planner(redis_url: str, namespace: str, store: Store, **options: float) -> Planner:
    config = PlannerConfig(redis_url=redis_url, namespace=namespace, **options)  # type: ignore[arg-type]
    return Planner(config, store)


async def test_a_plan_on_the_recorded_trace_is_refined_and_keeps_its_candidates(
    redis_url: str, namespace: str, store: Store
) -> None:
    await record_fanout_trace(store)
    plan = await planner(redis_url, namespace, store).plan(SPEC, CLUSTER)
    assert plan.refinement, "no candidate was simulated"
    assert plan.refinement[0].startswith("chosen "), plan.refinement
    assert sum(line.startswith("chosen ") for line in plan.refinement) == 1
    # the replay keeps the traced tool time between the waves, which no LLM can shorten
    assert plan.simulated_latency_s is not None
    assert plan.simulated_latency_s > TOOL_S
    # what the store (and so GetPlan and the agents) read back carries the same record
    stored = await store.get_plan(plan.id)
    assert stored is not None
    assert stored.refinement == plan.refinement
    assert stored.simulated_latency_s == pytest.approx(plan.simulated_latency_s)
    assert "  refined chosen " in format_plan(stored)  # what `scepsy plan show` prints


async def test_refinement_off_or_without_a_trace_to_replay_plans_the_closed_form(
    redis_url: str, namespace: str, store: Store
) -> None:
    await record_fanout_trace(store)
    off = await planner(redis_url, namespace, store, refine_seconds=0).plan(SPEC, CLUSTER)
    assert off.refinement == ()
    assert off.simulated_latency_s is None
    # a second workflow known only by inline statistics has no requests to replay
    mixed = SPEC + (
        "  - name: batch\n    rate: 0.5\n    stats:\n"
        "      llms: {small: {n: 1, p: 1, prompt_tokens: 100, completion_tokens: 10}}\n"
    )
    plan = await planner(redis_url, namespace, store).plan(mixed, CLUSTER)
    assert plan.refinement == ()
    assert {w.workflow for w in plan.workflows} == {"chat", "batch"}
