"""Allocations compared in long runs: what a single bench run near a verdict cannot tell.

For a workflow, the evaluation's context (warm-up trace, profiles, replay scorer as
``scepsy bench`` prepares them on ``--prepare-gpus`` GPUs), a rate (``--load`` x the ALP's
highest throughput on ``--gpus`` GPUs, or ``--rate``) and one or more allocations
(``--alloc "generator 8x 0.5, prm 5x 0.5"``, the report's notation) or systems (``--system
autoscaler``: its plan at the rate, with its controller): each allocation served by
the workflow's program for ``--scale`` x the bench's requests on ``--seeds`` seeds (mean
latency, backlog growth (a mix's: each part's), sustainable by the 2% rule), and scored by
the replay (the scorer's seed, then ``--seeds`` other seeds; allocations only). Prints one
line per run.

    .venv/bin/python scripts/bench_longruns.py --workflow coserve --gpus 8 --load 1.0 \\
        --alloc "generator 8x 0.5, prm 5x 0.5, reranker 3x 0.5" \\
        --alloc "generator 4x tp1, prm 2x tp1, reranker 2x tp1"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.errors import InvalidInputError  # noqa: E402
from services.core.sim.arrivals import poisson_at  # noqa: E402
from services.core.sim.measure import measure  # noqa: E402
from services.core.sim.results import BenchSettings  # noqa: E402
from services.core.sim.runs import load_at  # noqa: E402
from services.core.sim.scoring import describe, parse_described  # noqa: E402
from services.core.sim.systems import SYSTEMS, Context, Setup  # noqa: E402
from services.core.sim.workflows import WORKFLOWS, workflow  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", required=True, choices=sorted(WORKFLOWS))
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--prepare-gpus", type=int, default=4, help="GPUs of the warm-up")
    parser.add_argument("--load", type=float, help="x the ALP's highest throughput")
    parser.add_argument("--rate", type=float, help="requests/s (instead of --load)")
    parser.add_argument("--alloc", action="append", default=[])
    parser.add_argument("--system", action="append", default=[], choices=sorted(SYSTEMS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--scale", type=int, default=4, help="x the bench's requests per run")
    args = parser.parse_args(argv)
    try:
        if (args.load is None) == (args.rate is None):
            raise InvalidInputError("give one of --load and --rate")
        if args.seeds < 1 or args.scale < 1:
            raise InvalidInputError(f"--seeds and --scale: >= 1, got {args.seeds}, {args.scale}")
        if not args.alloc and not args.system:
            raise InvalidInputError("give at least one --alloc or --system")
        models = workflow(args.workflow).models
        allocations = [(text, parse_described(text, "--alloc", models)) for text in args.alloc]
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = BenchSettings()
    ctx = Context.prepare(
        workflow(args.workflow),
        settings.gpu_type,
        args.prepare_gpus,
        **settings.warmup(),
        options=replace(settings.options, seed=settings.seed),
    )
    rate = args.rate if args.rate is not None else args.load * ctx.capacity(args.gpus)
    print(f"{args.workflow} on {args.gpus} GPUs at {rate:.4g} req/s")
    base = ctx.scorer
    scorers = [base] + [
        replace(base, settings=replace(base.settings, seed=seed), scores={})
        for seed in range(1, args.seeds + 1)
    ]
    for text, allocation in allocations:
        for scorer in scorers:
            scored = scorer.score(allocation, rate)
            print(
                f"{text:48} replay  seed {scorer.settings.seed:>4}: {scored.latency:7.2f} s "
                f"steady {scored.steady}"
            )
        long_runs(ctx, Setup("allocation", allocation), text, rate, settings, args)
    for name in args.system:
        plan = SYSTEMS[name](ctx, args.gpus, rate)
        long_runs(ctx, plan, f"{name} ({describe(plan.allocation)})", rate, settings, args)
    return 0


def long_runs(
    ctx: Context,
    plan: Setup,
    label: str,
    rate: float,
    settings: BenchSettings,
    args: argparse.Namespace,
) -> None:
    """``plan`` served by the program, ``args.scale`` x ``settings``' requests per seed."""
    for seed in range(1, args.seeds + 1):
        load = load_at(ctx, rate, seed, settings)
        requests = load.requests * args.scale
        result = ctx.serve(plan, poisson_at(rate, requests, load.seed), gpus=args.gpus)
        point = measure(result, rate, settings.measure, ctx.groups(requests))
        parts = " ".join(f"{g:+.3f}" for g in point.part_growth)
        print(
            f"{label:48} program seed {seed:>4}: {point.mean_latency:7.2f} s "
            f"growth {point.backlog_growth:+.3f}{f' (parts {parts})' if parts else ''} "
            f"sustainable {point.sustainable} ({requests} requests)",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
