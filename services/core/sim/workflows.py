"""The five evaluation workflows, as programs (``services.core.sim.program``).

Each is a frozen dataclass whose fields are the workflow's parameters (token-length and tool-time
distributions, fan-out, loop limits) with defaults sized like the public workloads they imitate;
``program(rng)`` is one request, ``mean_calls()`` the expected calls per LLM, derived from the
definition in its docstring.

1. ``RagReranker`` - retrieve (tool), the reranker scores K candidates in parallel, the generator
   answers from the best ``top_n``.
2. ``BeamSearch`` - Snell et al. style search with a process reward model: N candidates per round
   (N/M beams x M continuations), all generated, then all scored by the PRM; each beam reaches an
   answer with probability ``p_answer`` per round; at most ``max_rounds`` rounds.
3. ``Composite`` - RAG retrieval and reranking feeding a beam search that writes the answer.
4. ``ReactAgent`` - a planner thinks, calls tools, and at some point proposes an answer that a
   reviewer accepts or sends back; data-dependent number of turns.
5. ``MapReduce`` - a document of C chunks summarised in parallel, then reduced in a tree of
   ``fan_in``-wide reduce calls.

Co-serving: ``Mix`` serves several workflows on one cluster (each request is one of its parts,
drawn by share), ``Renamed`` makes two workflows call the same deployed LLM. ``coserve`` is RAG
and a beam search whose policy is RAG's generator (one shared Llama-3.1-8B deployment).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInputError
from services.core.sim.program import Lengths, Llm, Parallel, Program, Seconds, Tool, Workflow

RERANKER = "Qwen/Qwen3-Reranker-4B"
GENERATOR = "meta-llama/Llama-3.1-8B"
POLICY = "meta-llama/Llama-3.2-1B"
PRM = "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"


def _uniform_mean(lo: int, hi: int) -> float:
    return (lo + hi) / 2


def _check_range(name: str, lo: int, hi: int) -> None:
    if not 1 <= lo <= hi:
        raise InvalidInputError(f"{name}: need 1 <= low <= high, got ({lo}, {hi})")


# ------------------------------------------------------------------------------------- RAG
_RAG_QUERY = Lengths(80, 0.5, 8, 512)
_RAG_PASSAGE = Lengths(350, 0.4, 32, 1024)
_RAG_ANSWER = Lengths(250, 0.6, 16, 1024)
_RAG_RETRIEVAL = Seconds(0.03, 0.3)


@dataclass(frozen=True, slots=True)
class RagReranker:
    """Retrieve (``retrieval`` s), rerank K ~ uniform{``candidates``} passages in parallel (one
    reranker call each: query + passage, 1 output token), answer with the generator over the
    ``top_n`` best passages. Calls: reranker E[K], generator 1."""

    name: str = "rag"
    candidates: tuple[int, int] = (8, 32)
    top_n: int = 4
    query: Lengths = _RAG_QUERY
    passage: Lengths = _RAG_PASSAGE
    instructions: int = 120
    answer: Lengths = _RAG_ANSWER
    retrieval: Seconds = _RAG_RETRIEVAL
    models: Mapping[str, str] = field(
        default_factory=lambda: {"reranker": RERANKER, "generator": GENERATOR}
    )

    def __post_init__(self) -> None:
        _check_range(f"{self.name}: candidates", *self.candidates)

    def retrieve(self, rng: np.random.Generator) -> Program:
        """Retrieval and reranking; returns (query tokens, tokens of the top passages)."""
        query = self.query.draw(rng)
        yield Tool("retrieve", self.retrieval.draw(rng))
        k = int(rng.integers(self.candidates[0], self.candidates[1] + 1))
        passages = self.passage.draws(rng, k)
        yield Parallel(tuple(Llm("reranker", self.instructions + query + p, 1) for p in passages))
        best = sorted(passages, reverse=True)[: self.top_n]  # stands in for the best scores
        return query, sum(best)

    def program(self, rng: np.random.Generator) -> Program:
        query, context = yield from self.retrieve(rng)
        yield Llm("generator", self.instructions + query + context, self.answer.draw(rng))

    def mean_calls(self) -> dict[str, float]:
        return {"reranker": _uniform_mean(*self.candidates), "generator": 1.0}


# ------------------------------------------------------------------------------------- beam
_BEAM_QUESTION = Lengths(120, 0.5, 16, 1024)
_BEAM_STEP = Lengths(80, 0.6, 8, 384)


@dataclass(frozen=True, slots=True)
class BeamSearch:
    """Beam search over reasoning steps with a process reward model (PRM).

    N is drawn per request from ``n_choices`` with ``n_weights`` (default: N = 16 for every
    request, a fixed search budget as in Snell et al.; any mix of N in 4-256 works);
    B = max(1, N // ``width``) beams start.
    Each round every active beam proposes ``width`` next steps (policy calls over the question
    and the beam's steps so far), then the PRM scores every proposal (prompt: the beam plus the
    proposal, 1 output token); each beam keeps its best proposal and, with probability
    ``p_answer``, that proposal completes the answer and the beam stops. At most ``max_rounds``
    rounds. A beam lives L ~ Geometric(p) rounds capped at R, E[min(L, R)] = (1 - (1-p)^R) / p,
    so E[policy calls] = E[PRM calls] = width x E[B] x (1 - (1-p)^R) / p.
    """

    name: str = "beam"
    n_choices: tuple[int, ...] = (16,)
    n_weights: tuple[float, ...] = (1.0,)
    width: int = 4
    max_rounds: int = 40
    p_answer: float = 0.15
    system: int = 200  # instructions and few-shot prefix of every policy and PRM prompt
    question: Lengths = _BEAM_QUESTION
    step: Lengths = _BEAM_STEP
    models: Mapping[str, str] = field(default_factory=lambda: {"policy": POLICY, "prm": PRM})

    def __post_init__(self) -> None:
        if len(self.n_choices) != len(self.n_weights) or not self.n_choices:
            raise InvalidInputError(f"{self.name}: n_choices and n_weights differ in length")
        if abs(sum(self.n_weights) - 1) > 1e-9 or min(self.n_weights) < 0:
            raise InvalidInputError(f"{self.name}: n_weights must be >= 0 and sum to 1")
        if self.width < 1 or self.max_rounds < 1 or not 0 < self.p_answer <= 1:
            raise InvalidInputError(
                f"{self.name}: need width >= 1, max_rounds >= 1, 0 < p_answer <= 1"
            )

    def beams(self, n: int) -> int:
        return max(1, n // self.width)

    def search(self, rng: np.random.Generator, context: int) -> Program:
        """The rounds of one search over a prompt of ``context`` tokens; returns the rounds run."""
        n = int(rng.choice(np.asarray(self.n_choices), p=np.asarray(self.n_weights)))
        beams = [0] * self.beams(n)  # tokens of each active beam's steps so far
        rounds = 0
        while beams and rounds < self.max_rounds:
            rounds += 1
            steps = [self.step.draws(rng, self.width) for _ in beams]
            prefix = [self.system + context + b for b in beams]
            yield Parallel(
                tuple(
                    Llm("policy", p, s) for p, cand in zip(prefix, steps, strict=True) for s in cand
                )
            )
            yield Parallel(
                tuple(
                    Llm("prm", p + s, 1)
                    for p, cand in zip(prefix, steps, strict=True)
                    for s in cand
                )
            )
            best = [cand[int(rng.integers(self.width))] for cand in steps]
            answered = rng.random(len(beams)) < self.p_answer
            beams = [b + s for b, s, done in zip(beams, best, answered, strict=True) if not done]
        return rounds

    def program(self, rng: np.random.Generator) -> Program:
        yield from self.search(rng, self.question.draw(rng))

    def mean_beams(self) -> float:
        return sum(w * self.beams(n) for n, w in zip(self.n_choices, self.n_weights, strict=True))

    def mean_rounds_per_beam(self) -> float:
        q = 1 - self.p_answer
        return (1 - q**self.max_rounds) / self.p_answer

    def mean_calls(self) -> dict[str, float]:
        calls = self.width * self.mean_beams() * self.mean_rounds_per_beam()
        return {"policy": calls, "prm": calls}


# ------------------------------------------------------------------------------------- composite
@dataclass(frozen=True, slots=True)
class Composite:
    """RAG feeding beam search: retrieval and reranking as in ``rag``, then a beam search whose
    question is the query plus the best passages. Calls: reranker E[K], policy and PRM as in
    ``beam``."""

    name: str = "composite"
    rag: RagReranker = RagReranker(candidates=(8, 16), top_n=3)
    beam: BeamSearch = BeamSearch()
    models: Mapping[str, str] = field(
        default_factory=lambda: {"reranker": RERANKER, "policy": POLICY, "prm": PRM}
    )

    def program(self, rng: np.random.Generator) -> Program:
        query, context = yield from self.rag.retrieve(rng)
        yield from self.beam.search(rng, query + context)

    def mean_calls(self) -> dict[str, float]:
        beam = self.beam.mean_calls()
        return {"reranker": self.rag.mean_calls()["reranker"], **beam}


# ------------------------------------------------------------------------------------- ReAct
_REACT_TASK = Lengths(150, 0.6, 16, 2048)
_REACT_THOUGHT = Lengths(120, 0.6, 16, 512)
_REACT_OBSERVATION = Lengths(300, 0.8, 16, 2048)
_REACT_VERDICT = Lengths(60, 0.5, 4, 256)
_REACT_TOOL_TIME = Seconds(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class ReactAgent:
    """A ReAct loop. Each turn the planner reads the history and writes a thought. With
    probability ``p_final`` it proposes the answer and the reviewer checks it, accepting with
    probability ``p_accept`` (the request ends); otherwise the planner calls 1-``max_tools``
    tools in parallel and their observations join the history. At most ``max_turns`` turns.
    With s = p_final x p_accept, turns T: P(T >= t) = (1 - s)^(t-1) for t <= max_turns, so
    E[planner calls] = E[T] = (1 - (1-s)^max_turns) / s and E[reviewer calls] = p_final x E[T].
    """

    name: str = "react"
    system: int = 900
    task: Lengths = _REACT_TASK
    thought: Lengths = _REACT_THOUGHT
    observation: Lengths = _REACT_OBSERVATION
    verdict: Lengths = _REACT_VERDICT
    tool_time: Seconds = _REACT_TOOL_TIME
    max_tools: int = 3
    p_final: float = 0.3
    p_accept: float = 0.7
    max_turns: int = 12
    models: Mapping[str, str] = field(
        default_factory=lambda: {"planner": "Qwen/Qwen3-8B", "reviewer": "meta-llama/Llama-3.2-3B"}
    )

    def program(self, rng: np.random.Generator) -> Program:
        history = self.system + self.task.draw(rng)
        for _ in range(self.max_turns):
            thought = self.thought.draw(rng)
            yield Llm("planner", history, thought)
            history += thought
            if rng.random() < self.p_final:
                yield Llm("reviewer", history, self.verdict.draw(rng))
                if rng.random() < self.p_accept:
                    return
                continue
            tools = int(rng.integers(1, self.max_tools + 1))
            yield Parallel(tuple(Tool("tool", self.tool_time.draw(rng)) for _ in range(tools)))
            history += sum(self.observation.draws(rng, tools))

    def mean_calls(self) -> dict[str, float]:
        s = self.p_final * self.p_accept
        turns = (1 - (1 - s) ** self.max_turns) / s
        return {"planner": turns, "reviewer": self.p_final * turns}


# ------------------------------------------------------------------------------------- map-reduce
def reduce_calls(summaries: int, fan_in: int) -> int:
    """Reduce calls of a tree over ``summaries`` partial summaries, ``fan_in`` per call: levels
    of ceil(n / fan_in) calls until one summary is left (always at least one call)."""
    calls, n = 0, summaries
    while True:
        groups = -(-n // fan_in)
        calls += groups
        if groups == 1:
            return calls
        n = groups


_MAPREDUCE_CHUNK = Lengths(1800, 0.2, 256, 2048)
_MAPREDUCE_SUMMARY = Lengths(150, 0.4, 16, 512)
_MAPREDUCE_FINAL = Lengths(350, 0.4, 32, 1024)


@dataclass(frozen=True, slots=True)
class MapReduce:
    """Summarise a document of C ~ uniform{``chunks``} chunks: one mapper call per chunk in
    parallel, then reduce calls of up to ``fan_in`` summaries each, level by level, until one
    is left. Calls: mapper E[C], reducer E[reduce_calls(C, fan_in)]."""

    name: str = "mapreduce"
    chunks: tuple[int, int] = (2, 24)
    chunk: Lengths = _MAPREDUCE_CHUNK
    instructions: int = 100
    summary: Lengths = _MAPREDUCE_SUMMARY
    final: Lengths = _MAPREDUCE_FINAL
    fan_in: int = 8
    models: Mapping[str, str] = field(
        default_factory=lambda: {"mapper": "meta-llama/Llama-3.2-3B", "reducer": GENERATOR}
    )

    def __post_init__(self) -> None:
        _check_range(f"{self.name}: chunks", *self.chunks)
        if self.fan_in < 2:
            raise InvalidInputError(f"{self.name}: fan_in must be >= 2, got {self.fan_in}")

    def program(self, rng: np.random.Generator) -> Program:
        c = int(rng.integers(self.chunks[0], self.chunks[1] + 1))
        chunks = self.chunk.draws(rng, c)
        summaries = self.summary.draws(rng, c)
        yield Parallel(
            tuple(
                Llm("mapper", self.instructions + x, s)
                for x, s in zip(chunks, summaries, strict=True)
            )
        )
        while True:
            groups = [summaries[i : i + self.fan_in] for i in range(0, len(summaries), self.fan_in)]
            last = len(groups) == 1
            lengths = [self.final.draw(rng) if last else self.summary.draw(rng) for _ in groups]
            yield Parallel(
                tuple(
                    Llm("reducer", self.instructions + sum(g), n)
                    for g, n in zip(groups, lengths, strict=True)
                )
            )
            if last:
                return
            summaries = lengths

    def mean_calls(self) -> dict[str, float]:
        lo, hi = self.chunks
        sizes = range(lo, hi + 1)
        return {
            "mapper": _uniform_mean(lo, hi),
            "reducer": sum(reduce_calls(c, self.fan_in) for c in sizes) / len(sizes),
        }


# ------------------------------------------------------------------------------------- co-serving
@dataclass(frozen=True, slots=True)
class Renamed:
    """``base`` with its deployment names changed by ``names`` (others kept), so that two
    workflows can call one deployed LLM; ``name`` is the workflow's own."""

    base: Workflow
    names: Mapping[str, str]
    name: str

    @property
    def models(self) -> Mapping[str, str]:
        return {self.names.get(k, k): v for k, v in self.base.models.items()}

    def program(self, rng: np.random.Generator) -> Program:
        return self._renamed(self.base.program(rng))

    def _renamed(self, gen: Program) -> Program:
        value = None
        while True:
            try:
                step = gen.send(value)
            except StopIteration as stop:
                return stop.value
            value = yield self._step(step)

    def _step(self, step: Any) -> Any:
        if isinstance(step, Llm):
            model = self.names.get(step.model, step.model)
            return Llm(model, step.prompt_tokens, step.completion_tokens)
        if isinstance(step, Parallel):
            return Parallel(tuple(self._step(b) for b in step.branches))
        if isinstance(step, Tool):
            return step
        return self._renamed(step)

    def mean_calls(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.base.mean_calls().items():
            key = self.names.get(k, k)
            out[key] = out.get(key, 0.0) + v
        return out


@dataclass(frozen=True, slots=True)
class Mix:
    """Several workflows served at once: each request is part i with probability
    ``shares[i]`` (Poisson arrivals of the mix are then independent Poisson arrivals of each
    part). The part is the request generator's first draw (``part_of``), so it is known from
    the seed and the request's index alone. Parts calling the same deployment name share that
    LLM, which must then be the same catalogue model."""

    name: str
    parts: tuple[Workflow, ...]
    shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.shares) or not self.parts:
            raise InvalidInputError(f"{self.name}: one share per part, at least one part")
        if abs(sum(self.shares) - 1) > 1e-9 or min(self.shares) <= 0:
            raise InvalidInputError(f"{self.name}: shares must be > 0 and sum to 1")
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"{self.name}: part names repeat: {names}")
        seen: dict[str, str] = {}
        for part in self.parts:
            for k, v in part.models.items():
                if seen.setdefault(k, v) != v:
                    raise InvalidInputError(
                        f"{self.name}: {k!r} is {seen[k]} in one part and {v} in another"
                    )

    @property
    def models(self) -> Mapping[str, str]:
        out: dict[str, str] = {}
        for part in self.parts:
            out.update(part.models)
        return dict(sorted(out.items()))

    def part_index(self, rng: np.random.Generator) -> int:
        draw = rng.random()
        bounds = np.cumsum(self.shares)
        return min(int(np.searchsorted(bounds, draw, side="right")), len(self.parts) - 1)

    def part_of(self, seed: int, index: int) -> Workflow:
        """The part that request ``index`` of a simulation with ``seed`` runs."""
        return self.parts[self.part_number(seed, index)]

    def part_number(self, seed: int, index: int) -> int:
        """The index in ``parts`` of ``part_of(seed, index)``."""
        return self.part_index(np.random.default_rng([seed, index]))

    def groups(self, seed: int, requests: int) -> npt.NDArray[np.int64]:
        """Per request of a simulation of ``requests`` requests with ``seed``, its part's
        index (``measure.measure``'s ``groups``)."""
        return np.fromiter(
            (self.part_number(seed, i) for i in range(requests)), np.int64, count=requests
        )

    def program(self, rng: np.random.Generator) -> Program:
        result = yield from self.parts[self.part_index(rng)].program(rng)
        return result

    def mean_calls(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part, share in zip(self.parts, self.shares, strict=True):
            for k, v in part.mean_calls().items():
                out[k] = out.get(k, 0.0) + share * v
        return out


def coserve(shares: tuple[float, float] = (0.9, 0.1)) -> Mix:
    """RAG and beam search sharing the generator: beam's policy is RAG's Llama-3.1-8B."""
    beam = BeamSearch(models={"policy": GENERATOR, "prm": PRM})
    return Mix("coserve", (RagReranker(), Renamed(beam, {"policy": "generator"}, "beam")), shares)


WORKFLOWS: Mapping[str, Workflow] = {
    "rag": RagReranker(),
    "beam": BeamSearch(),
    "composite": Composite(),
    "react": ReactAgent(),
    "mapreduce": MapReduce(),
    "coserve": coserve(),
}


def workflow(name: str) -> Workflow:
    """The workflow registered under ``name``; ``InvalidInputError`` naming the choices if none."""
    found = WORKFLOWS.get(name)
    if found is None:
        raise InvalidInputError(
            f"workflow: unknown {name!r} (choose from {', '.join(sorted(WORKFLOWS))})"
        )
    return found
