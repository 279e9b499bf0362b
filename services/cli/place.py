"""``scepsy place``: place an allocation on a cluster and print the engines' GPUs and shares.

    scepsy place --allocation FILE [--cluster FILE | --redis-url URL] [--current FILE] [--json]

The cluster is a declared cluster YAML (``--cluster``), else the live nodes of the cluster that
``scepsy up`` started (or ``--redis-url`` / ``REDIS_URL``). ``--current`` is the ``--json``
output of an earlier ``scepsy place``: its placement is kept where still valid and the output
counts the engines started, stopped and moved.

Allocation file (YAML or JSON, version 1)::

    version: 1
    fraction_unit: 4           # k: fractions are multiples of 1/k of one GPU (default 4)
    models:
      llama-70b: {tp: 4, replicas: 2}         # fraction defaults to 1 (whole GPUs)
      llama-8b: {fraction: 0.5, replicas: 3}  # a fraction below 1 needs tp 1 (the default)
      reranker: {fraction: 0.25}              # replicas defaults to 1

The same per-model fields (fraction, tp, replicas) as the allocations of ``scepsy predict``.
Errors name the file and the field, e.g. ``alloc.yaml: models.llama-8b.fraction: must be a
multiple of 1/4, got 0.3``.

``--json`` prints ``{"fraction_unit", "memory_margin", "placement": {"assignments": [{"model",
"replica", "node", "gpus", "units", "fraction", "mps_percentage", "memory_fraction"}],
"fragmentation": {...}}, "changes": {"kept", "started", "stopped", "moved"}, "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from services.cli.store_args import add_store_flags, with_store
from services.core.allocation import Allocation
from services.core.cluster.declared import load_cluster
from services.core.errors import InvalidInputError
from services.core.placement.heuristic import (
    DEFAULT_MEMORY_MARGIN,
    Assignment,
    Fragmentation,
    Replacement,
    instances_of,
    place_allocation,
)
from services.runtime.store import Store

FORMAT_VERSION = 1
DEFAULT_FRACTION_UNIT = 4
_MODEL_FIELDS = {"fraction", "tp", "replicas"}
_ASSIGNMENT_FIELDS = ("model", "replica", "node", "gpus", "units")


def register(sub: Any) -> None:
    place = sub.add_parser("place", help="place an allocation on the cluster's GPUs")
    place.add_argument("--allocation", required=True, help="allocation file (YAML or JSON)")
    place.add_argument("--cluster", help="declared cluster YAML (default: the live cluster)")
    add_store_flags(place)
    place.add_argument("--current", help="`scepsy place --json` output of the running placement")
    place.add_argument(
        "--memory-margin",
        type=float,
        default=DEFAULT_MEMORY_MARGIN,
        help="share of GPU memory left to CUDA contexts and the driver (default 0.05)",
    )
    place.add_argument("--json", action="store_true", help="print JSON instead of a table")
    place.set_defaults(func=cmd_place)


def cmd_place(args: argparse.Namespace) -> int:
    allocation, k = read_allocation(args.allocation)
    current: tuple[Assignment, ...] = ()
    if args.current:
        current, current_k = read_current(args.current)
        if current_k != k:
            raise InvalidInputError(
                f"{args.current}: fraction_unit {current_k} differs from the allocation's {k}"
            )
    nodes = load_cluster(args.cluster) if args.cluster else with_store(args, Store.list_nodes)
    started = time.perf_counter()
    result = place_allocation(
        allocation, k, nodes, current=current, memory_margin=args.memory_margin
    )
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps(result_json(result, seconds)))
    else:
        print(format_result(result, seconds, with_changes=bool(args.current)))
    return 0


# ---------------------------------------------------------------------------------- files
def read_allocation(path: str) -> tuple[dict[str, Allocation], int]:
    """Read and validate an allocation file: (allocation by model, k)."""
    return parse_allocation(_load(path, "allocation"), Path(path).name)


def parse_allocation(doc: Any, source: str = "allocation") -> tuple[dict[str, Allocation], int]:
    """Validate a parsed allocation document (module docstring)."""
    if not isinstance(doc, Mapping):
        raise InvalidInputError(f"{source}: top level: must be a mapping")
    unknown = sorted(set(doc) - {"version", "fraction_unit", "models"})
    if unknown:
        raise InvalidInputError(f"{source}: {unknown[0]}: unknown field")
    if doc.get("version") != FORMAT_VERSION:
        raise InvalidInputError(
            f"{source}: version: must be {FORMAT_VERSION}, got {doc.get('version')!r}"
        )
    k = doc.get("fraction_unit", DEFAULT_FRACTION_UNIT)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"{source}: fraction_unit: must be a positive integer, got {k!r}")
    models = doc.get("models")
    if not isinstance(models, Mapping) or not models:
        raise InvalidInputError(f"{source}: models: must be a non-empty mapping, got {models!r}")
    allocation = {str(m): _model(entry, f"{source}: models.{m}") for m, entry in models.items()}
    try:
        instances_of(allocation, k)  # checks every fraction against 1/k
    except InvalidInputError as exc:
        raise InvalidInputError(f"{source}: models.{exc}") from None
    return allocation, k


def _model(entry: Any, where: str) -> Allocation:
    if not isinstance(entry, Mapping):
        raise InvalidInputError(f"{where}: must be a mapping, got {entry!r}")
    unknown = sorted(set(entry) - _MODEL_FIELDS)
    if unknown:
        raise InvalidInputError(f"{where}.{unknown[0]}: unknown field")
    fraction = entry.get("fraction", 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise InvalidInputError(f"{where}.fraction: must be a number, got {fraction!r}")
    try:
        return Allocation(float(fraction), entry.get("tp", 1), entry.get("replicas", 1))
    except InvalidInputError as exc:
        raise InvalidInputError(f"{where}.{exc}") from None


def read_current(path: str) -> tuple[tuple[Assignment, ...], int]:
    """The running placement and its k, from a ``scepsy place --json`` document."""
    doc = _load(path, "current placement")
    name = Path(path).name
    placement = doc.get("placement", doc) if isinstance(doc, Mapping) else None
    rows = placement.get("assignments") if isinstance(placement, Mapping) else None
    if not isinstance(rows, list):
        raise InvalidInputError(f"{name}: placement.assignments: must be a list")
    k = doc.get("fraction_unit", DEFAULT_FRACTION_UNIT)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"{name}: fraction_unit: must be a positive integer, got {k!r}")
    margin = float(doc.get("memory_margin", DEFAULT_MEMORY_MARGIN))
    where = f"{name}: placement.assignments"
    return tuple(_assignment(row, f"{where}[{i}]", k, margin) for i, row in enumerate(rows)), k


def _assignment(row: Any, where: str, k: int, margin: float) -> Assignment:
    if not isinstance(row, Mapping) or any(f not in row for f in _ASSIGNMENT_FIELDS):
        raise InvalidInputError(f"{where}: must have the fields {', '.join(_ASSIGNMENT_FIELDS)}")
    try:
        gpus = tuple(int(g) for g in row["gpus"])
        units = int(row["units"])
        mps = int(row.get("mps_percentage", 100 if units >= k else 100 * units // k))
        memory = float(row.get("memory_fraction", units / k * (1 - margin)))
        return Assignment(
            str(row["model"]), int(row["replica"]), str(row["node"]), gpus, units, mps, memory
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: {exc}") from None


def _load(path: str, what: str) -> Any:
    import yaml  # YAML is a superset of JSON: one loader reads both

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read {what} file: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"{path}: not valid YAML or JSON: {exc}") from None
    except RecursionError:
        raise InvalidInputError(f"{path}: nested too deeply") from None


# ---------------------------------------------------------------------------------- output
def result_json(result: Replacement, seconds: float) -> dict[str, Any]:
    p = result.placement
    return {
        "fraction_unit": p.k,
        "memory_margin": p.memory_margin,
        "placement": {
            "assignments": [
                asdict(a) | {"gpus": list(a.gpus), "fraction": a.units / p.k} for a in p.assignments
            ],
            "fragmentation": asdict(p.fragmentation),
        },
        "changes": {
            "kept": len(result.kept),
            "started": len(result.started),
            "stopped": len(result.stopped),
            "moved": len(result.moved),
        },
        "seconds": seconds,
    }


def format_result(result: Replacement, seconds: float, *, with_changes: bool) -> str:
    p = result.placement
    header = ("model", "replica", "node", "gpus", "share", "mps %", "mem cap")
    rows = [
        (
            a.model,
            str(a.replica),
            a.node,
            ",".join(map(str, a.gpus)),
            f"{a.units}/{p.k}" if a.units < p.k else "1",
            str(a.mps_percentage),
            f"{a.memory_fraction:.4g}",
        )
        for a in p.assignments
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    lines.append(fragmentation_line(p.fragmentation))
    if with_changes:
        lines.append(
            f"changes: {len(result.kept)} kept, {len(result.started)} started, "
            f"{len(result.stopped)} stopped, {len(result.moved)} moved"
        )
    lines.append(f"placed {len(p.assignments)} engines in {seconds * 1000:.1f} ms")
    return "\n".join(lines)


def fragmentation_line(f: Fragmentation) -> str:
    return (
        f"fragmentation: {f.partly_used_gpus} partly used GPUs, {f.stranded_fraction:g} GPUs "
        f"stranded, largest free TP group {f.largest_free_tp} ({f.free_gpus} wholly free GPUs, "
        f"{f.broken_domains} broken NVLink domains)"
    )
