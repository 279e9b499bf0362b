"""The demo's and the real-engine tests' rates come from offline plans (services/runtime/cpu_rag):
a performance-model change that removes the allocation flip fails here in a second, not in a
five-minute demo."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime import cpu_rag


@pytest.fixture
def models(tmp_path: Path) -> cpu_rag.Models:
    # weights are only paths to the planner; the architecture is the catalogue's
    return cpu_rag.Models(str(tmp_path), str(tmp_path))


def test_flip_brackets_the_rate_where_the_allocation_changes(models: cpu_rag.Models) -> None:
    found = cpu_rag.flip(models)
    assert found is not None
    assert found.low.rate < found.high.rate
    assert found.low.allocation == cpu_rag.LOW_ALLOCATION
    assert found.high.allocation == cpu_rag.HIGH_ALLOCATION
    # planned again at each rate, each gives the same allocation (the search is not stale)
    assert cpu_rag.plan_offline(models, found.low.rate).allocation == cpu_rag.LOW_ALLOCATION
    assert cpu_rag.plan_offline(models, found.high.rate).allocation == cpu_rag.HIGH_ALLOCATION


def test_demo_rates_make_the_loops_replan_move_engines(models: cpu_rag.Models) -> None:
    rates = cpu_rag.demo_rates(models)
    assert rates is not None
    assert rates.after.rate == pytest.approx(2 * rates.before.rate)
    assert rates.before.allocation == cpu_rag.LOW_ALLOCATION
    # wherever between the loop's trigger and the doubled rate its window is, the plan moves
    assert rates.before.rate < rates.trigger.rate < rates.after.rate
    for rate in (rates.trigger.rate, (rates.trigger.rate + rates.after.rate) / 2):
        assert cpu_rag.plan_offline(models, rate).allocation == cpu_rag.HIGH_ALLOCATION


def test_spec_text_names_both_models_and_the_rate(models: cpu_rag.Models) -> None:
    text = cpu_rag.spec_text(models, 0.123456)
    assert "rate: 0.1235" in text
    assert text.count(f"weights: {models.gen_weights}") == 2
