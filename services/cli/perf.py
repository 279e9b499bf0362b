"""``scepsy perf``: the analytic performance model.

    scepsy perf batch --model M --gpu G --tp T --batch B --input-len I --output-len O [--json]
    scepsy perf calibrate --measurements FILE [FILE ...] [--params P,...] [--iterations N] [--write]
        [--json]

``calibrate`` fits a device's efficiency parameters to profiles measured on it (the documents
``scepsy profile --backend vllm --out FILE`` writes; ``services.core.perf.calibrate``): rates
alternate between a fit set and a held-out set, and it prints the latency error on the held-out
rates before (the committed parameters) and after the fit. ``--write`` stores the fitted
parameters as the device's entry of ``services/core/perf/params.json``.

``batch``:
``batch`` identical requests of I prompt and O output tokens are submitted at once; latency is
the time until the last token, throughput batch x (I + O) / latency (llm-inference-bench's
definitions). ``--model`` is a catalogue name or the path of a Hugging Face config.json.
``--scheduler v0`` reproduces the 2024 vLLM engine the reference data were measured on.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import ModelSpec, resolve_model
from services.core.errors import InvalidInputError
from services.core.perf.batching import SchedulerConfig, static_batch
from services.core.perf.calibrate import (
    CALIBRATED,
    Calibration,
    MeasuredProfile,
    run_calibration,
)
from services.core.perf.fit import BOUNDS
from services.core.perf.model import PARAMS_FILE, PerfModel, load_params


def register(sub: Any) -> None:
    parser = sub.add_parser("perf", help="analytic performance model")
    perf_sub = parser.add_subparsers(dest="perf_command", metavar="PERF_COMMAND", required=True)
    batch = perf_sub.add_parser("batch", help="latency and throughput of one static batch")
    add_engine_args(batch)
    batch.add_argument("--batch", type=int, required=True, help="requests submitted together")
    batch.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    batch.add_argument("--output-len", type=int, required=True, help="output tokens per request")
    batch.add_argument("--json", action="store_true", help="print one JSON object")
    batch.set_defaults(func=cmd_batch)

    cal = perf_sub.add_parser(
        "calibrate", help="fit a device's parameters to measured profiles (held-out error)"
    )
    cal.add_argument(
        "--measurements",
        type=Path,
        nargs="+",
        required=True,
        help="measurement JSON files (scepsy profile --backend vllm --out FILE)",
    )
    cal.add_argument("--iterations", type=int, default=150, help="Nelder-Mead steps per round")
    cal.add_argument(
        "--params",
        default=",".join(CALIBRATED),
        help="comma-separated parameters to fit (the others keep the committed values; a tiny "
        "model's profiles do not constrain compute_eff and bandwidth_eff: its weights and "
        "FLOPs cost microseconds per step)",
    )
    cal.add_argument("--write", action="store_true", help="write the fit into params.json")
    cal.add_argument("--json", action="store_true", help="print one JSON object")
    cal.set_defaults(func=cmd_calibrate)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags naming one engine instance and its scheduler (shared with ``scepsy profile``)."""
    parser.add_argument("--model", required=True, help="catalogue name or config.json path")
    parser.add_argument("--gpu", required=True, help="GPU type (catalogue name or alias)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (1, 2, 4, 8)")
    parser.add_argument("--fraction", type=float, default=1.0, help="GPU share (tp 1 only)")
    parser.add_argument(
        "--scheduler",
        choices=("v1", "v0"),
        default="v1",
        help="v1: chunked prefill (current vLLM); v0: whole-prompt prefills first (vLLM V0)",
    )
    parser.add_argument(
        "--max-batched-tokens",
        type=int,
        help="token budget per iteration (default 8192 for v1, max(context, 2048) for v0)",
    )
    parser.add_argument("--max-num-seqs", type=int, default=256, help="running sequences cap")


def scheduler_config(args: argparse.Namespace, model: ModelSpec) -> SchedulerConfig:
    v0 = args.scheduler == "v0"
    budget = args.max_batched_tokens or (max(model.max_position, 2048) if v0 else 8192)
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_batched_tokens=budget, chunked_prefill=not v0
    )


