"""The one plan path (``make_plan``) and the plan document: inputs, result, placement, profile
sources, re-planning around the running placement, and the content hash."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import pytest

from services.core.allocation import Allocation
from services.core.cluster.declared import parse_cluster
from services.core.errors import InvalidInputError
from services.core.placement.heuristic import cluster_state, instances_of, validate
from services.core.planning.plan import (
    Plan,
    PlanInputs,
    content,
    make_plan,
    plan_dict,
    plan_id,
    problem_of,
    spec_from_text,
)
from services.core.planning.profiles import COMPUTED, Found, ProfileQuery, SpecProfiles
from services.core.planning.refine import Refiner, Scored
from services.core.planning.space import max_tp_of
from services.core.workload.spec import Spec
from tests.core.planning.test_search import synthetic


class Synthetic:
    """A ``ProfileProvider`` of the search tests' synthetic profiles, by the spec's model names."""

    def __init__(self) -> None:
        self.queries: list[ProfileQuery] = []

    def fetch(self, query: ProfileQuery) -> Found:
        self.queries.append(query)
        return Found(synthetic(query.name, query.tp, query.fraction), COMPUTED)


def build_plan(text: str, spec: Spec, *, created_at: float, **more: object) -> Plan:
    profiles = SpecProfiles(spec, Synthetic())
    inputs = PlanInputs(text, spec, spec.nodes, profiles, clock=lambda: created_at, **more)  # type: ignore[arg-type]
    return make_plan(inputs)


# Deployment names A and B (the synthetic profiles' models) backed by catalogue models.
SPEC = """
version: 1
fraction_unit: 4
rho: 0.8
cluster: {{gpu_type: H100-SXM, gpus: 4}}
models:
  A: Qwen/Qwen2.5-0.5B
  B: Qwen/Qwen3-0.6B
workflows:
  - name: w
    rate: {rate}
    weight: 2
    stats:
      tool_time: 0.2
      stages: [[A, B]]
      llms:
        A: {{n: 2, prompt_tokens: 100, completion_tokens: 10}}
        B: {{n: 1, prompt_tokens: 100, completion_tokens: 10}}
