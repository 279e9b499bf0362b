"""Merge `scepsy bench` blocks run separately into one report (docs/bench).

The bench's blocks (a workflow or a few, each on its own GPU counts) run as separate processes,
two at a time on the 2-core host; each writes ``report.txt``, ``bench.json``, ``curves.csv`` and
one PNG per workflow to its ``--out`` directory. This script writes to ``--out``:

- ``report.txt``: ``--header`` (one line), the blocks' commands, then each block's report;
- ``bench.json``: the first block's settings, the summed ``calls_simulated``, the comparisons
  and workflows of every block in order, and ``runs`` (each block's workflows and GPU counts);
- ``curves.csv``: every block's rows under one header;
- the PNGs, copied; a workflow whose GPU counts ran in several blocks (``--gpus 4`` and
  ``--gpus 8`` as two processes, one per core) plotted again from the merged rows.

    .venv/bin/python scripts/merge_bench.py --out docs/bench --header "..." \\
        --block DIR "COMMAND" --block DIR "COMMAND" ...
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def merge(blocks: Sequence[tuple[Path, str]], out: Path, header: str) -> None:
    """Write the merged report of ``blocks`` (directory, command) to ``out`` (module docstring).
    Raises ``ValueError`` naming a block directory that lacks a file or whose CSV header
    differs from the first block's."""
    for directory, _ in blocks:
        for name in ("report.txt", "bench.json", "curves.csv"):
            if not (directory / name).is_file():
                raise ValueError(f"--block {directory}: no {name}")
    out.mkdir(parents=True, exist_ok=True)
    lines = [header, "Commands:"] + [f"  {command}" for _, command in blocks]
    reports = [(directory / "report.txt").read_text().rstrip("\n") for directory, _ in blocks]
    (out / "report.txt").write_text("\n".join(lines) + "\n\n" + "\n\n".join(reports) + "\n")

    merged: dict[str, Any] = {}
    for directory, _ in blocks:
        data = json.loads((directory / "bench.json").read_text())
        if not merged:
            merged = {
                "settings": data["settings"],
                "calls_simulated": 0,
                "comparisons": [],
                "workflows": [],
                "runs": [],
            }
        merged["calls_simulated"] += data["calls_simulated"]
        merged["comparisons"] += data["comparisons"]
        merged["workflows"] += data["workflows"]
        merged["runs"].append(
            {
                "workflows": [w["workflow"] for w in data["workflows"]],
                "gpu_counts": sorted({c["gpus"] for c in data["comparisons"]}),
            }
        )
    (out / "bench.json").write_text(json.dumps(merged, indent=1) + "\n")

    first: str | None = None
    rows: list[str] = []
    for directory, _ in blocks:
        head, *body = (directory / "curves.csv").read_text().splitlines()
        if first is None:
            first = head
        elif head != first:
            raise ValueError(f"--block {directory}: curves.csv header differs from the first")
        rows += body
    (out / "curves.csv").write_text("\n".join([first or "", *rows]) + "\n")

    for directory, _ in blocks:
        for png in sorted(directory.glob("*.png")):
            shutil.copyfile(png, out / png.name)
    split = [
        w for w, n in Counter(w for b in merged["runs"] for w in b["workflows"]).items() if n > 1
    ]
    if split:
        replot(out / "curves.csv", split, out)


def replot(curves: Path, workflows: Sequence[str], out: Path) -> list[Path]:
    """``workflows``' PNGs drawn from the rows of ``curves`` (``bench.plot_curves``)."""
    from services.cli.bench import plot_curves

    with open(curves, newline="", encoding="utf-8") as handle:
        rows = [
            {
                **r,
                "gpus": int(r["gpus"]),
                "rate": float(r["rate"]),
                "mean_latency": float(r["mean_latency"]),
                "p99_latency": float(r["p99_latency"]),
                "sustainable": r["sustainable"] == "True",
            }
            for r in csv.DictReader(handle)
            if r["workflow"] in workflows
        ]
    return plot_curves(rows, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--header", required=True, help="the report's first line")
    parser.add_argument(
        "--block", nargs=2, action="append", required=True, metavar=("DIR", "COMMAND")
    )
    args = parser.parse_args(argv)
    try:
        merge([(Path(d), c) for d, c in args.block], args.out, args.header)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
