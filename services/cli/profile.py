"""``scepsy profile``: an LLM's latency-vs-rate profile on one hardware configuration.

    scepsy profile --backend analytic --model M --gpu G --tp T [--fraction F]
                   (--input-len N --output-len N | --trace FILE [--trace-model NAME])
                   [--seed S] [--out FILE] [--json]
    scepsy profile --backend vllm --model M --gpu G [--tps 1,2] [--fractions 0.5,1]
                   (--endpoint URL | [--model-dir DIR]) [--mode poisson|fanout --fanout P]
                   [--warmup S] [--window S] [--budget S] [--store [--redis-url URL]] ...

The request mix is either fixed lengths or the (prompt, completion) token counts of the
successful calls to ``--trace-model`` (default: the ``--model`` argument) in a trace file.
``--out`` writes the profile as JSON (``Profile.to_dict``); ``--json`` prints it on stdout.

The ``vllm`` backend measures real engines (``services.profiler.vllm_backend``): it attaches to
the engine at ``--endpoint``, or starts one per configuration of the sweep (``--tps`` x
``--fractions``; the weights from ``--model-dir``, else ``$SCEPSY_MODEL_DIRS``, else the name as
a Hub id). Progress goes to stderr. ``--store`` stores each measured profile in Redis under its
key, with how it was measured; ``--out`` then writes the measurement documents (every rate
tried, errors, the method; the input of ``scepsy perf calibrate``), one JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.cli.perf import add_engine_args, scheduler_config
from services.cli.store_args import add_store_flags, with_store
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import resolve_model
from services.core.errors import InfeasibleError, InvalidInputError
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile
from services.core.workload.trace import read_trace
from services.profiler.backends import BACKENDS
from services.profiler.vllm_backend import (
    MODES,
    Measurement,
    SweepConfig,
    VllmBackend,
    stderr_progress,
)
from services.runtime.store import Store


def trace_mix(path: Path, model: str) -> RequestMix:
    """The request mix of ``model``'s successful calls in the trace at ``path``."""
    trace = read_trace(path)
    samples = [
        (c.prompt_tokens, c.completion_tokens)
        for c in trace.calls
        if c.model == model and c.status == "ok"
    ]
    if not samples:
        models = sorted({c.model for c in trace.calls})
        raise InvalidInputError(
            f"trace {str(path)!r}: no successful calls to model {model!r} "
            f"(models in the trace: {', '.join(models) or 'none'}; pick one with --trace-model)"
        )
    return RequestMix.from_samples(samples)


# How a trace file becomes a request mix; tests and other front ends may swap it.
TraceMixLoader = Callable[[Path, str], RequestMix]
TRACE_MIX_LOADER: TraceMixLoader = trace_mix


def register(sub: Any) -> None:
    parser = sub.add_parser("profile", help="latency-vs-rate profile of one LLM configuration")
    parser.add_argument(
        "--backend", choices=sorted(BACKENDS), default="analytic", help="profiler backend"
    )
    add_engine_args(parser)
    parser.add_argument("--input-len", type=int, help="fixed prompt tokens per call")
    parser.add_argument("--output-len", type=int, help="fixed completion tokens per call")
    parser.add_argument("--trace", type=Path, help="trace JSONL whose calls give the request mix")
    parser.add_argument("--trace-model", help="model name in the trace (default: --model)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (arrivals, draws)")
    parser.add_argument("--requests", type=int, default=400, help="simulated calls per rate")
    parser.add_argument("--out", type=Path, help="write the profile JSON to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    vllm = parser.add_argument_group("vllm backend (measured on real engines)")
    vllm.add_argument("--endpoint", help="attach to the running engine at this base URL")
    vllm.add_argument("--model-dir", help="weights of the engine to start (default: see above)")
    vllm.add_argument("--tps", help="TP degrees to sweep, comma-separated (default: --tp)")
    vllm.add_argument("--fractions", help="GPU shares to sweep (default: --fraction)")
    vllm.add_argument("--mode", choices=MODES, default="poisson", help="arrivals (poisson)")
    vllm.add_argument("--fanout", type=int, default=1, help="calls per group in fanout mode")
    vllm.add_argument("--warmup", type=float, default=1.5, help="s per rate before measuring")
    vllm.add_argument("--window", type=float, default=4.0, help="s measured per rate")
    vllm.add_argument("--budget", type=float, default=170.0, help="s per profile (170)")
    vllm.add_argument("--log-dir", type=Path, help="engine logs (default: a temp dir)")
    vllm.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="cpu devices this host declares (its cluster node): the engine binds to one "
        "device's slice of the cores, as a plan's engine does (1: every core)",
    )
    vllm.add_argument("--store", action="store_true", help="store the profiles in Redis")
    add_store_flags(parser)
    parser.set_defaults(func=cmd_profile)


def request_mix(args: argparse.Namespace, loader: TraceMixLoader | None = None) -> RequestMix:
    fixed = args.input_len is not None or args.output_len is not None
    if args.trace is not None and fixed:
        raise InvalidInputError("--trace: give either --trace or --input-len/--output-len")
    if args.trace is not None:
        return (loader or TRACE_MIX_LOADER)(args.trace, args.trace_model or args.model)
    if args.input_len is None or args.output_len is None:
        raise InvalidInputError("--input-len/--output-len: both are needed (or give --trace)")
    for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len)):
        if value < 1:
            raise InvalidInputError(f"{flag}: must be >= 1, got {value}")
    return RequestMix.fixed(args.input_len, args.output_len)


