"""Curve points from runs, and the report's ratios computed from the curves it plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.core.sim.measure import MeasureConfig, Point, backlog_growth, measure
from services.core.sim.report import (
    common_point,
    comparisons,
    curve_rows,
    format_report,
    format_seed_rows,
    interval,
    monotone_violations,
    past_peak,
    peak,
    report_dict,
    seed_rows,
    shared_ratios,
)
from services.core.sim.results import (
    BenchResult,
    BenchSettings,
    Curve,
    GpuResult,
    WorkflowResult,
)
from services.core.sim.simulator import SimResult


def run(arrival: np.ndarray, latency: np.ndarray) -> SimResult:
    return SimResult(
        workflow="w",
        arrival=arrival,
        finish=arrival + latency,
        calls=len(arrival),
        calls_by_model={"m": len(arrival)},
        iterations=0,
        preemptions=0,
        end=float((arrival + latency).max()),
    )


CONFIG = MeasureConfig(warmup_share=0.2, warmup_latencies=3.0, min_span_latencies=10.0)


def test_a_steady_run_is_sustainable_and_serves_its_rate() -> None:
    # 1,000 requests 0.1 s apart (10/s), 1 s each: warm-up max(0.2 x 99.9, 3 x 1) = 19.98 s ->
    # measured from request 200 (t = 20.0); window [20.0, 99.9]; requests finishing in it are
    # those arriving in [19.0, 98.9]: 800 of the 800 that arrive in the window
    arrival = np.arange(1000) * 0.1
    point = measure(run(arrival, np.ones(1000)), 10.0, CONFIG)
    assert point.requests == 800
    assert point.completion_ratio == pytest.approx(1.0)
    assert point.throughput == pytest.approx(800 / 79.9)
    assert abs(point.backlog_growth) < 0.01  # 10 in the system throughout, up to rounding
    assert point.settled and point.sustainable
    assert point.mean_latency == pytest.approx(1.0)


def test_a_growing_backlog_is_not_sustainable() -> None:
    # capacity 5/s, 10/s offered: request i arrives at i / 10 and finishes at i / 5 + 0.01. The
    # median latency (~50 s) caps the warm-up at 60% of the span: measured from request 600
    # (t = 60.0); window [60.0, 99.9]; finishing in it: requests 300..499, so 200 of 400
    # (ratio 0.5, throughput 200 / 39.9 = the capacity); the backlog grows by 10 - 5 requests
    # per second against 400 / 39.9 arriving: 0.499; 99.9 s < 10 median latencies: not settled
    arrival = np.arange(1000) * 0.1
    point = measure(run(arrival, arrival + 0.01), 10.0, CONFIG)
    assert point.requests == 400
    assert point.completion_ratio == pytest.approx(0.5)
    assert point.throughput == pytest.approx(200 / 39.9)
    assert point.backlog_growth == pytest.approx(5 / (400 / 39.9), rel=0.01)
    assert not point.settled and not point.sustainable


def test_backlog_growth_of_a_steady_and_a_filling_system() -> None:
    # arrivals every 0.5 s over [0, 100]; steady: each leaves 3 s later (6 inside); filling:
    # only every other one leaves (backlog +1 per s against 2 arriving per s: 0.5)
    arrival = np.arange(201) * 0.5
    steady = backlog_growth(arrival, arrival + 3.0, 10.0, 100.0, 2.0)
    assert abs(steady) < 0.01
    finish = np.where(np.arange(201) % 2 == 0, arrival + 1.0, np.inf)
    assert backlog_growth(arrival, finish, 10.0, 100.0, 2.0) == pytest.approx(0.5, rel=0.02)


def point(rate: float, mean: float, p99: float, ok: bool = True) -> Point:
    return Point(
        rate=rate,
        requests=100,
        throughput=rate if ok else rate * 0.7,
        completion_ratio=1.0 if ok else 0.7,
        backlog_growth=0.0 if ok else 0.3,
        settled=True,
        mean_latency=mean,
        p50_latency=mean,
        p99_latency=p99,
        sustainable=ok,
    )


def bench() -> BenchResult:
    scepsy = Curve(
        "scepsy",
        (point(1, 1.0, 2.0), point(2, 1.2, 2.5), point(3, 1.5, 3.0), point(4, 9, 20, ok=False)),
    )
    static = Curve(
        "static",
        (point(1, 1.1, 2.2), point(2, 3.6, 10.0), point(2.5, 4.0, 12.0), point(3, 8, 30, False)),
    )
    nothing = Curve("independent", (point(1, 5, 9, False),))
    gpu = GpuResult(4, 4.2, (scepsy, static, nothing), (), None, None)
    wf = WorkflowResult("w", {"m": "x"}, {"m": 1.0}, {"m": 1.0}, 0.5, (gpu,), (), 1000)
    return BenchResult(BenchSettings(gpu_counts=(4,)), (wf,))


def test_peaks_and_latency_ratios_come_from_the_plotted_points() -> None:
    result = bench()
    rows = curve_rows(result)  # what the CSV holds and the plots draw
    by = {(r["system"], r["rate"]): r for r in rows}
    static, independent = comparisons(result)[0], comparisons(result)[1]
    # peaks: the highest sustainable offered rate of each curve: scepsy 3, static 2.5
    assert static.scepsy_peak == max(
        r for (s, r), row in by.items() if s == "scepsy" and row["sustainable"]
    )
    assert (static.scepsy_peak, static.baseline_peak) == (3, 2.5)
    assert static.peak_ratio == pytest.approx(3 / 2.5)
    # equal throughput: the highest rate both sustain is 2 (2.5 is static's own point)
    assert static.rate == 2
    assert static.mean_ratio == pytest.approx(by[("static", 2)]["mean_latency"] / 1.2)  # 3.0x
    assert static.p99_ratio == pytest.approx(10.0 / 2.5)
    # a baseline with no sustainable point: no ratio
    assert independent.baseline_peak == 0 and independent.peak_ratio is None
    assert independent.rate is None and independent.mean_ratio is None


def test_common_point_and_peak_of_hand_curves() -> None:
    a = Curve("a", (point(1, 1, 1), point(2, 1, 1, ok=False)))
    b = Curve("b", (point(1, 2, 2), point(2, 2, 2)))
    assert peak(a) == 1 and peak(b) == 2
    pair = common_point(a, b)
    assert pair is not None and pair[0].rate == pair[1].rate == 1


def test_report_text_and_json() -> None:
    result = bench()
    text = format_report(result)
    assert "1.20x" in text and "3.00x" in text
    doc = report_dict(result)
    json.dumps(doc, allow_nan=False)  # infinities and NaN became null
    assert doc["comparisons"][0]["peak_ratio"] == pytest.approx(1.2)


def test_latency_at_every_shared_rate_and_past_the_baselines_peak() -> None:
    static = comparisons(bench())[0]
    # shared steady rates 1 and 2: static / scepsy = 1.1 and 3.0
    assert static.shared_rates == 2
    assert static.median_mean_ratio == pytest.approx((1.1 + 3.0) / 2)
    assert static.min_mean_ratio == pytest.approx(1.1)
    assert static.worse_rates == 0
    # rate 3: scepsy steady (1.5 s), static falling behind (8 s): labelled apart
    assert static.past_peak_rate == 3
    assert static.past_peak_ratio == pytest.approx(8 / 1.5)
    a = Curve("a", (point(1, 1.0, 1), point(2, 2.0, 2)))
    b = Curve("b", (point(1, 0.9, 1), point(2, 2.1, 2)))
    assert [r for r, _ in shared_ratios(a, b)] == [1, 2]
    assert past_peak(a, b) is None


def test_a_curve_that_gets_faster_at_a_higher_rate_is_not_monotone() -> None:
    curve = Curve(
        "scepsy",
        (point(1, 2.0, 3), point(2, 1.5, 3), point(3, 2.05, 3), point(4, 1.0, 2, ok=False)),
    )
    # 1.5 s at rate 2 is more than 3% below 2.0 s at rate 1; 2.05 at rate 3 is not below;
    # the unsustainable point does not count
    assert monotone_violations(curve) == [2]
    assert "not monotone" not in format_report(bench())


def test_seed_intervals_pool_the_comparisons() -> None:
    assert interval([]) is None
    assert interval([2.0]) == (2.0, 0.0)
    mean, half = interval([1.0, 2.0, 3.0])  # type: ignore[misc]
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 * 1.0 / np.sqrt(3))
    rows = seed_rows([bench(), bench()])
    static = next(r for r in rows if r.baseline == "static")
    assert static.seeds == 2
    assert static.peak_ratio == pytest.approx((1.2, 0.0))
    assert static.shared_rates == 4
    assert any("peak ratio" in line for line in format_seed_rows(rows))
