"""``scepsy trace stats FILE [--json]``: workflow statistics of a trace file.
``scepsy trace export --out FILE``: the router's recorded trace (the Redis stream) as JSONL.

The table shows, per workflow, the request count, end-to-end latency (mean, CV), tool time and
stages, then per LLM: calls per request n, concurrency p, time share (mean, CV), mean token
lengths, mean call latency and failed calls. ``--json`` prints one object
``{"workflows": [WorkflowStats...]}`` including the token samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.cli.store_args import add_store_flags, with_store
from services.core.errors import InvalidInputError
from services.core.workload.stats import (
    DEFAULT_OVERLAP_THRESHOLD,
    DEFAULT_SAMPLE_SIZE,
    WorkflowStats,
    workflow_stats,
)
from services.core.workload.trace import parse_trace_lines, read_trace
from services.runtime.store import Store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("trace", help="inspect workflow traces")
    trace_sub = parser.add_subparsers(dest="trace_command", metavar="TRACE_COMMAND", required=True)
    stats = trace_sub.add_parser("stats", help="per-workflow, per-LLM statistics of a trace")
    stats.add_argument("file", metavar="FILE", help="trace JSONL file")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument(
        "--overlap-threshold",
        type=float,
        default=DEFAULT_OVERLAP_THRESHOLD,
        help="share of co-occurring requests in which two LLMs must overlap to share a stage",
    )
    stats.add_argument(
        "--sample-size",
        type=int,
        default=DEFAULT_SAMPLE_SIZE,
        help="maximum (prompt, completion) pairs kept per LLM",
    )
    stats.set_defaults(func=run_stats)

    export = trace_sub.add_parser("export", help="write the router's recorded trace as JSONL")
    export.add_argument("--out", required=True, metavar="FILE", help="trace JSONL file to write")
    add_store_flags(export)
    export.add_argument("--json", action="store_true", help="print a JSON summary")
    export.set_defaults(func=run_export)


def run_stats(args: argparse.Namespace) -> int:
    trace = read_trace(args.file)
    result = workflow_stats(
        trace, overlap_threshold=args.overlap_threshold, sample_size=args.sample_size
    )
    if args.json:
        doc: dict[str, Any] = {"workflows": [w.to_dict() for w in result]}
        print(json.dumps(doc))
    else:
        print(format_table(result))
    return 0


async def read_recorded(store: Store, page: int = 1000) -> list[str]:
    """Every call in the store's trace stream, oldest first, one JSON line each.

    Each entry is validated (one that is not a valid trace line raises ``InvalidInputError``
    naming its stream entry id). The router writes at least once, so a call recorded twice
    (a write retried after a timeout) is kept once."""
    lines: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    after = ""
    while True:
        entries = await store.read_trace(after, page)
        for entry_id, line in entries:
            parsed = parse_trace_lines([line], source=f"trace stream entry {entry_id}")
            key = next(((c.workflow, c.request_id, c.call_id) for c in parsed.calls), None)
            if key is None or key not in seen:
                lines.append(line)
            if key is not None:
                seen.add(key)
        if len(entries) < page:
            return lines
        after = entries[-1][0]


def run_export(args: argparse.Namespace) -> int:
    lines = with_store(args, read_recorded)
    out = Path(args.out)
    try:
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"--out {str(out)!r}: cannot write: {exc.strerror}") from None
    if args.json:
        print(json.dumps({"out": str(out), "calls": len(lines)}))
    else:
        print(f"exported {len(lines)} calls to {out}")
    return 0


def format_table(workflows: tuple[WorkflowStats, ...]) -> str:
    """Human-readable report: a header per workflow and one row per LLM."""
    if not workflows:
        return "no calls in trace"
    lines: list[str] = []
    header = (
        f"{'model':<24} {'calls':>7} {'n':>7} {'p':>6} {'share':>6} {'shareCV':>7} "
        f"{'prompt':>8} {'compl':>7} {'latency':>8} {'failed':>6}"
    )
    for w in workflows:
        if lines:
            lines.append("")
        lines.append(
            f"workflow {w.workflow}: {w.requests} requests ({w.failed_requests} failed), "
            f"e2e mean {w.e2e_mean:.3f} s CV {w.e2e_cv:.2f}, "
            f"tool time {w.tool_time_mean:.3f} s/request ({100 * w.tool_share:.1f}%)"
        )
        lines.append("stages: " + " -> ".join("[" + ", ".join(s) + "]" for s in w.stages))
        lines.append(header)
        for m in w.llms:
            lines.append(
                f"{m.model:<24} {m.calls:>7} {m.n:>7.2f} {m.p:>6.2f} {m.share_mean:>6.2f} "
                f"{m.share_cv:>7.2f} {m.prompt.mean:>8.1f} {m.completion.mean:>7.1f} "
                f"{m.latency_mean:>8.3f} {m.errors + m.cancelled:>6}"
            )
    return "\n".join(lines)
