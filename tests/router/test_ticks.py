"""The router's shared ticks: periodic work on multiples of its period."""

from __future__ import annotations

import pytest

from services.router.ticks import first_tick, next_tick


@pytest.mark.parametrize("now", [0.0, 0.2, 29.999, 30.0, 30.001, 1234.5])
def test_ticks_are_multiples_of_the_period(now: float) -> None:
    period = 30.0
    after = next_tick(now, period)
    assert now < after <= now + period and after % period == 0
    first = first_tick(now, period)
    assert now + period <= first < now + 2 * period and first % period == 0
