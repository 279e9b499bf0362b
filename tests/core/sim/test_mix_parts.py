"""A mix's parts, known per request where runs of it are measured: the simulator's serve runs,
the warm-up trace the scorer replays, and the replay's stratified runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

from services.core.allocation import Allocation
from services.core.errors import InvalidInputError
from services.core.sim.arrivals import poisson_at
from services.core.sim.replay import StratifiedMix, TraceReplay
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


def test_the_scorer_replays_each_part_at_exactly_its_share(ctx: Context) -> None:
    scorer = ctx.scorer
    mix = scorer.workflow
    assert isinstance(mix, Mix)
    names = [p.name for p in mix.parts]
    assert names == [p.name for p in ctx.workflow.parts] and mix.shares == (0.7, 0.3)
    tagged = tag_parts(ctx.warmup, ctx.workflow, warmup_seed(ctx.options))
    for part in mix.parts:  # each part replays its own traced requests, and only those
        assert isinstance(part, TraceReplay)
        ids = {r.request_id for r in tagged.requests if r.workflow == part.name}
        assert set(part.request_ids) == ids

    for requests, seed in ((30, 11), (31, 12)):
        run = scorer.run_workflow(requests, seed)
        assert isinstance(run, StratifiedMix)
        groups = scorer.run_groups(run, seed, requests)
        assert groups is not None
        beam = names.index("beam")
        # the shares are the mix's, not a draw of them (largest remainder: 9 of 30, 9 of 31)
        assert np.count_nonzero(groups == beam) == round(0.3 * requests)
        options = replace(ctx.options, seed=ctx.options.seed + seed, record=True)
        allocation = scorer.deployment(ALLOCATION)
        result = simulate(run, allocation, poisson_at(0.2, requests, seed), options)
        assert np.array_equal(groups == beam, beam_requests(result.trace, requests))
    # one seed, one draw: every allocation is scored on the same requests
    again = scorer.run_workflow(31, 12)
    assert isinstance(again, StratifiedMix)
    assert (again.part, again.index) == (run.part, run.index)


def test_a_stratified_mix_holds_each_parts_work_and_share() -> None:
    """Counts by largest remainder, and each part's run stratified by work: its mean work is
    the part's traced mean within O(1/n), where iid draws are off by O(1/sqrt(n))."""
    light = Context.prepare(RagReranker(), "H100-SXM", 4, warmup_requests=40).replay
    heavy = Context.prepare(coserve((0.5, 0.5)), "H100-SXM", 4, warmup_requests=80).scorer
    assert isinstance(heavy.workflow, Mix)
    beam = heavy.workflow.parts[1]
    assert isinstance(beam, TraceReplay)
    parts = (light, beam)
    for requests in (7, 50, 333):
        run = StratifiedMix.of(Mix("m", parts, (0.85, 0.15)), requests, seed=requests)
        counts = np.bincount(run.groups(requests), minlength=2)
        assert counts.sum() == requests
        assert abs(counts[1] - 0.15 * requests) < 1  # rounding, never a draw
        for k, part in enumerate(parts):
            n = int(counts[k])
            drawn = [
                part.work[run.parts[k].order[i]]
                for i, g in zip(run.index, run.part, strict=True)
                if g == k
            ]
            assert len(drawn) == n
            if n >= len(part.work):  # every traced request at least n // N times
                assert np.mean(drawn) == pytest.approx(np.mean(part.work), rel=0.15)
    with pytest.raises(InvalidInputError, match="requests"):
        StratifiedMix.of(Mix("m", parts, (0.5, 0.5)), 0, seed=1)
    with pytest.raises(InvalidInputError, match="share"):
        StratifiedMix.of(Mix("m", parts, (1.0, 0.0)), 5, seed=1)
    with pytest.raises(InvalidInputError, match="requests"):
        StratifiedMix.of(Mix("m", parts, (0.5, 0.5)), 5, seed=1).groups(6)


def test_one_workflow_has_no_groups() -> None:
    one = Context.prepare(RagReranker(), "H100-SXM", 4, warmup_requests=20)
    assert one.groups(10) is None
    run = one.scorer.run_workflow(10, 1)
    assert one.scorer.run_groups(run, 1, 10) is None


def test_a_scorer_of_several_traced_workflows_counts_each(ctx: Context) -> None:
    """The planner's path: workflows traced under their own names, replayed as a ``Mix``."""
    tagged = tag_parts(ctx.warmup, ctx.workflow, warmup_seed(ctx.options))
    scorer = ReplayScorer.of_trace(tagged, {"rag": 0.7, "beam": 0.3}, ctx.gpu, ctx.models)
    run = scorer.run_workflow(40, 5)
    assert isinstance(run, StratifiedMix)  # the planner's runs hold the exact shares too
    seed = ctx.options.seed + 9
    groups = scorer.run_groups(run, seed, 40)
    assert groups is not None
    beam = [p.name for p in scorer.workflow.parts].index("beam")
    assert np.count_nonzero(groups == beam) == 12
    options = replace(ctx.options, seed=seed, record=True)
    result = simulate(run, scorer.deployment(ALLOCATION), poisson_at(0.2, 40, 5), options)
    assert np.array_equal(groups == beam, beam_requests(result.trace, 40))
