"""A mix's parts, known per request where runs of it are measured: the simulator's serve runs,
the warm-up trace the scorer replays, and the replay's stratified runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.sim.arrivals import poisson_at
from services.core.sim.replay import TraceReplay
from services.core.sim.scoring import ReplayScorer
from services.core.sim.simulator import simulate
from services.core.sim.systems import Context, Setup, tag_parts, warmup_seed
from services.core.sim.workflows import Mix, RagReranker, coserve
from services.core.workload.trace import TraceCall

ALLOCATION = {
    "generator": Allocation(1.0, 1, 2),
    "prm": Allocation(0.5, 1, 2),
    "reranker": Allocation(0.25, 1, 4),
}


@pytest.fixture(scope="module")
def ctx() -> Context:
    return Context.prepare(coserve((0.7, 0.3)), "H100-SXM", 4, warmup_requests=60)


def beam_requests(calls: Sequence[TraceCall], requests: int) -> np.ndarray:
    """Per request index (ids ``r<index>``), whether it called the reward model: beam's part."""
    beam = np.zeros(requests, dtype=bool)
    for c in calls:
        if c.model == "prm":
            beam[int(c.request_id[1:])] = True
    return beam


def test_a_served_runs_groups_are_the_parts_its_requests_ran(ctx: Context) -> None:
    requests = 40
    result = ctx.serve(Setup("a", ALLOCATION), poisson_at(0.2, requests, 3), record=True)
    groups = ctx.groups(requests)
    assert groups is not None
    beam = ctx.workflow.parts.index(next(p for p in ctx.workflow.parts if p.name == "beam"))
    assert 0 < np.count_nonzero(groups == beam) < requests
    assert np.array_equal(groups == beam, beam_requests(result.trace, requests))


def test_the_scorers_groups_follow_its_replayed_requests(ctx: Context) -> None:
    scorer = ctx.scorer
    tagged = tag_parts(ctx.warmup, ctx.workflow, warmup_seed(ctx.options))
    names = [p.name for p in ctx.workflow.parts]
    part = {r.request_id: names.index(r.workflow) for r in tagged.requests}
    replay = scorer.workflow
    assert isinstance(replay, TraceReplay)
    assert len(scorer.groups) == len(replay.requests) > 0
    assert list(scorer.groups) == [part[rid] for rid in replay.request_ids]

    requests, seed = 30, 11
    run = scorer.run_workflow(requests, seed)
    options = replace(ctx.options, seed=ctx.options.seed + seed, record=True)
    result = simulate(run, scorer.deployment(ALLOCATION), poisson_at(0.2, requests, seed), options)
    groups = scorer.run_groups(run, options.seed, requests)
    assert groups is not None
    assert np.array_equal(groups == names.index("beam"), beam_requests(result.trace, requests))


def test_one_workflow_has_no_groups() -> None:
    one = Context.prepare(RagReranker(), "H100-SXM", 4, warmup_requests=20)
    assert one.groups(10) is None
    assert one.scorer.groups == ()
    run = one.scorer.run_workflow(10, 1)
    assert one.scorer.run_groups(run, 1, 10) is None


def test_a_scorer_of_several_traced_workflows_counts_each(ctx: Context) -> None:
    """The planner's path: workflows traced under their own names, replayed as a ``Mix``."""
    tagged = tag_parts(ctx.warmup, ctx.workflow, warmup_seed(ctx.options))
    scorer = ReplayScorer.of_trace(tagged, {"rag": 0.7, "beam": 0.3}, ctx.gpu, ctx.models)
    run = scorer.run_workflow(40, 5)
    assert isinstance(run, Mix)
    seed = ctx.options.seed + 9
    groups = scorer.run_groups(run, seed, 40)
    assert groups is not None
    options = replace(ctx.options, seed=seed, record=True)
    result = simulate(run, scorer.deployment(ALLOCATION), poisson_at(0.2, 40, 5), options)
    beam = [p.name for p in run.parts].index("beam")
    assert np.array_equal(groups == beam, beam_requests(result.trace, 40))
