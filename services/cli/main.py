"""Entry point of the ``scepsy`` console command.

Each sub-command module exposes ``register(subparsers)`` which adds its parser and sets
``func(args) -> int``. Domain errors are printed as ``error: <message>`` with exit code 2;
nothing is printed to stdout in that case, so ``--json`` output stays parseable.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from services.core.errors import ScepsyError

# Modules under services.cli that contribute sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "cluster",
    "engine",
    "trace",
    "perf",
    "profile",
    "predict",
    "plan",
    "apply",
    "status",
    "place",
    "router",
    "simulate",
    "validate",
    "loop",
    "bench",
    "serve",
    "fuzz",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scepsy",
        description="Serve multi-LLM agentic workflows on GPU clusters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"services.cli.{name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`scepsy ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    raise SystemExit(main())
