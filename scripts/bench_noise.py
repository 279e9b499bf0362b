"""How much a bench run's steady-state verdict moves with its length: the backlog growth
(``measure.backlog_growth``) of Scepsy's plan for one workflow, GPU count and rate, over several
arrival seeds, at several run lengths. The bench's 2% bound needs runs whose spread is well below
it (``BenchSettings.doublings``).

    .venv/bin/python scripts/bench_noise.py --workflow mapreduce --gpus 4 --rate 2.53 \
        [--requests 219,438,876,1752] [--seeds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.sim.arrivals import poisson  # noqa: E402
from services.core.sim.measure import measure  # noqa: E402
from services.core.sim.results import BenchSettings  # noqa: E402
from services.core.sim.scoring import describe  # noqa: E402
from services.core.sim.systems import SYSTEMS, Context  # noqa: E402
from services.core.sim.workflows import workflow  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", required=True)
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests/s")
    parser.add_argument("--requests", default="219,438,876,1752")
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args(argv)
    settings = BenchSettings()
    ctx = Context.prepare(
        workflow(args.workflow),
        settings.gpu_type,
        args.gpus,
        **settings.warmup(),
    )
    plan = SYSTEMS["scepsy"](ctx, args.gpus, args.rate)
    print(f"{args.workflow}, {args.gpus} GPUs, {args.rate:g} req/s: {describe(plan.allocation)}")
    print("requests  backlog growth per seed (%)                      sd")
    for n in (int(x) for x in args.requests.split(",")):
        growth = []
        for seed in range(args.seeds):
            result = ctx.serve(plan, poisson(args.rate, n, 100 + seed), gpus=args.gpus)
            growth.append(100 * measure(result, args.rate, settings.measure).backlog_growth)
        cells = " ".join(f"{g:+5.1f}" for g in growth)
        print(f"{n:8d}  {cells}  {statistics.stdev(growth):5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
