"""Shared ticks for the router's periodic background work.

Each wake-up costs the router more CPU than most of the work it is woken for, so its
periodic work falls on ticks of the event loop's clock: multiples of the period (health checks
every ``health_interval_s``, endpoint refreshes every ``refresh_s``, trace writes within
``trace_flush_s``). With the defaults (1 s, 2 s, 1 s) the timers are due together and wake the
router once a second instead of once each.
"""

from __future__ import annotations

import math


def next_tick(now: float, period: float) -> float:
    """The first multiple of ``period`` after ``now`` (in ``(now, now + period]``)."""
    return (math.floor(now / period) + 1) * period


def first_tick(now: float, period: float) -> float:
    """The first multiple of ``period`` at least a period after ``now`` (in ``[now + period,
    now + 2 period)``): where periodic work begins, so that a start just before a multiple does
    not do it at once (a test that runs checks by hand sees none for a period)."""
    return math.ceil((now + period) / period) * period
