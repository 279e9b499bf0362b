"""The planner end to end: through the services (as `scepsy up` runs them) against in-process.

Starts the whole suite with ``scepsy up --cluster deploy/examples/cluster-2xh100.yaml`` (embedded
Redis, each service its own process), then plans the example RAG spec
(``deploy/examples/spec-rag.yaml``: a generator and a reranker on 16 H100s) both ways, side by
side in one run:

- **services**: the ``Plan`` RPC of the Planner service, which gets every profile from the
  Profiler service (store first, over gRPC) and every placement from the Placer service, and
  stores the plan in Redis; timed at the client, RPC included;
- **in-process**: ``make_plan`` in this process, profiles from the same backend registry, an
  in-memory profile store, placement in-process, nothing stored.

``cold``: no profile stored yet (the first plan computes them all, once per way); ``warm``: every
profile stored (the median of ``--repeat`` plans at alternating rates, the two ways interleaved).

    .venv/bin/python scripts/bench_planner.py [--repeat N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from protos.scepsy.v1 import planner_pb2, planner_pb2_grpc  # noqa: E402
from services.core.cluster.declared import load_cluster  # noqa: E402
from services.core.perf.profile import Profile, ProfileKey  # noqa: E402
from services.core.planning.plan import PlanInputs, make_plan, spec_from_text  # noqa: E402
from services.core.planning.profiles import SpecProfiles, StoreFirst  # noqa: E402
from services.profiler.backends import BACKENDS  # noqa: E402

SPEC = REPO / "deploy/examples/spec-rag.yaml"
CLUSTER = REPO / "deploy/examples/cluster-2xh100.yaml"
RATES = (8.0, 9.0)  # alternated, so that consecutive plans are not the same document


def spec_text(rate: float) -> str:
    text = SPEC.read_text().replace("cluster: cluster-2xh100.yaml\n", "")
    return text.replace("rate: 8.0", f"rate: {rate}")


def scepsy(home: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SCEPSY_HOME": home}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="warm plans per way")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    nodes = load_cluster(CLUSTER)
    memory: dict[ProfileKey, Profile] = {}

    def in_process(rate: float) -> float:
        text = spec_text(rate)
        spec = spec_from_text(text, nodes)
        source = StoreFirst(BACKENDS, get=memory.get, put=lambda p: memory.__setitem__(p.key, p))
        started = time.perf_counter()
        make_plan(PlanInputs(text, spec, nodes, SpecProfiles(spec, source)))
        return time.perf_counter() - started

    with tempfile.TemporaryDirectory() as home:
        started = time.perf_counter()
        up = scepsy(home, "up", "--cluster", str(CLUSTER), "--json")
        up_s = time.perf_counter() - started
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        try:
            state = json.loads((Path(home) / "state.json").read_text())
            address = state["services"]["planner"]["address"]
            channel = grpc.insecure_channel(address)
            stub = planner_pb2_grpc.PlannerStub(channel)

            def through_services(rate: float) -> float:
                request = planner_pb2.PlanRequest(spec_yaml=spec_text(rate))
                started = time.perf_counter()
                stub.Plan(request, timeout=120)
                return time.perf_counter() - started

            cold = {"services": through_services(RATES[0]), "in-process": in_process(RATES[0])}
            warm: dict[str, list[float]] = {"services": [], "in-process": []}
            for i in range(args.repeat):
                rate = RATES[i % len(RATES)]
                ways = [("services", through_services), ("in-process", in_process)]
                for name, way in ways if i % 2 == 0 else reversed(ways):
                    warm[name].append(way(rate))
            channel.close()
        finally:
            down = scepsy(home, "down")
    result: dict[str, Any] = {
        "up_seconds": up_s,
        "down_ok": down.returncode == 0,
        "cold": cold,
        "warm_median": {k: statistics.median(v) for k, v in warm.items()},
        "warm_runs": warm,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"scepsy up (all services healthy): {up_s:.2f} s")
    print(f"{'plan':<8} {'services s':>11} {'in-process s':>13} {'ratio':>7}")
    rows = [("cold", cold), ("warm", result["warm_median"])]
    for label, row in rows:
        ratio = row["services"] / row["in-process"]
        print(f"{label:<8} {row['services']:>11.3f} {row['in-process']:>13.3f} {ratio:>6.2f}x")
    print(f"(warm: median of {args.repeat} plans each, interleaved)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
