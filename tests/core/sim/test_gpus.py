"""The fewest-GPUs plan checked on the replay (services/core/sim/gpus.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from services.core.allocation import Allocation
from services.core.planning.refine import Scored
from services.core.sim.gpus import MET, VERIFY_ROUNDS, fewest
from services.core.sim.scoring import RefineSettings
from services.core.sim.systems import Context
from services.core.sim.workflows import BeamSearch

BEAM = BeamSearch(max_rounds=6, p_answer=0.4)


@pytest.fixture(scope="module")
def ctx() -> Context:
    small = RefineSettings(candidates=3, headroom=(1.3,), calls=8_000, min_requests=60)
    return replace(Context.prepare(BEAM, "H100-SXM", 4, warmup_requests=40), refine=small)


def _gpus(allocation: Mapping[str, Allocation]) -> float:
    return sum(a.tp * a.fraction * a.replicas for a in allocation.values())


def test_fewest_gpus_move_on_from_a_plan_that_missed_and_give_up_honestly(
    ctx: Context,
) -> None:
    rate = 0.3 * ctx.capacity(4)
    everything = {"policy": Allocation(1.0, 1, 2), "prm": Allocation(1.0, 1, 2)}
    slo = 1.6 * ctx.latency_of(ctx.predict(everything, rate))
    judged: list[tuple[str, float]] = []

    def replay(allocation: Mapping[str, Allocation], r: float) -> Scored:
        # a replay that finds the closed form 1.4x optimistic on every plan
        latency = 1.4 * ctx.latency_of(ctx.predict(allocation, r))
        judged.append((repr(sorted(allocation.items())), latency))
        return Scored(latency, r, True)

    pessimist = replace(ctx)
    pessimist.score_replay = replay  # type: ignore[assignment, method-assign]
    mine = fewest(pessimist, 4, rate, slo)
    # each round a plan of lower closed-form latency than the one that missed, never the same
    latencies = [latency for _, latency in judged]
    assert latencies == sorted(latencies, reverse=True)
    assert len({plan for plan, _ in judged}) == len(judged) <= VERIFY_ROUNDS
    # met, or given up: every round missed (or the next objective is past the 4 GPUs)
    assert (mine is not None and latencies[-1] <= slo * MET) or (
        mine is None and all(latency > slo * MET for latency in latencies)
    )
    unchecked = fewest(replace(ctx, refine=None), 4, rate, slo)
    assert unchecked is not None
    if mine is not None:
        assert _gpus(unchecked) <= _gpus(mine)
    # a replay that never keeps up: no plan, after at most VERIFY_ROUNDS tries
    judged.clear()

    def behind(allocation: Mapping[str, Allocation], r: float) -> Scored:
        judged.append(("", 0.0))
        return Scored(1.0, 0.0, False)

    pessimist.score_replay = behind  # type: ignore[assignment, method-assign]
    assert fewest(pessimist, 4, rate, slo) is None
    assert 1 <= len(judged) <= VERIFY_ROUNDS
