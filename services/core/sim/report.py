"""What the evaluation shows, computed only from the curves it plots.

- **peak sustainable throughput** of a curve: the highest offered rate among its sustainable
  points (0 when none is); a sustainable point serves what is offered (its achieved throughput
  is the offered rate, up to the noise of a finite run), and every system sees the same
  arrivals at a grid rate, so peaks compare exactly;
- **latency at equal throughput** of Scepsy against a baseline: both at the highest offered rate
  that both sustain (where the baseline is closest to its peak), mean and p99;
- **ratios**: Scepsy's peak / the baseline's peak, and the baseline's latency / Scepsy's latency
  at that common rate (above 1: Scepsy is better). None when undefined (no common rate, or a
  baseline with no sustainable point: then Scepsy's peak ratio is unbounded).

``comparisons`` gives one row per (workflow, GPU count, baseline); ``format_report`` prints them
with the ALP error, the oracle and the stability check; ``report_dict`` and ``curve_rows`` are the
JSON and CSV forms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.core.sim.measure import Point
from services.core.sim.results import BenchResult, Curve, GpuResult, WorkflowResult


def peak(curve: Curve) -> float:
    """The highest offered rate among the sustainable points (0 when none)."""
    return max((p.rate for p in curve.points if p.sustainable), default=0.0)


def common_point(a: Curve, b: Curve) -> tuple[Point, Point] | None:
    """The two curves' points at the highest offered rate both sustain."""
    ours = {p.rate: p for p in a.points if p.sustainable}
    theirs = {p.rate: p for p in b.points if p.sustainable}
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        return None
    return ours[shared[-1]], theirs[shared[-1]]


def _ratio(num: float, den: float) -> float | None:
    if den <= 0 or not math.isfinite(num) or not math.isfinite(den):
        return None
    return num / den


@dataclass(frozen=True, slots=True)
class Comparison:
    """Scepsy against one baseline on one workflow and GPU count."""

    workflow: str
    gpus: int
    baseline: str
    scepsy_peak: float
    baseline_peak: float
    peak_ratio: float | None  # scepsy / baseline
    rate: float | None  # the common rate (requests/s)
    scepsy_mean: float | None
    baseline_mean: float | None
    scepsy_p99: float | None
    baseline_p99: float | None
    mean_ratio: float | None  # baseline / scepsy
    p99_ratio: float | None


def compare(workflow: str, result: GpuResult, baseline: str) -> Comparison:
    scepsy, other = result.curve("scepsy"), result.curve(baseline)
    ours, theirs = peak(scepsy), peak(other)
    pair = common_point(scepsy, other)
    if pair is None:
        return Comparison(
            workflow, result.gpus, baseline, ours, theirs, _ratio(ours, theirs),
            None, None, None, None, None, None, None,
        )  # fmt: skip
    a, b = pair
    return Comparison(
        workflow=workflow,
        gpus=result.gpus,
        baseline=baseline,
        scepsy_peak=ours,
        baseline_peak=theirs,
        peak_ratio=_ratio(ours, theirs),
        rate=a.rate,
        scepsy_mean=a.mean_latency,
        baseline_mean=b.mean_latency,
        scepsy_p99=a.p99_latency,
        baseline_p99=b.p99_latency,
        mean_ratio=_ratio(b.mean_latency, a.mean_latency),
        p99_ratio=_ratio(b.p99_latency, a.p99_latency),
    )


def comparisons(result: BenchResult) -> list[Comparison]:
    return [
        compare(w.workflow, g, c.system)
        for w in result.workflows
        for g in w.gpus
        for c in g.curves
        if c.system != "scepsy"
    ]


def alp_errors(workflow: WorkflowResult) -> tuple[float | None, float | None]:
    """(median |latency error|, median |throughput error|) of Scepsy's plans, as fractions."""
    lat = [abs(c.error) for g in workflow.gpus for c in g.alp_latency]
    thr = [abs(g.alp_throughput.error) for g in workflow.gpus if g.alp_throughput is not None]
    return (
        float(np.median(lat)) if lat else None,
        float(np.median(thr)) if thr else None,
    )


