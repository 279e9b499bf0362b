"""The RAG workload on this host as a declared ``cpu`` node, shared by ``make demo``
(``scripts/demo.py``) and the real-engine tests (``tests/agent/test_engines_real.py``).

* ``CLUSTER``: this host as one node with three ``cpu`` devices (k = 1: every plan runs three
  engines, the most this machine takes).
* ``spec_text``: two models, ``rerank`` then ``gen``, and one workflow ``rag`` whose statistics
  are those of ``PROGRAM``: 2 reranker calls at once (~40 prompt tokens, 1 output token), then one
  generator call (~40 prompt tokens, 32 output tokens).
* ``flip``: the rates at which the planner's allocation changes from gen x1 + rerank x2 to
  gen x2 + rerank x1, read off offline plans made by the planner's own plan path, so that the
  demo and the tests follow the performance model wherever it goes.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import InfeasibleError
from services.core.sim.program import Lengths, Seconds
from services.core.sim.workflows import RagReranker

WORKFLOW = "rag"
LOW_ALLOCATION = {"gen": 1, "rerank": 2}
HIGH_ALLOCATION = {"gen": 2, "rerank": 1}
# the loop's default rate thresholds (services/planner/config.py); the demo leaves them as they are
RATE_UP = 1.5
RATE_NOISE = 0.2

CLUSTER = """\
version: 1
name: this-host
nodes:
  - name: local
    gpu_type: cpu
    gpus: 3
    memory_gib: 2
    interconnect: pcie
"""

_SPEC = """\
version: 1
fraction_unit: 1
models:
  gen: {{{gen_arch}, weights: {gen_weights}, max_model_len: {gen_len}}}
  rerank: {{{rerank_arch}, weights: {rerank_weights}, max_model_len: 256}}
workflows:
  - name: rag
    rate: {rate}
    stats:
      stages: [[rerank], [gen]]
      llms:
        rerank: {{n: 2, p: 2, prompt_tokens: 40, completion_tokens: 1}}
        gen: {{n: 1, p: 1, prompt_tokens: 40, completion_tokens: 32}}
"""

# The workflow the spec's statistics describe; the roles map to the spec's models.
PROGRAM = RagReranker(
    candidates=(2, 2),
    top_n=1,
    query=Lengths(12, 0.3, 4, 24),
    passage=Lengths(16, 0.3, 4, 32),
    instructions=12,
    answer=Lengths(32, 0.0, 32, 32),
    retrieval=Seconds(0.05, 0.3),
    models={"reranker": "rerank", "generator": "gen"},
)

QWEN = "model: Qwen/Qwen3-0.6B"


def config_arch(model_dir: Path | str) -> str:
    """The spec's architecture entry for a local model directory (its config.json)."""
    return f"config: {model_dir}"


@dataclass(frozen=True)
class Models:
    """What the spec's two models serve (weights) and are planned as (architecture entries)."""

    gen_weights: str
    rerank_weights: str
    gen_arch: str = QWEN
    rerank_arch: str = QWEN
    gen_len: int = 256


def spec_text(models: Models, rate: float) -> str:
    return _SPEC.format(
        gen_arch=models.gen_arch,
        rerank_arch=models.rerank_arch,
        gen_weights=models.gen_weights,
        rerank_weights=models.rerank_weights,
        gen_len=models.gen_len,
        rate=f"{rate:.4g}",
    )


@dataclass(frozen=True)
class Offline:
    """One offline plan's figures for the workflow."""

    rate: float
    allocation: dict[str, int]
    latency_s: float
    capacity_rps: float
    rho: float

    @property
    def trigger_rps(self) -> float:
        """The window rate above which the loop's ``rate_high`` drifts (default thresholds)."""
        return max(
            self.rate * (1 + RATE_NOISE), min(self.rate * RATE_UP, self.capacity_rps * self.rho)
        )


def plan_offline(models: Models, rate: float) -> Offline:
    """The planner's own plan path, in-process, for the spec at ``rate`` on ``CLUSTER``."""
    from services.cli.plan import plan_offline as one_plan

    with tempfile.TemporaryDirectory(prefix="scepsy-cpu-rag-") as tmp:
        (Path(tmp) / "cluster.yaml").write_text(CLUSTER)
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(spec_text(models, rate) + "cluster: cluster.yaml\n")
        args = argparse.Namespace(spec=str(spec), cluster=None, store=False, profile_workers=1)
        plan, _ = one_plan(args)
    wf = {w.workflow: w for w in plan.workflows}[WORKFLOW]
    return Offline(
        rate=rate,
        allocation={m: a.replicas for m, a in sorted(plan.allocation.items())},
        latency_s=wf.latency_s,
        capacity_rps=wf.throughput_rps,
        rho=plan.rho,
    )


GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class Flip:
    low: Offline  # the highest grid rate planned gen x1 + rerank x2
    high: Offline  # the lowest one above it planned gen x2 + rerank x1


def flip(models: Models, grid: tuple[float, ...] = GRID, refine: int = 3) -> Flip | None:
    """Where the allocation flips from ``LOW_ALLOCATION`` to ``HIGH_ALLOCATION`` as the rate
    grows (bisected ``refine`` times past the grid); None when it never does on the grid."""
    low: Offline | None = None
    high: Offline | None = None
    for rate in grid:
        try:
            got = plan_offline(models, rate)
        except InfeasibleError:  # no feasible plan at this rate: the grid ends here
            break
        if got.allocation == LOW_ALLOCATION:
            low, high = got, None
        elif got.allocation == HIGH_ALLOCATION and low is not None:
            high = got
            break
    if low is None or high is None:
        return None
    for _ in range(refine):
        rate = float(f"{(low.rate + high.rate) / 2:.3g}")  # as the spec writes it
        if rate in (low.rate, high.rate):
            break
        mid = plan_offline(models, rate)
        if mid.allocation == LOW_ALLOCATION:
            low = mid
        elif mid.allocation == HIGH_ALLOCATION:
            high = mid
        else:
            break
    return Flip(low, high)


@dataclass(frozen=True)
class DemoRates:
    """A base rate planned gen x1 + rerank x2 whose doubling, and the rate at which the loop's
    ``rate_high`` fires, are both planned gen x2 + rerank x1: the loop's re-plan moves engines
    whatever rate between the two its window sees."""

    before: Offline
    trigger: Offline
    after: Offline


def demo_rates(models: Models, found: Flip | None = None) -> DemoRates | None:
    found = found or flip(models)
    if found is None:
        return None
    for share in (0.8, 0.75, 0.85, 0.7, 0.9):
        rate = float(f"{found.high.rate * share:.2g}")
        before = plan_offline(models, rate)
        if before.allocation != LOW_ALLOCATION:
            continue
        trigger = plan_offline(models, before.trigger_rps)
        after = plan_offline(models, 2 * rate)
        if trigger.allocation == after.allocation == HIGH_ALLOCATION:
            return DemoRates(before, trigger, after)
    return None
