"""What the evaluation shows, computed only from the curves it plots.

- **peak sustainable throughput** of a curve: the highest offered rate among its sustainable
  points (0 when none is); a sustainable point serves what is offered (its achieved throughput
  is the offered rate, up to the noise of a finite run), and every system sees the same
  arrivals at a grid rate, so peaks compare exactly;
- **latency at equal throughput** of Scepsy against a baseline: both at the highest offered rate
  that both sustain (where the baseline is closest to its peak), mean and p99;
- **ratios**: Scepsy's peak / the baseline's peak, and the baseline's latency / Scepsy's latency
  at that common rate (above 1: Scepsy is better). None when undefined (no common rate, or a
  baseline with no sustainable point: then Scepsy's peak ratio is unbounded);
- **at every shared steady rate** (both sustainable, the same arrivals): the median and the
  lowest of the baseline / Scepsy mean-latency ratios, and how many shared rates have Scepsy
  slower by more than ``NOISE`` (ratio below 1 / (1 + NOISE));
- **past the baseline's peak**, labelled apart: at rates Scepsy sustains and the baseline does
  not, the baseline / Scepsy mean-latency ratio at the lowest such rate. Not a steady-state
  comparison (the baseline's backlog grows: its latency depends on the run's length);
- **monotone**: Scepsy's sustainable points whose mean latency is more than ``NOISE`` below
  that of a lower sustainable rate (``monotone_violations``).

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
    shared_rates: int = 0  # rates both sustain
    median_mean_ratio: float | None = None  # over the shared rates, baseline / scepsy
    min_mean_ratio: float | None = None  # the shared rate least favourable to Scepsy
    worse_rates: int = 0  # shared rates with Scepsy slower by more than NOISE
    past_peak_rate: float | None = None  # lowest rate Scepsy sustains and the baseline does not
    past_peak_ratio: float | None = None  # baseline / scepsy mean latency there (not steady)


NOISE = 0.03  # latency differences within this are noise of a finite run


def shared_ratios(a: Curve, b: Curve) -> list[tuple[float, float]]:
    """(rate, b's mean latency / a's) at every rate both curves sustain, by rate."""
    ours = {p.rate: p for p in a.points if p.sustainable}
    theirs = {p.rate: p for p in b.points if p.sustainable}
    return [
        (r, theirs[r].mean_latency / ours[r].mean_latency) for r in sorted(set(ours) & set(theirs))
    ]


def past_peak(a: Curve, b: Curve) -> tuple[float, float] | None:
    """(rate, b's mean / a's) at the lowest rate a sustains and b does not (b measured)."""
    theirs = {p.rate: p for p in b.points}
    for p in sorted(a.points, key=lambda q: q.rate):
        other = theirs.get(p.rate)
        if p.sustainable and other is not None and not other.sustainable:
            return p.rate, other.mean_latency / p.mean_latency
    return None


def monotone_violations(curve: Curve, noise: float = NOISE) -> list[float]:
    """Rates of sustainable points more than ``noise`` faster than a lower sustainable rate."""
    points = sorted((p for p in curve.points if p.sustainable), key=lambda p: p.rate)
    out = []
    slowest = 0.0
    for p in points:
        if p.mean_latency * (1 + noise) < slowest:
            out.append(p.rate)
        slowest = max(slowest, p.mean_latency)
    return out


def compare(workflow: str, result: GpuResult, baseline: str) -> Comparison:
    scepsy, other = result.curve("scepsy"), result.curve(baseline)
    ours, theirs = peak(scepsy), peak(other)
    pair = common_point(scepsy, other)
    ratios = [x for _, x in shared_ratios(scepsy, other)]
    past = past_peak(scepsy, other)
    extra: dict[str, Any] = {
        "shared_rates": len(ratios),
        "median_mean_ratio": float(np.median(ratios)) if ratios else None,
        "min_mean_ratio": min(ratios) if ratios else None,
        "worse_rates": sum(1 for x in ratios if x < 1 / (1 + NOISE)),
        "past_peak_rate": past[0] if past else None,
        "past_peak_ratio": past[1] if past else None,
    }
    if pair is None:
        return Comparison(
            workflow, result.gpus, baseline, ours, theirs, _ratio(ours, theirs),
            None, None, None, None, None, None, None, **extra,
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
        **extra,
    )


def comparisons(result: BenchResult) -> list[Comparison]:
    return [
        compare(w.workflow, g, c.system)
        for w in result.workflows
        for g in w.gpus
        for c in g.curves
        if c.system != "scepsy"
    ]


# two-sided 95% Student t quantiles by degrees of freedom (1-10); 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def interval(values: Sequence[float]) -> tuple[float, float] | None:
    """(mean, half-width of its 95% confidence interval, Student t); half-width 0 for one
    value; None for none."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    mean = float(np.mean(xs))
    if len(xs) == 1:
        return mean, 0.0
    df = len(xs) - 1
    t = _T95[df - 1] if df <= len(_T95) else 1.96
    return mean, t * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