# ------------------------------------------------------------------------------------ text
def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_comparisons(rows: Sequence[Comparison]) -> list[str]:
    lines = [
        f"{'workflow':10} {'GPUs':>4} {'baseline':12} {'peak req/s':>17} {'peak':>7} "
        f"{'@ req/s':>8} {'mean s (S/B)':>15} {'mean':>7} {'p99 s (S/B)':>15} {'p99':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.workflow:10} {r.gpus:>4} {r.baseline:12} "
            f"{r.scepsy_peak:>8.3g}/{r.baseline_peak:<8.3g} {_x(r.peak_ratio):>7} "
            f"{_s(r.rate):>8} {_s(r.scepsy_mean):>7}/{_s(r.baseline_mean):<7} "
            f"{_x(r.mean_ratio):>7} "
            f"{_s(r.scepsy_p99):>7}/{_s(r.baseline_p99):<7} {_x(r.p99_ratio):>7}"
        )
    return lines


def format_workflow(w: WorkflowResult) -> list[str]:
    lines = [f"== {w.workflow}: " + ", ".join(f"{m} = {c}" for m, c in w.models.items())]
    lines.append(
        "   n_m " + ", ".join(f"{m} {n:.1f}" for m, n in w.calls_per_request.items())
        + "; p_m " + ", ".join(f"{m} {p:.1f}" for m, p in w.concurrency.items())
        + f"; isolated request latency {w.isolated_latency:.2f} s"
    )  # fmt: skip
    for g in w.gpus:
        best = {c.system: peak(c) for c in g.curves}
        plan = next((p.allocation for p in reversed(g.curve("scepsy").points) if p.sustainable), "")
        lines.append(
            f"   {g.gpus:>2} GPUs: ALP capacity {g.capacity:.3g} req/s; peaks "
            + ", ".join(f"{s} {v:.3g}" for s, v in best.items())
            + (f"; scepsy at peak: {plan}" if plan else "")
        )
        if g.alp_throughput is not None:
            t = g.alp_throughput
            lines.append(
                f"          ALP throughput {t.predicted:.3g} vs simulated {t.simulated:.3g} "
                f"({t.error:+.0%}); latency errors "
                + ", ".join(f"{c.error:+.0%}" for c in g.alp_latency)
            )
        if g.oracle is not None:
            o = g.oracle
            lines.append(
                f"          oracle @ {o.rate:.3g} req/s ({o.simulated} of {o.candidates} "
                f"simulated): {o.latency:.2f} s [{o.allocation}] vs scepsy {o.scepsy_latency:.2f}"
                f" s [{o.scepsy_allocation}] = {o.scepsy_latency / o.latency:.2f}x the oracle"
            )
    for s in w.stability:
        lines.append(
            f"   stability ({s.source}, {s.requests} requests): e2e latency CV {s.e2e_cv:.2f}; "
            "time share mean/CV "
            + ", ".join(f"{m} {mean:.2f}/{cv:.2f}" for m, mean, cv in s.shares)
        )
    lat, thr = alp_errors(w)
    lines.append(f"   ALP median |error|: latency {_pct(lat)}, throughput {_pct(thr)}")
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def format_report(result: BenchResult) -> str:
    """The results table, then per workflow the details."""
    lines = format_comparisons(comparisons(result))
    for w in result.workflows:
        lines.append("")
        lines.extend(format_workflow(w))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ data
def _clean(value: Any) -> Any:
    """JSON-ready: infinities and NaN become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def report_dict(result: BenchResult) -> dict[str, Any]:
    """Everything: settings, comparisons, per workflow the curves, checks and stability."""
    settings = dataclasses.asdict(result.settings)
    workflows = []
    for w in result.workflows:
        doc = dataclasses.asdict(w)
        lat, thr = alp_errors(w)
        doc["alp_median_abs_error"] = {"latency": lat, "throughput": thr}
        workflows.append(doc)
    report: dict[str, Any] = _clean(
        {
            "settings": settings,
            "calls_simulated": result.calls,
            "comparisons": [dataclasses.asdict(c) for c in comparisons(result)],
            "workflows": workflows,
        }
    )
    return report


CURVE_COLUMNS = (
    "workflow", "gpus", "system", "rate", "throughput", "completion_ratio", "backlog_growth",
    "settled", "sustainable",
    "mean_latency", "p50_latency", "p99_latency", "predicted_latency", "requests", "gpus_used",
    "allocation",
)  # fmt: skip


def curve_rows(result: BenchResult) -> list[dict[str, Any]]:
    """One row per curve point (``CURVE_COLUMNS``)."""
    rows = []
    for w in result.workflows:
        for g in w.gpus:
            for c in g.curves:
                for p in c.points:
                    row = dataclasses.asdict(p)
                    row["gpus_used"] = row.pop("gpus")
                    row.update(workflow=w.workflow, gpus=g.gpus, system=c.system)
                    rows.append({k: _clean(row.get(k)) for k in CURVE_COLUMNS})
    return rows
