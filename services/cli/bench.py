"""``scepsy bench``: Scepsy against the baselines in the workflow simulator.

    scepsy bench [eval] [--workflows rag,beam,composite] [--gpus 4,8,16] [--gpu-type H100-SXM]
                 [--systems scepsy,static,independent,autoscaler] [--quick] [--no-oracle]
                 [--seed S] [--seeds N] [--json] [--out DIR]
    scepsy bench gpus [--workflows ...] [--gpus 8] [--load 0.5] [--slack 0.1] [--json]

The evaluation (``services.core.sim.evaluation``) is the default action of ``bench`` and also
its ``eval`` sub-command; other benchmarks add sub-commands through ``BENCH_MODULES`` (each such
module exposes ``register_bench(subparsers)``). It prints the results table (Scepsy's peak
sustainable throughput and latency at equal throughput against every baseline, as ratios), then
per workflow the ALP's errors, the oracle and the time-share stability; ``--json`` prints
everything as one object instead. Progress goes to stderr. ``--out DIR`` writes ``bench.json``,
``curves.csv`` (every curve point), ``report.txt`` and one ``<workflow>.png`` of
throughput-latency curves per workflow (matplotlib). ``--quick`` is a CI-sized run.
``--seeds N`` repeats the evaluation with seeds S..S+N-1 and adds a table of the ratios' means
and 95% confidence intervals over the seeds (``report.seed_rows``).

``bench gpus``: the GPUs Scepsy's fewest-GPUs objective needs at the latency of each baseline
(and of its own minimum-latency plan plus ``--slack``), simulated (``services.core.sim.gpus``).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from services.core.errors import InvalidInputError
from services.core.sim.evaluation import run_bench
from services.core.sim.gpus import BASELINES, fewest_gpus, format_rows
from services.core.sim.report import (
    CURVE_COLUMNS,
    clean,
    curve_rows,
    format_report,
    format_seed_rows,
    report_dict,
    seed_rows,
)
from services.core.sim.results import BenchResult, BenchSettings
from services.core.sim.systems import SYSTEMS, Context
from services.core.sim.workflows import WORKFLOWS, workflow

DEFAULT_WORKFLOWS = ("rag", "beam", "composite")
# Modules under services.cli that add ``bench`` sub-commands (``register_bench(subparsers)``).
BENCH_MODULES: tuple[str, ...] = ()


def register(sub: Any) -> None:
    parser = sub.add_parser("bench", help="Scepsy against the baselines, simulated")
    add_eval_args(parser)
    parser.set_defaults(func=cmd_eval)
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    evaluation = bench_sub.add_parser("eval", help="the head-to-head evaluation (the default)")
    add_eval_args(evaluation)
    evaluation.set_defaults(func=cmd_eval)
    gpus = bench_sub.add_parser("gpus", help="GPUs needed at each baseline's latency")
    gpus.add_argument("--workflows", default=",".join(DEFAULT_WORKFLOWS))
    gpus.add_argument("--gpus", default="8", help="comma-separated cluster sizes")
    gpus.add_argument("--gpu-type", default="H100-SXM")
    gpus.add_argument("--load", type=float, default=0.5, help="x the ALP's highest throughput")
    gpus.add_argument("--slack", type=float, default=0.1, help="over Scepsy's min latency")
    gpus.add_argument(
        "--baselines", default=",".join(BASELINES), help="comma-separated systems to match"
    )
    add_warmup_arg(gpus)
    gpus.add_argument("--json", action="store_true")
    gpus.set_defaults(func=cmd_gpus)
    for name in BENCH_MODULES:
        importlib.import_module(f"services.cli.{name}").register_bench(bench_sub)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workflows",
        default=",".join(DEFAULT_WORKFLOWS),
        help=f"comma-separated, from {', '.join(sorted(WORKFLOWS))}",
    )
    parser.add_argument("--gpus", default="4,8,16", help="comma-separated GPU counts")
    parser.add_argument("--gpu-type", default="H100-SXM", help="GPU type of the clusters")
    parser.add_argument(
        "--systems",
        default=",".join(BenchSettings().systems),
        help=f"comma-separated, scepsy and any of {', '.join(s for s in SYSTEMS if s != 'scepsy')}",
    )
    parser.add_argument("--quick", action="store_true", help="a CI-sized run (well under 60 s)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle")
    parser.add_argument(
        "--prepare-gpus",
        type=int,
        help="GPUs of the warm-up's cluster (default: the smallest of --gpus); give the same "
        "to blocks of one workflow split by GPU count",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds")
    add_warmup_arg(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write JSON, CSV, text and PNG plots here")


def add_warmup_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--warmup",
        metavar="N|auto[:E]",
        help="requests of the traced warm-up: N, or auto (as many as the mean LLM time per "
        "request needs for a relative standard error E, default 0.01; the default)",
    )


def _list(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InvalidInputError(f"{flag}: give at least one value")
    return items


def settings_from(args: argparse.Namespace) -> BenchSettings:
    try:
        gpus = tuple(int(g) for g in _list(args.gpus, "--gpus"))
    except ValueError:
        raise InvalidInputError(f"--gpus: comma-separated integers, got {args.gpus!r}") from None
    changes: dict[str, Any] = {
        "gpu_counts": gpus,
        "gpu_type": args.gpu_type,
        "systems": tuple(_list(args.systems, "--systems")),
        "seed": args.seed,
        "prepare_gpus": args.prepare_gpus,
    }
    if args.no_oracle:
        changes["oracle_gpus"] = 0
    if args.warmup is not None:
        changes.update(warmup_changes(args.warmup))
    if args.quick:
        return BenchSettings.quick(**changes)
    return replace(BenchSettings(), **changes)


def warmup_changes(text: str) -> dict[str, Any]:
    """BenchSettings changes for ``--warmup N|auto[:E]``."""
    head, _, error = text.partition(":")
    try:
        if head == "auto":
            value = float(error) if error else BenchSettings().warmup_error or 0.01
            if not 0 < value < 1:
                raise ValueError
            return {"warmup_error": value}
        if not error and int(head) >= 2:
            return {"warmup_requests": int(head), "warmup_error": None}
    except ValueError:
        pass
    raise InvalidInputError(
        f"--warmup: a request count >= 2, auto or auto:E with 0 < E < 1, got {text!r}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    flows = [workflow(name) for name in _list(args.workflows, "--workflows")]
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    if args.seeds < 1:
        raise InvalidInputError(f"--seeds: must be >= 1, got {args.seeds}")
    result = run_bench(flows, settings, progress)
    others = [
        run_bench(flows, replace(settings, seed=settings.seed + i), progress)
        for i in range(1, args.seeds)
    ]
    wall = time.perf_counter() - started
    calls = result.calls + sum(r.calls for r in others)
    text = format_report(result)
    if others:
        text += f"\n\nover {args.seeds} seeds (means, 95% confidence intervals):\n" + "\n".join(
            format_seed_rows(seed_rows([result, *others]))
        )
    text += (
        f"\n\n{calls} LLM calls simulated in {wall:.1f} s "
        f"({calls / wall:,.0f} calls/s of wall time)"
    )
    if args.out is not None:
        write_outputs(result, text, args.out)
    if args.json:
        doc = report_dict(result)
        doc["wall_seconds"] = wall
        if others:
            doc["seeds"] = [clean(asdict(r)) for r in seed_rows([result, *others])]
        print(json.dumps(doc))
    else:
        print(text)
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    try:
        counts = [int(g) for g in _list(args.gpus, "--gpus")]
    except ValueError:
        raise InvalidInputError(f"--gpus: comma-separated integers, got {args.gpus!r}") from None
    baselines = _list(args.baselines, "--baselines")
    unknown = sorted(set(baselines) - set(SYSTEMS))
    if unknown:
        raise InvalidInputError(f"--baselines: unknown {unknown} (choose from {sorted(SYSTEMS)})")
    if not 0 < args.load <= 1:
        raise InvalidInputError(f"--load: must be in (0, 1], got {args.load}")
    started = time.perf_counter()

    def progress(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    warm = BenchSettings()
    if args.warmup:
        warm = replace(warm, **warmup_changes(args.warmup))
    rows = []
    for name in _list(args.workflows, "--workflows"):
        ctx = Context.prepare(
            workflow(name),
            args.gpu_type,
            min(counts),
            **warm.warmup(),
        )
        for g in counts:
            rows += fewest_gpus(ctx, g, args.load, args.slack, baselines, say=progress)
    if args.json:
        print(json.dumps({"rows": [clean({**asdict(r), "saved": r.saved}) for r in rows]}))
    else:
        print("\n".join(format_rows(rows)))
        print(f"\n{time.perf_counter() - started:.1f} s")
    return 0


def write_outputs(result: BenchResult, text: str, out: Path) -> None:
    """bench.json, curves.csv, report.txt and a PNG per workflow in ``out``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(report_dict(result), indent=1) + "\n")
        (out / "report.txt").write_text(text + "\n")
        with open(out / "curves.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(CURVE_COLUMNS))
            writer.writeheader()
            writer.writerows(curve_rows(result))
    except OSError as exc:
        raise InvalidInputError(f"--out: cannot write to {str(out)!r}: {exc.strerror}") from None
    plot_curves(curve_rows(result), out)


COLORS = {
    "scepsy": "tab:red",
    "static": "tab:blue",
    "independent": "tab:green",
    "autoscaler": "tab:orange",
    "shares": "tab:brown",
    "shares-frac": "tab:pink",
    "scepsy-whole": "tab:gray",
    "scepsy-blind": "tab:olive",
    "scepsy-closed": "tab:cyan",
}


def plot_curves(rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per workflow: mean (solid) and p99 (dotted) latency against offered rate, one
    panel per GPU count; hollow markers are unsustainable points. matplotlib is imported
    here only, so the rest of the command works without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for name in dict.fromkeys(r["workflow"] for r in rows):
        mine = [r for r in rows if r["workflow"] == name]
        counts = sorted({r["gpus"] for r in mine})
        fig, axes = plt.subplots(1, len(counts), figsize=(4.2 * len(counts), 3.6), squeeze=False)
        for ax, gpus in zip(axes[0], counts, strict=True):
            _panel(ax, [r for r in mine if r["gpus"] == gpus])
            ax.set_title(f"{name}, {gpus} GPUs")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    for system in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        color = COLORS.get(system, "tab:purple")
        rates = [r["rate"] for r in pts]
        ax.plot(rates, [r["mean_latency"] for r in pts], "-", color=color, label=system)
        ax.plot(rates, [r["p99_latency"] for r in pts], ":", color=color, linewidth=1)
        for r in pts:
            face = color if r["sustainable"] else "none"
            ax.plot(r["rate"], r["mean_latency"], "o", color=color, markerfacecolor=face, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency (s): mean, p99 dotted")
    ax.grid(alpha=0.3)
