"""The five workflows: each one's call counts follow its definition; programs are seeded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from services.core.errors import InvalidInputError
from services.core.sim.program import Lengths, Llm, Parallel, Program, Tool, run_instantly
from services.core.sim.workflows import (
    GENERATOR,
    POLICY,
    PRM,
    RERANKER,
    WORKFLOWS,
    BeamSearch,
    MapReduce,
    Mix,
    RagReranker,
    ReactAgent,
    coserve,
    reduce_calls,
    workflow,
)

SAMPLES = 400


def counts(program: Program) -> Counter[str]:
    calls, _ = run_instantly(program)
    return Counter(c.model for c in calls)


def sample(wf_name: str, n: int = SAMPLES) -> list[Counter[str]]:
    wf = workflow(wf_name)
    return [counts(wf.program(np.random.default_rng([7, i]))) for i in range(n)]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_mean_calls_match_the_definition(name: str) -> None:
    # the sample mean of calls per request lies within 4 standard errors of mean_calls()
    wf = workflow(name)
    drawn = sample(name)
    for model, expected in wf.mean_calls().items():
        values = np.array([c[model] for c in drawn], dtype=float)
        error = values.std(ddof=1) / np.sqrt(len(values))
        assert abs(values.mean() - expected) <= 4 * error + 1e-9, (model, values.mean(), expected)
    assert set().union(*drawn) <= set(wf.models)


def test_rag_calls_k_rerankers_then_one_generator() -> None:
    # K ~ uniform{8..32} reranker calls (1 output token each) in one fan-out, then 1 generator
    wf = RagReranker()
    ks = []
    for i in range(SAMPLES):
        calls, tools = run_instantly(wf.program(np.random.default_rng([1, i])))
        rerank = [c for c in calls if c.model == "reranker"]
        assert [c.model for c in calls[len(rerank) :]] == ["generator"]
        assert all(c.completion_tokens == 1 for c in rerank)
        assert [t.name for t in tools] == ["retrieve"]
        ks.append(len(rerank))
    assert min(ks) == 8 and max(ks) == 32  # both ends reached in 400 draws (P(miss) ~ 1e-7)


def test_beam_search_calls_come_in_rounds_of_width() -> None:
    # per round every active beam proposes 4 steps and the PRM scores all 4: policy and PRM
    # calls are equal and multiples of 4; N = 16 gives 4 beams, so at least 16 of each and at
    # most 4 x 4 x 40 = 640
    for c in sample("beam", 200):
        assert c["policy"] == c["prm"]
        assert c["policy"] % 4 == 0
        assert 16 <= c["policy"] <= 640


def test_beam_search_n_up_to_256_spans_tens_to_thousands() -> None:
    wf = BeamSearch(n_choices=(4, 256), n_weights=(0.5, 0.5), max_rounds=3, p_answer=1.0)
    # p_answer 1: every beam answers after one round; N=4 -> 1 beam x 4 = 4 calls, N=256 ->
    # 64 beams x 4 = 256 calls; E = 0.5 x 4 + 0.5 x 256 = 130
    seen = {counts(wf.program(np.random.default_rng([2, i])))["policy"] for i in range(50)}
    assert seen == {4, 256}
    assert wf.mean_calls()["policy"] == pytest.approx(130.0)


def test_beam_mean_calls_formula_by_hand() -> None:
    # N=16, width 4: 4 beams; p=0.5, R=2: E[min(L, 2)] = 1 + 0.5 = 1.5; E = 4 x 4 x 1.5 = 24
    wf = BeamSearch(p_answer=0.5, max_rounds=2)
    assert wf.mean_calls() == {"policy": 24.0, "prm": 24.0}


@pytest.mark.parametrize(
    ("summaries", "fan_in", "calls"),
    [
        (1, 8, 1),  # one reduce over one summary
        (8, 8, 1),  # fits one call
        (9, 8, 3),  # 2 calls, then 1 over their 2 outputs
        (64, 8, 9),  # 8, then 1
        (65, 8, 12),  # 9, then 2, then 1
        (5, 2, 6),  # 3, 2, 1
    ],
)
def test_reduce_tree_calls(summaries: int, fan_in: int, calls: int) -> None:
    assert reduce_calls(summaries, fan_in) == calls


def test_mapreduce_maps_every_chunk_and_reduces_as_a_tree() -> None:
    assert MapReduce().chunks == (2, 24) and MapReduce().fan_in == 8
    for c in sample("mapreduce", 200):
        assert 2 <= c["mapper"] <= 24
        assert c["reducer"] == reduce_calls(c["mapper"], 8)


def test_react_turns_are_bounded_and_reviews_follow_final_answers() -> None:
    # a review only follows a proposed answer; the loop ends on acceptance or after 12 turns
    wf = ReactAgent()
    for c in sample("react", 200):
        assert 1 <= c["planner"] <= wf.max_turns
        assert c["reviewer"] <= c["planner"]


def test_programs_are_deterministic_per_seed() -> None:
    for name, wf in WORKFLOWS.items():
        a, _ = run_instantly(wf.program(np.random.default_rng([3, 5])))
        b, _ = run_instantly(wf.program(np.random.default_rng([3, 5])))
        c, _ = run_instantly(wf.program(np.random.default_rng([3, 6])))
        assert a == b, name
        assert a != c, name


def test_run_instantly_drives_nested_parallel_programs() -> None:
    def branch(tokens: int) -> Program:
        yield Llm("m", tokens, 1)
        yield Llm("m", tokens + 1, 1)
        return tokens

    def program() -> Program:
        results = yield Parallel((branch(10), Tool("t", 0.5), Llm("n", 3, 2)))
        assert results[0] == 10
        yield Parallel(())

    calls, tools = run_instantly(program())
    assert [(c.model, c.prompt_tokens) for c in calls] == [("m", 10), ("m", 11), ("n", 3)]
    assert [t.seconds for t in tools] == [0.5]


def test_lengths_are_clipped_and_exact_without_spread() -> None:
    rng = np.random.default_rng(0)
    assert Lengths(100.4).draw(rng) == 100
    drawn = Lengths(100, 2.0, 10, 300).draws(rng, 2000)
    assert min(drawn) >= 10 and max(drawn) <= 300
    with pytest.raises(InvalidInputError):
        Lengths(0)


def test_unknown_workflow_names_the_choices() -> None:
    with pytest.raises(InvalidInputError, match="beam, composite, coserve, mapreduce, rag, react"):
        workflow("nope")


def test_a_mix_runs_each_part_by_share_and_shares_renamed_llms() -> None:
    mix = coserve((0.6, 0.4))
    # beam's policy is served by RAG's generator deployment
    assert mix.models == {"generator": GENERATOR, "prm": PRM, "reranker": RERANKER}
    parts = [mix.part_of(5, i).name for i in range(400)]
    assert parts.count("rag") / len(parts) == pytest.approx(0.6, abs=0.08)
    for i in range(30):
        calls, _ = run_instantly(mix.program(np.random.default_rng([5, i])))
        models = {c.model for c in calls}
        expected = {"generator", "reranker"} if parts[i] == "rag" else {"generator", "prm"}
        assert models == expected
    with pytest.raises(InvalidInputError, match="'generator' is"):
        other = RagReranker(name="rag2", models={"generator": POLICY, "reranker": RERANKER})
        Mix("bad", (RagReranker(), other), (0.5, 0.5))
    with pytest.raises(InvalidInputError, match="sum to 1"):
        Mix("bad", (RagReranker(),), (0.5,))
