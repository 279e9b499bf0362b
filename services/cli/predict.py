"""``scepsy predict --spec SPEC --allocations FILE [--json]``: the ALP's view of given allocations.

The allocations file is JSON lines, one allocation per line, mapping each deployment model name
to its configuration::

    {"llama-8b": {"fraction": 1, "tp": 2, "replicas": 1},
     "prm": {"fraction": 0.5, "tp": 1, "replicas": 2}}

(one line in the file; ``fraction`` defaults to 1, ``tp`` and ``replicas`` to 1).

For each line it prints the predicted latency and throughput of every workflow at its target
rate, each LLM's load and utilisation, and whether the allocation is feasible (memory, capacity,
utilisation cap rho, the cluster's GPU count) with the reasons when not. Profiles come from the
analytic backend, once per distinct (model, TP, fraction), cached for the run. ``--json`` prints
one object ``{"predictions": [...]}``; unbounded numbers are null.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from services.core.allocation import Allocation, check_fraction_unit
from services.core.errors import InvalidInputError
from services.core.planning.alp import Prediction, predict
from services.core.planning.profiles import SpecProfiles
from services.core.workload.spec import Spec, load_spec

_ALLOCATION_FIELDS = {"fraction", "tp", "replicas"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("predict", help="predict workflow latency and throughput (ALP)")
    parser.add_argument("--spec", required=True, help="deployment spec (YAML or JSON)")
    parser.add_argument(
        "--allocations", required=True, metavar="FILE", help="JSON lines, one allocation each"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    allocations = read_allocations(args.allocations, spec)
    source = SpecProfiles(spec)
    demands = [w.demand for w in spec.workflows]
    predictions: list[Prediction] = []
    for number, allocation in allocations:
        try:
            predictions.append(
                predict(
                    demands,
                    source.profile,
                    allocation,
                    spec.target_rates,
                    rho=spec.rho,
                    gpus_available=spec.gpu_count,
                )
            )
        except InvalidInputError as exc:
            raise InvalidInputError(f"{args.allocations} line {number}: {exc}") from None
    if args.json:
        doc = {
            "predictions": [
                prediction_dict(p, a) for p, (_, a) in zip(predictions, allocations, strict=True)
            ]
        }
        print(json.dumps(doc))
    else:
        print(format_predictions(predictions, [a for _, a in allocations], spec))
    return 0


def read_allocations(path: str, spec: Spec) -> list[tuple[int, dict[str, Allocation]]]:
    """Parse the allocations file: (line number, allocation) per non-blank line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as exc:
        raise InvalidInputError(f"allocations {path!r}: cannot read: {exc.strerror}") from None
    result: list[tuple[int, dict[str, Allocation]]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: not valid JSON: {exc.msg}") from None
        if not isinstance(doc, dict) or not doc:
            raise InvalidInputError(f"{where}: must be a non-empty JSON object of models")
        result.append((number, {m: _allocation(m, entry, where, spec) for m, entry in doc.items()}))
    if not result:
        raise InvalidInputError(f"allocations {path!r}: no allocation in the file")
    return result


def _allocation(model: str, entry: Any, where: str, spec: Spec) -> Allocation:
    if model not in spec.models:
        raise InvalidInputError(
            f"{where}: {model}: not a model of the spec (models: {sorted(spec.models)})"
        )
    if not isinstance(entry, dict):
        raise InvalidInputError(f"{where}: {model}: must be an object, got {entry!r}")
    unknown = sorted(set(entry) - _ALLOCATION_FIELDS)
    if unknown:
        raise InvalidInputError(f"{where}: {model}.{unknown[0]}: unknown field")
    try:
        fraction = entry.get("fraction", 1.0)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise InvalidInputError(f"fraction: must be a number, got {fraction!r}")
        allocation = Allocation(float(fraction), entry.get("tp", 1), entry.get("replicas", 1))
        check_fraction_unit(model, allocation, spec.fraction_unit)
    except InvalidInputError as exc:
        message = str(exc)
        prefix = "" if message.startswith(f"{model}.") else f"{model}."
        raise InvalidInputError(f"{where}: {prefix}{message}") from None
    return allocation


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def prediction_dict(prediction: Prediction, allocation: Mapping[str, Allocation]) -> dict[str, Any]:
    """JSON-ready form; infinities become null."""
    return {
        "feasible": prediction.feasible,
        "reason": prediction.reason,
        "gpus": prediction.gpus,
        "allocation": {m: asdict(a) for m, a in sorted(allocation.items())},
        "workflows": [
            {
                "workflow": w.workflow,
                "rate": w.rate,
                "latency": _finite(w.latency),
                "throughput": _finite(w.throughput),
            }
            for w in prediction.workflows
        ],
        "llms": [
            {
                "model": m.model,
                "load": m.load,
                "replica_rate": m.replica_rate,
                "capacity": m.capacity,
                "utilization": _finite(m.utilization),
                "call_latency": _finite(m.call_latency),
                "gpus": m.gpus,
            }
            for m in prediction.llms
        ],
    }


def format_predictions(
    predictions: list[Prediction], allocations: list[dict[str, Allocation]], spec: Spec
) -> str:
    lines: list[str] = []
    for i, (p, alloc) in enumerate(zip(predictions, allocations, strict=True), start=1):
        if lines:
            lines.append("")
        verdict = "feasible" if p.feasible else f"infeasible: {p.reason}"
        lines.append(f"allocation {i}: {p.gpus:g} of {spec.gpu_count} GPUs, {verdict}")
        for m in p.llms:
            a = alloc[m.model]
            lines.append(
                f"  {m.model:<20} tp {a.tp} x {a.fraction:g} GPU x {a.replicas} replica(s)  "
                f"load {m.load:8.3f} calls/s  util {m.utilization:6.2f}  "
                f"latency {m.call_latency:8.3f} s/call"
            )
        for w in p.workflows:
            lines.append(
                f"  workflow {w.workflow:<11} latency {w.latency:8.3f} s  "
                f"throughput {w.throughput:8.3f} req/s  (target {w.rate:g})"
            )
    return "\n".join(lines)