def cmd_batch(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)
    gpu = gpu_spec(args.gpu)
    perf = PerfModel.create(model, gpu, args.tp, args.fraction)
    config = scheduler_config(args, model)
    latency, throughput = static_batch(perf, args.batch, args.input_len, args.output_len, config)
    result = {
        "model": model.name,
        "gpu": gpu.name,
        "tp": args.tp,
        "fraction": args.fraction,
        "batch": args.batch,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "scheduler": args.scheduler,
        "latency_s": latency,
        "throughput_tok_s": throughput,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{model.name} on {gpu.name} tp {args.tp} fraction {args.fraction:g}, "
            f"batch {args.batch} x ({args.input_len} in + {args.output_len} out), "
            f"scheduler {args.scheduler}"
        )
        print(f"latency_s        {latency:.4f}")
        print(f"throughput_tok_s {throughput:.1f}")
    return 0


def read_measurements(paths: list[Path]) -> list[MeasuredProfile]:
    """Every measurement document in ``paths`` (a JSON object or a list of them each)."""
    profiles: list[MeasuredProfile] = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise InvalidInputError(f"--measurements: cannot read {str(path)!r}: {exc}") from None
        except ValueError as exc:
            raise InvalidInputError(f"--measurements: {str(path)!r} is not JSON: {exc}") from None
        for i, item in enumerate(doc if isinstance(doc, list) else [doc]):
            profiles.append(MeasuredProfile.from_measurement(item, f"{path}[{i}]"))
    return profiles


def write_params(device: str, values: dict[str, float], path: Path = PARAMS_FILE) -> None:
    doc = json.loads(path.read_text())
    doc["gpus"][device] = {k: float(f"{v:.6g}") for k, v in values.items()}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def calibration_dict(c: Calibration, names: tuple[str, ...] = CALIBRATED) -> dict[str, Any]:
    return {
        "device": c.device,
        "calibrated": list(names),
        "fit_points": c.fit_points,
        "held_out_points": len(c.held_out),
        "median_ape_before": c.median_before,
        "median_ape_after": c.median_after,
        "before": c.before.to_dict(),
        "after": c.after.to_dict(),
        "held_out": [
            {
                "profile": p.profile.label,
                "rate": p.rate,
                "measured_s": p.latency,
                "ape_before": _num(b),
                "ape_after": _num(a),
            }
            for p, b, a in zip(c.held_out, c.errors_before, c.errors_after, strict=True)
        ],
    }


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.iterations < 1:
        raise InvalidInputError(f"--iterations: must be >= 1, got {args.iterations}")
    names = tuple(n.strip() for n in args.params.split(",") if n.strip())
    unknown = sorted(set(names) - set(BOUNDS))
    if not names or unknown:
        raise InvalidInputError(
            f"--params: unknown {', '.join(unknown) or '(none given)'}; one or more of "
            f"{', '.join(BOUNDS)}"
        )
    profiles = read_measurements(args.measurements)
    device = profiles[0].gpu.name if profiles else ""
    committed = load_params()
    if device not in committed:
        raise InvalidInputError(f"--measurements: device {device!r} has no entry in params.json")
    result = run_calibration(profiles, committed[device], names=names, iterations=args.iterations)
    if args.write:
        write_params(device, result.after.to_dict())
    if args.json:
        print(json.dumps(calibration_dict(result, names)))
        return 0
    print(
        f"device {device}: {len(profiles)} profile(s), {result.fit_points} points fitted, "
        f"{len(result.held_out)} held out"
    )
    print(f"  {'profile':<40} {'rate/s':>8} {'measured s':>10} {'before %':>9} {'after %':>8}")
    for p, b, a in zip(result.held_out, result.errors_before, result.errors_after, strict=True):
        print(f"  {p.profile.label:<40} {p.rate:8.3f} {p.latency:10.4f} {b:9.1f} {a:8.1f}")
    print(
        f"median latency error on held-out rates: before {result.median_before:.1f}%, "
        f"after {result.median_after:.1f}%"
    )
    for name in names:
        print(
            f"  {name:<16} {getattr(result.before, name):.4g} -> {getattr(result.after, name):.4g}"
        )
    if args.write:
        print(f"wrote {device} into {PARAMS_FILE}")
    return 0