@dataclass(frozen=True, slots=True)
class SeedRow:
    """One comparison over several seeds: means and 95% intervals of its ratios."""

    workflow: str
    gpus: int
    baseline: str
    seeds: int
    peak_ratio: tuple[float, float] | None  # (mean, half-width)
    median_mean_ratio: tuple[float, float] | None
    min_mean_ratio: float | None  # the lowest over seeds
    worse_rates: int  # summed over seeds
    shared_rates: int  # summed over seeds


def seed_rows(results: Sequence[BenchResult]) -> list[SeedRow]:
    """The comparisons of runs that differ only in their seed, pooled (``interval``)."""
    groups: dict[tuple[str, int, str], list[Comparison]] = {}
    for result in results:
        for c in comparisons(result):
            groups.setdefault((c.workflow, c.gpus, c.baseline), []).append(c)
    rows = []
    for (workflow, gpus, baseline), cs in groups.items():
        mins = [c.min_mean_ratio for c in cs if c.min_mean_ratio is not None]
        rows.append(
            SeedRow(
                workflow,
                gpus,
                baseline,
                len(cs),
                interval([c.peak_ratio for c in cs if c.peak_ratio is not None]),
                interval([c.median_mean_ratio for c in cs if c.median_mean_ratio is not None]),
                min(mins) if mins else None,
                sum(c.worse_rates for c in cs),
                sum(c.shared_rates for c in cs),
            )
        )
    return rows


def format_seed_rows(rows: Sequence[SeedRow]) -> list[str]:
    def ci(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{value[0]:.2f}x +- {value[1]:.2f}"

    lines = [
        f"{'workflow':10} {'GPUs':>4} {'baseline':13} {'seeds':>5} {'peak ratio (95% CI)':>20} "
        f"{'median latency ratio':>21} {'lowest':>7} {'>3% worse / shared':>19}"
    ]
    for r in rows:
        lines.append(
            f"{r.workflow:10} {r.gpus:>4} {r.baseline:13} {r.seeds:>5} {ci(r.peak_ratio):>20} "
            f"{ci(r.median_mean_ratio):>21} {_x(r.min_mean_ratio):>7} "
            f"{r.worse_rates:>9} / {r.shared_rates:<7}"
        )
    return lines


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
        f"{'workflow':10} {'GPUs':>4} {'baseline':13} {'peak req/s':>17} {'peak':>7} "
        f"{'@ req/s':>8} {'mean s (S/B)':>15} {'mean':>7} {'p99 s (S/B)':>15} {'p99':>7} "
        f"{'shared: n med min >3%':>22} {'past-peak (not steady)':>23}"
    ]
    for r in rows:
        past = (
            "-" if r.past_peak_rate is None else f"{_x(r.past_peak_ratio)} @ {r.past_peak_rate:.3g}"
        )
        lines.append(
            f"{r.workflow:10} {r.gpus:>4} {r.baseline:13} "
            f"{r.scepsy_peak:>8.3g}/{r.baseline_peak:<8.3g} {_x(r.peak_ratio):>7} "
            f"{_s(r.rate):>8} {_s(r.scepsy_mean):>7}/{_s(r.baseline_mean):<7} "
            f"{_x(r.mean_ratio):>7} "
            f"{_s(r.scepsy_p99):>7}/{_s(r.baseline_p99):<7} {_x(r.p99_ratio):>7} "
            f"{r.shared_rates:>7} {_x(r.median_mean_ratio):>5} {_x(r.min_mean_ratio):>5} "
            f"{r.worse_rates:>3} {past:>23}"
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
    refined = [abs(c.error) for g in w.gpus for c in g.alp_refined]
    if refined:
        lines.append(
            f"   refined (simulated candidates) median |latency error| "
            f"{_pct(float(np.median(refined)))}, worst {_pct(max(refined))} "
            f"({len(refined)} points)"
        )
    for g in w.gpus:
        bad = monotone_violations(g.curve("scepsy"))
        if bad:
            lines.append(
                f"   {g.gpus:>2} GPUs: scepsy's curve not monotone (> {NOISE:.0%} faster than at a "
                "lower rate) at " + ", ".join(f"{r:.3g}" for r in bad) + " req/s"
            )
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
def clean(value: Any) -> Any:
    """JSON-ready: infinities and NaN become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
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
    report: dict[str, Any] = clean(
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
    "mean_latency", "p50_latency", "p99_latency", "predicted_latency", "refined_latency",
    "requests", "gpus_used",
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
                    rows.append({k: clean(row.get(k)) for k in CURVE_COLUMNS})
    return rows
