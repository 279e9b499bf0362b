"""``scepsy perf batch``: the analytic performance model's prediction for one static batch.

    scepsy perf batch --model M --gpu G --tp T --batch B --input-len I --output-len O [--json]

``batch`` identical requests of I prompt and O output tokens are submitted at once; latency is
the time until the last token, throughput batch x (I + O) / latency (llm-inference-bench's
definitions). ``--model`` is a catalogue name or the path of a Hugging Face config.json.
``--scheduler v0`` reproduces the 2024 vLLM engine the reference data were measured on.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import ModelSpec, resolve_model
from services.core.perf.batching import SchedulerConfig, static_batch
from services.core.perf.model import PerfModel


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
