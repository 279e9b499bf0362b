"""GPUs needed at equal latency: Scepsy's fewest-GPUs objective against the baselines, simulated.

The same measurement as ``scepsy bench gpus`` (``services.core.sim.gpus``): for every workflow
on ``--gpus`` GPUs at ``--load`` x the ALP's highest throughput there, Scepsy's fewest-GPUs plan
at the latency of its own minimum-latency plan (+ ``--slack``) and at the simulated latency of
each baseline; GPUs and simulated latency of both, and whether Scepsy met the objective.

    .venv/bin/python scripts/bench_gpus.py [--workflows rag,beam,...] [--gpus 8] [--load 0.5]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.cli.main import main as scepsy  # noqa: E402
from services.core.sim.workflows import WORKFLOWS  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--workflows") for a in args):
        args = ["--workflows", ",".join(WORKFLOWS), *args]
    return scepsy(["bench", "gpus", *args])


if __name__ == "__main__":
    raise SystemExit(main())
