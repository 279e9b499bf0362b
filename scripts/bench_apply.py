"""Time from ``scepsy apply`` to every engine healthy and registered, and the node agent's own CPU.

For each engine count N: ``scepsy up`` on a declared ``cpu`` node of N devices (this host), a
spec serving the tiny model on all of them (k = 1: N whole-device replicas), then::

    apply      seconds from `scepsy apply --wait` starting to it returning (all engines READY)
    reapply    the same spec again: nothing changes (idempotence), its seconds
    agent CPU  the agent's CPU seconds per wall second, idle (engines running, nothing to do)
               and during the apply (starting engines, probing /health, registering)

Needs the engine venv (``make engine-venv``). N is at most 3 on the project's 2-core machines (the
limit on real engines at once); pass ``--engines 1 2 4`` where the host allows.

    .venv/bin/python scripts/bench_apply.py [--engines 1 2 3] [--idle-s 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.runtime.engines import run_engine_module  # noqa: E402

SCEPSY = [sys.executable, "-m", "services.cli.main"]
TICKS = os.sysconf("SC_CLK_TCK")

SPEC = """\
version: 1
fraction_unit: 1
models:
  gen: {{model: Qwen/Qwen3-0.6B, weights: {weights}, max_model_len: 256}}
workflows:
  - name: chat
    rate: 0.1
    stats: {{llms: {{gen: {{n: 1, prompt_tokens: 60, completion_tokens: 16}}}}}}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*SCEPSY, *args], env=env, capture_output=True, text=True, timeout=900, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"scepsy {' '.join(args)} failed:\n{done.stderr}")
    return done


def bench(n: int, tiny: Path, idle_s: float) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix=f"scepsy-bench-apply-{n}-"))
    env = {**os.environ, "SCEPSY_HOME": str(home), "SCEPSY_LOOP": "off"}
    env.pop("SCEPSY_REDIS_URL", None)
    (home / "cluster.yaml").write_text(
        "version: 1\nnodes:\n"
        f"  - {{name: local, gpu_type: cpu, gpus: {n}, memory_gib: 2, interconnect: pcie}}\n"
    )
    (home / "spec.yaml").write_text(SPEC.format(weights=tiny))
    run(env, "up", "--cluster", str(home / "cluster.yaml"))
    try:
        state = json.loads((home / "state.json").read_text())
        agent = int(state["services"]["agent/local"]["pid"])
        c0, t0 = cpu_seconds(agent), time.monotonic()
        run(env, "apply", "--spec", str(home / "spec.yaml"), "--wait", "--timeout", "800")
        c1, t1 = cpu_seconds(agent), time.monotonic()
        time.sleep(idle_s)
        c2, t2 = cpu_seconds(agent), time.monotonic()
        again = run(env, "apply", "--spec", str(home / "spec.yaml"), "--wait", "--json")
        t3 = time.monotonic()
        change = json.loads(again.stdout)["change"]
        assert not change["started"] and not change["stopped"], change
        return {
            "engines": n,
            "apply_s": t1 - t0,
            "reapply_s": t3 - t2,
            "agent_cpu_apply": (c1 - c0) / (t1 - t0),
            "agent_cpu_idle": (c2 - c1) / (t2 - t1),
        }
    finally:
        run(env, "down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--idle-s", type=float, default=10.0)
    args = parser.parse_args()
    tiny = Path(tempfile.mkdtemp(prefix="scepsy-bench-apply-model-")) / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(tiny)])
    rows = [bench(n, tiny, args.idle_s) for n in args.engines]
    print("apply to ready (tiny model, vLLM CPU engines, this host)")
    print(
        f"{'engines':>7}  {'apply s':>8}  {'re-apply s':>10}  {'agent CPU apply':>15}  "
        f"{'agent CPU idle':>14}"
    )
    for r in rows:
        print(
            f"{r['engines']:>7}  {r['apply_s']:>8.1f}  {r['reapply_s']:>10.2f}  "
            f"{r['agent_cpu_apply']:>14.1%}  {r['agent_cpu_idle']:>14.1%}"
        )


if __name__ == "__main__":
    main()
