"""``scepsy profile``: an LLM's latency-vs-rate profile on one hardware configuration.

    scepsy profile --backend analytic --model M --gpu G --tp T [--fraction F]
                   (--input-len N --output-len N | --trace FILE [--trace-model NAME])
                   [--seed S] [--out FILE] [--json]

The request mix is either fixed lengths or the (prompt, completion) token counts of the
successful calls to ``--trace-model`` (default: the ``--model`` argument) in a trace file.
``--out`` writes the profile as JSON (``Profile.to_dict``); ``--json`` prints it on stdout.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.cli.perf import add_engine_args, scheduler_config
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import resolve_model
from services.core.errors import InvalidInputError
from services.core.perf.analytic import RequestMix, profile_analytic
from services.core.perf.profile import Profile
from services.core.workload.trace import read_trace
from services.profiler.backends import BACKENDS


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


def cmd_profile(args: argparse.Namespace) -> int:
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