def _floats(flag: str, text: str | None, default: float) -> list[float]:
    if text is None:
        return [default]
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"{flag}: comma-separated numbers, got {text!r}") from None
    if not values:
        raise InvalidInputError(f"{flag}: empty")
    return values


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(
        mode=args.mode,
        fanout=args.fanout,
        warmup_s=args.warmup,
        window_s=args.window,
        budget_s=args.budget,
    )


def cmd_measure(args: argparse.Namespace) -> int:
    """The ``vllm`` backend: measure every configuration of the sweep, store, print."""
    model = resolve_model(args.model)
    gpu = gpu_spec(args.gpu)
    mix = request_mix(args)
    tps = [int(t) for t in _floats("--tps", args.tps, args.tp)]
    fractions = _floats("--fractions", args.fractions, args.fraction)
    if args.endpoint and len(tps) * len(fractions) > 1:
        raise InvalidInputError("--endpoint: one running engine is one configuration; no sweep")
    backend = VllmBackend(
        endpoint=args.endpoint,
        model_dir=args.model_dir,
        config=sweep_config(args),
        log_dir=args.log_dir,
        progress=stderr_progress,
        cpu_devices=args.cpu_devices,
    )
    results: list[Measurement] = []
    for tp in tps:
        for fraction in fractions:
            try:
                results.append(backend.measure(model, gpu, tp, fraction, mix, args.seed))
            except InfeasibleError as exc:
                print(f"skipped tp {tp} fraction {fraction:g}: {exc}", file=sys.stderr)
    if not results:
        raise InfeasibleError("no configuration of the sweep could be measured")
    if args.store:

        async def store_all(store: Store) -> None:
            for m in results:
                await store.put_measured_profile(m.profile(), m.stored_points(), m.method)

        with_store(args, store_all)
    docs = [m.to_dict() for m in results]
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(docs, indent=2) + "\n")
        except OSError as exc:
            raise InvalidInputError(f"--out: cannot write {str(args.out)!r}: {exc}") from None
    if args.json:
        print(json.dumps(docs))
    else:
        print("\n\n".join(format_measurement(m) for m in results))
        if args.store:
            print(f"stored {len(results)} profile(s)")
    return 0


def format_measurement(m: Measurement) -> str:
    k = m.key
    meth = m.method
    lines = [
        f"{k.model} on {k.gpu_type} tp {k.tp} fraction {k.fraction:g} ({k.engine}, mix {k.mix})",
        f"measured at {meth['endpoint']}, {meth['mode']} arrivals"
        + (f" in groups of {meth['fanout']}" if meth["mode"] == "fanout" else "")
        + f", {meth['warmup_s']:g} s warm-up + {meth['window_s']:g} s per rate, "
        f"{meth['seconds']:.0f} s; stopped: {m.stop_reason}",
        f"saturation rate {m.saturation_rate:.3f} calls/s, idle latency {m.idle_latency:.3f} s",
        f"  {'rate/s':>8} {'done/s':>8} {'calls':>6} {'errors':>6} {'mean s':>8} {'p50 s':>8} "
        f"{'p99 s':>8} {'ttft s':>8} {'tpot ms':>8}",
    ]
    for p in m.points:
        lines.append(
            f"  {p.rate:8.3f} {p.throughput:8.3f} {p.calls:6d} {p.errors:6d} "
            f"{p.mean_latency:8.3f} {p.p50_latency:8.3f} {p.p99_latency:8.3f} {p.ttft:8.3f} "
            f"{p.tpot * 1000:8.2f}" + ("  saturated" if p.saturated else "")
        )
    kinds = m.error_kinds()
    if kinds:
        lines.append("  errors: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())))
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    if args.backend == "vllm":
        return cmd_measure(args)
    model = resolve_model(args.model)
    gpu = gpu_spec(args.gpu)
    mix = request_mix(args)
    if args.backend == "analytic":  # the analytic backend takes the scheduler's knobs too
        profile = profile_analytic(
            model,
            gpu,
            args.tp,
            args.fraction,
            mix,
            args.seed,
            config=scheduler_config(args, model),
            requests_per_point=args.requests,
        )
    else:
        profile = BACKENDS[args.backend].profile(model, gpu, args.tp, args.fraction, mix, args.seed)
    doc = profile.to_dict()
    if args.out is not None:
        try:
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
        except OSError as exc:
            raise InvalidInputError(f"--out: cannot write {str(args.out)!r}: {exc}") from None
    if args.json:
        print(json.dumps(doc))
    else:
        print(format_profile(profile))
    return 0


def format_profile(profile: Profile) -> str:
    k = profile.key
    lines = [
        f"{k.model} on {k.gpu_type} tp {k.tp} fraction {k.fraction:g} ({k.engine}, mix {k.mix})",
        f"saturation rate {profile.saturation_rate:.3f} calls/s",
        f"  {'rate/s':>9} {'mean s':>8} {'p50 s':>8} {'p99 s':>8} {'ttft s':>8} {'tpot ms':>8}",
    ]
    for p in profile.points:
        lines.append(
            f"  {p.rate:9.3f} {p.mean_latency:8.3f} {p.p50_latency:8.3f} {p.p99_latency:8.3f} "
            f"{p.ttft:8.3f} {p.tpot * 1000:8.2f}"
        )
    return "\n".join(lines)