"""


def node(name: str, gpu_type: str, gpus: int, interconnect: str) -> dict[str, object]:
    return {"name": name, "gpu_type": gpu_type, "gpus": gpus, "interconnect": interconnect}


def test_plan_records_inputs_result_and_placement() -> None:
    text = SPEC.format(rate=1.0)
    spec = spec_from_text(text)
    plan = build_plan(text, spec, created_at=100.0)
    assert plan.id == plan_id(plan) and len(plan.id) == 16
    assert (plan.spec_text, plan.fraction_unit, plan.rho, plan.created_at) == (text, 4, 0.8, 100.0)
    assert sorted(plan.allocation) == ["A", "B"] and plan.gpus <= 4
    (w,) = plan.workflows
    assert (w.workflow, w.target_rps, w.weight) == ("w", 1.0, 2.0)
    assert w.latency_s == pytest.approx(plan.objective_s)  # one workflow: J is its latency
    assert w.throughput_rps >= 1.0 / 0.8
    state = cluster_state(plan.nodes, 4)
    assert validate(plan.placement, state, instances_of(plan.allocation, 4)) == ()
    assert plan.rounds == 1 and plan.constraints == ()
    json.dumps(plan_dict(plan))  # JSON-ready


def test_the_id_is_a_content_hash() -> None:
    text = SPEC.format(rate=1.0)
    spec = spec_from_text(text)
    first = build_plan(text, spec, created_at=1.0)
    later = build_plan(text, spec, created_at=2.0)
    # the time of planning and the search time do not change what was decided
    assert later.id == first.id and later.created_at != first.created_at
    assert "created_at" not in content(first) and "search_seconds" not in content(first)
    other_text = SPEC.format(rate=1.5)
    other = build_plan(other_text, spec_from_text(other_text), created_at=1.0)
    assert other.id != first.id
    reworded = "# same spec, another comment\n" + text
    assert build_plan(reworded, spec, created_at=1.0).id != first.id


def test_spec_on_given_nodes() -> None:
    text = SPEC.format(rate=1.0).replace("cluster: {gpu_type: H100-SXM, gpus: 4}\n", "")
    nodes = parse_cluster({"version": 1, "nodes": [node("x", "A100-80GB-PCIe", 4, "pcie")]})
    spec = spec_from_text(text, nodes)
    assert (spec.gpu_type, spec.gpu_count, spec.nodes) == ("A100-80GB-PCIe", 4, nodes)
    assert problem_of(spec).max_tp == 1
    with pytest.raises(InvalidInputError, match="cluster: missing"):
        spec_from_text(text)
    mixed = parse_cluster(
        {
            "version": 1,
            "nodes": [node("x", "H100-SXM", 2, "nvswitch"), node("y", "L40S", 2, "pcie")],
        }
    )
    with pytest.raises(InvalidInputError, match="exactly one type"):
        spec_from_text(text, mixed)
    with pytest.raises(InvalidInputError, match="spec: not valid YAML"):
        spec_from_text("version: [1")


@pytest.mark.parametrize(
    ("gpu_type", "gpus", "interconnect", "expected"),
    [
        ("H100-SXM", 8, "nvswitch", 8),
        ("H100-SXM", 6, "nvswitch", 4),
        ("A100-80GB-PCIe", 4, "nvlink-pairs", 2),
        ("L40S", 8, "pcie", 1),
    ],
)
def test_max_tp_is_the_largest_domain(
    gpu_type: str, gpus: int, interconnect: str, expected: int
) -> None:
    nodes = parse_cluster({"version": 1, "nodes": [node("n", gpu_type, gpus, interconnect)]})
    assert max_tp_of(nodes) == expected


def test_a_plan_records_where_each_llms_profiles_came_from() -> None:
    text = SPEC.format(rate=1.0)
    plan = build_plan(text, spec_from_text(text), created_at=1.0)
    sources = {m.model: m.profile_sources for m in plan.llms}
    # every configuration the search looked at was fetched once, all computed by the "test" engine
    assert set(sources) == {"A", "B"}
    assert all(set(s) == {"computed test"} and s["computed test"] > 1 for s in sources.values())
    assert "profile_sources" not in json.dumps(
        content(plan)
    )  # how profiles were got is no decision


def test_the_profile_source_asks_each_configuration_once_with_the_models_mix() -> None:
    text = SPEC.format(rate=1.0)
    spec = spec_from_text(text)
    provider = Synthetic()
    profiles = SpecProfiles(spec, provider)
    first = profiles.profile("A", 1, 0.5)
    assert profiles.profile("A", 1, 0.5) is first and profiles.hits == 1
    (query,) = provider.queries
    assert (query.name, query.model.name, query.gpu.name) == ("A", "Qwen/Qwen2.5-0.5B", "H100-SXM")
    assert query.mix.samples[0] == (100, 10)  # the spec's token counts for A
    assert query.key("e").redis_field() == f"Qwen/Qwen2.5-0.5B|H100-SXM|tp1|f0.5|e|{query.mix.id}"


def test_replanning_keeps_every_instance_the_new_allocation_still_has() -> None:
    text = SPEC.format(rate=1.0).replace("gpus: 4}", "gpus: 8}")
    spec = spec_from_text(text)
    first = build_plan(text, spec, created_at=1.0)
    assert {m: (a.tp, a.replicas) for m, a in first.allocation.items()} == {
        "A": (4, 1),
        "B": (1, 1),
    }
    # what runs is where an earlier placement put it, not where a fresh one would: A's TP group
    # on GPUs 4-7, B's fraction on GPU 0
    a, b = sorted(first.placement.assignments, key=lambda x: x.model)
    running = (dataclasses.replace(a, gpus=(4, 5, 6, 7)), dataclasses.replace(b, gpus=(0,)))
    fresh = build_plan(text, spec, created_at=2.0)
    again = build_plan(text, spec, created_at=2.0, running=running)
    assert again.allocation == fresh.allocation == first.allocation

    def where(plan: Plan) -> set[tuple[str, int, str, tuple[int, ...]]]:
        return {(x.model, x.replica, x.node, x.gpus) for x in plan.placement.assignments}

    assert where(again) == {(x.model, x.replica, x.node, x.gpus) for x in running}
    assert where(fresh) != where(again)  # without the running placement both would move
    # a higher rate that keeps A's configuration: A stays where it runs
    more = SPEC.format(rate=2.5).replace("gpus: 4}", "gpus: 8}")
    grown = build_plan(more, spec_from_text(more), created_at=3.0, running=running)
    assert grown.allocation["A"] == first.allocation["A"]
    assert ("A", 0, a.node, (4, 5, 6, 7)) in where(grown)


def test_a_refiner_replaces_the_closed_form_optimum_by_the_fastest_simulated_candidate() -> None:
    text = SPEC.format(rate=1.0)
    spec = spec_from_text(text)
    plain = build_plan(text, spec, created_at=1.0)
    scored: list[dict[str, Allocation]] = []

    def score(allocation: Mapping[str, Allocation]) -> Scored:
        # a stand-in for the simulator: the closed-form optimum measures slow
        scored.append(dict(allocation))
        slow = dict(allocation) == plain.allocation
        return Scored(9.0 if slow else 1.0 + len(scored) / 100, 1.0, True)

    refined = build_plan(
        text, spec, created_at=1.0, refiner=Refiner(score, candidates=3, headroom=())
    )
    assert scored[0] == plain.allocation  # the closed-form optimum is simulated first
    assert refined.allocation != plain.allocation
    assert refined.allocation == scored[1]  # the fastest simulated one
    assert refined.simulated_latency_s == pytest.approx(1.02)
    assert refined.refinement[0].startswith("rank 1") and "simulated 9 s" in refined.refinement[0]
    assert sum(note.startswith("chosen ") for note in refined.refinement) == 1
    assert refined.objective_s >= plain.objective_s  # by the closed form it is no better
    state = cluster_state(refined.nodes, 4)
    assert validate(refined.placement, state, instances_of(refined.allocation, 4)) == ()
    assert refined.id == plan_id(refined) and refined.id != plain.id
    assert "refinement" not in content(plain)


def test_a_refined_plan_also_scores_the_hand_made_splits_and_takes_one_that_simulates_faster() -> (
    None
):
    text = SPEC.format(rate=1.0)
    spec = spec_from_text(text)
    plain = build_plan(text, spec, created_at=1.0)
    even = {"A": Allocation(1.0, 1, 2), "B": Allocation(1.0, 1, 2)}  # 4 GPUs split evenly
    scored: list[dict[str, Allocation]] = []

    def score(allocation: Mapping[str, Allocation]) -> Scored:
        # a stand-in for the simulator in which the even split is fastest
        scored.append(dict(allocation))
        return Scored(1.0 if dict(allocation) == even else 5.0, 1.0, True)

    refiner = Refiner(score, candidates=2, headroom=(), seconds=1e-9)  # budget: the minimum
    refined = build_plan(text, spec, created_at=1.0, refiner=refiner)
    origins = [note.split(":")[0].removeprefix("chosen ") for note in refined.refinement]
    # the hand-made ones are scored right after the closed-form optimum, whatever the budget
    assert origins[0] == "rank 1" and scored[0] == plain.allocation
    assert {"time shares", "even split", "per-LLM sizing"} <= set(origins)
    assert refined.allocation == even != plain.allocation
    assert refined.refinement[origins.index("even split")].startswith("chosen even split")
    assert len(scored) == len({repr(sorted(a.items())) for a in scored})  # each once
