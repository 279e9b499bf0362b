"""A workflow made from a trace: traced requests replayed wave by wave.

What a planner knows of a workflow is its trace, not its program. ``TraceReplay.of(trace,
workflow)`` turns every traced request into a sequence of **waves**: calls of one request that
started before any of them ended cannot depend on one another, so they form one wave (a
``Parallel``); a call that starts after some call of the wave ended opens the next wave. Between
waves the request waits the traced gap (tool time: from the previous wave's last end to the next
wave's first start), and before its first wave and after its last the traced gaps to the
request's own start and end (retrieval, a final tool). A replayed request is one traced request
drawn uniformly by the simulator's per-request generator, with its calls' token counts.

``StratifiedReplay`` draws the traced requests of a run of n requests stratified by their work
(the traced LLM time of each): a systematic sample of the requests sorted by work, in random
order. The run then carries the trace's mean work within O(1/n) rather than O(1/sqrt(n)), which
matters where a few requests carry most of it (co-serving RAG with a 10% share of beam search:
CV 2.3; one allocation at one rate scored 5.4-7.0 s over six seeds of 2,175 iid draws, where
long runs measure 6.5 s); the order, and so how heavy requests bunch in time, stays random.
``StratifiedMix`` does the same for several workflows served at once, each at exactly its
share of the run's requests.

The waves keep what the ALP's closed form loses: fan-outs arriving together, and stages that
alternate behind a barrier each round (beam search's policy and reward model). They lose
dependencies finer than a wave (a branch of a ``Parallel`` that goes on alone while another
still runs waits for the whole wave here), so the replay errs towards more latency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.core.errors import InvalidInputError
from services.core.sim.program import Llm, Parallel, Program, Tool
from services.core.sim.workflows import Mix
from services.core.workload.trace import Trace, TraceCall

# (gap before the wave in s, the wave's calls as (model, prompt tokens, completion tokens))
Wave = tuple[float, tuple[tuple[str, int, int], ...]]


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    waves: tuple[Wave, ...]
    tail: float  # s after the last wave until the request ended


def waves_of(calls: list[TraceCall], start: float | None, end: float | None) -> ReplayRequest:
    """The waves of one request's calls (module docstring); ``start``/``end`` of the request
    when traced (else the first call's start and the last call's end)."""
    ordered = sorted(calls, key=lambda c: (c.start, c.end))
    waves: list[Wave] = []
    current: list[TraceCall] = []
    previous_end = ordered[0].start if start is None else min(start, ordered[0].start)
    for call in ordered:
        if current and call.start >= min(c.end for c in current):
            waves.append(_wave(current, previous_end))
            previous_end = max(c.end for c in current)
            current = []
        current.append(call)
    waves.append(_wave(current, previous_end))
    last = max(c.end for c in current)
    tail = max(0.0, (end if end is not None else last) - last)
    return ReplayRequest(tuple(waves), tail)


def _wave(calls: list[TraceCall], previous_end: float) -> Wave:
    gap = max(0.0, min(c.start for c in calls) - previous_end)
    return gap, tuple((c.model, c.prompt_tokens, c.completion_tokens) for c in calls)


@dataclass(frozen=True, slots=True)
class TraceReplay:
    """A ``program.Workflow`` that replays traced requests (module docstring)."""

    name: str
    models: Mapping[str, str]  # deployment name -> catalogue model, as the traced workflow's
    requests: tuple[ReplayRequest, ...]
    work: tuple[float, ...] = ()  # per request, its calls' summed traced durations (s)
    request_ids: tuple[str, ...] = ()  # per request, its id in the trace

    @classmethod
    def of(cls, trace: Trace, workflow: str, models: Mapping[str, str]) -> TraceReplay:
        """The replay of ``workflow``'s successful requests in ``trace``.

        Raises ``InvalidInputError`` when the trace has no call of that workflow or calls a
        model that ``models`` does not name.
        """
        by_request: dict[str, list[TraceCall]] = {}
        for c in trace.calls:
            if c.workflow == workflow and c.status == "ok":
                by_request.setdefault(c.request_id, []).append(c)
        if not by_request:
            raise InvalidInputError(f"trace: no successful call of workflow {workflow!r}")
        unknown = sorted({c.model for cs in by_request.values() for c in cs} - set(models))
        if unknown:
            raise InvalidInputError(f"trace: {workflow} calls models {unknown} not in the spec")
        spans = {r.request_id: r for r in trace.requests if r.workflow == workflow}
        requests, work, ids = [], [], sorted(by_request)
        for rid in ids:
            span = spans.get(rid)
            calls = by_request[rid]
            requests.append(
                waves_of(
                    calls,
                    span.start if span is not None else None,
                    span.end if span is not None else None,
                )
            )
            work.append(sum(c.end - c.start for c in calls))
        return cls(workflow, dict(models), tuple(requests), tuple(work), tuple(ids))

    def program(self, rng: np.random.Generator) -> Program:
        return request_program(self.requests[int(rng.integers(len(self.requests)))])

    def mean_calls(self) -> dict[str, float]:
        counts: dict[str, float] = dict.fromkeys(self.models, 0.0)
        for r in self.requests:
            for _, calls in r.waves:
                for m, _, _ in calls:
                    counts[m] += 1
        return {m: n / len(self.requests) for m, n in counts.items()}


@dataclass(frozen=True, slots=True)
class StratifiedReplay:
    """``base``'s traced requests for a run of ``len(order)`` requests, stratified by work
    (module docstring): request i of the run replays traced request ``order[i]``."""

    base: TraceReplay
    order: tuple[int, ...]

    @classmethod
    def of(cls, base: TraceReplay, requests: int, seed: int) -> StratifiedReplay:
        """The stratified draw of ``requests`` requests (at least one) with ``seed``: every
        traced request ``requests // N`` times, then a systematic sample of the rest over the
        requests sorted by work (by tokens when the replay has no traced durations)."""
        if requests < 1:
            raise InvalidInputError(f"requests: need at least 1, got {requests}")
        n = len(base.requests)
        size = base.work if len(base.work) == n else tuple(_tokens(r) for r in base.requests)
        by_work = np.argsort(np.asarray(size, dtype=float), kind="stable")
        rng = np.random.default_rng(seed)
        whole, rest = divmod(requests, n)
        picked = np.tile(by_work, whole)
        if rest:
            positions = ((rng.random() + np.arange(rest)) * n / rest).astype(np.int64)
            picked = np.concatenate([picked, by_work[np.minimum(positions, n - 1)]])
        return cls(base, tuple(int(i) for i in rng.permutation(picked)))

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def models(self) -> Mapping[str, str]:
        return self.base.models

    def program(self, rng: np.random.Generator) -> Program:
        return self.base.program(rng)

    def program_at(self, index: int, rng: np.random.Generator) -> Program:
        """Request ``index`` of the run (past the run's length: a uniform draw)."""
        if index >= len(self.order):
            return self.base.program(rng)
        return request_program(self.base.requests[self.order[index]])

    def mean_calls(self) -> dict[str, float]:
        return self.base.mean_calls()


@dataclass(frozen=True, slots=True)
class StratifiedMix:
    """A run of several workflows' replays served at once, each at exactly its share of the
    run's requests (module docstring): request i of the run is request ``index[i]`` of part
    ``part[i]``'s stratified run. A ``workflows.Mix`` draws each request's part, so a run (and a
    trace of one) holds a draw of the shares; for co-serving RAG with a 10% share of beam
    search, whose requests carry most of the latency, a traced 8,000 requests held 9.66% beam,
    and runs replayed from it scored one allocation at 7.17-7.65 s on four seeds of 8,788
    requests where the program measured 7.00-8.84 s (mean 7.97 s)."""

    mix: Mix  # its parts are ``TraceReplay``s
    parts: tuple[StratifiedReplay, ...]  # per part of ``mix``, its stratified run
    part: tuple[int, ...]  # per request of the run, its part
    index: tuple[int, ...]  # ... and its position in that part's run

    @classmethod
    def of(cls, mix: Mix, requests: int, seed: int) -> StratifiedMix:
        """The run of ``requests`` requests (at least one) with ``seed``: part k's
        ``requests x shares[k]`` rounded by largest remainder, each part's drawn stratified
        (``StratifiedReplay.of``, its seed drawn from ``[seed, k]``), in random order. Raises
        ``InvalidInputError`` unless every part of ``mix`` is a ``TraceReplay``."""
        if requests < 1:
            raise InvalidInputError(f"requests: need at least 1, got {requests}")
        replays = [p for p in mix.parts if isinstance(p, TraceReplay)]
        if len(replays) != len(mix.parts):
            raise InvalidInputError(f"{mix.name}: every part must be a trace replay")
        exact = np.asarray(mix.shares, dtype=float) * requests
        counts = np.floor(exact).astype(np.int64)
        left = requests - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1
        runs = tuple(
            StratifiedReplay.of(p, max(int(c), 1), _part_seed(seed, k))
            for k, (p, c) in enumerate(zip(replays, counts, strict=True))
        )
        part = np.repeat(np.arange(len(replays)), counts)
        index = np.concatenate([np.arange(c) for c in counts])
        order = np.random.default_rng(seed).permutation(requests)
        return cls(
            mix, runs, tuple(int(k) for k in part[order]), tuple(int(i) for i in index[order])
        )

    @property
    def name(self) -> str:
        return self.mix.name

    @property
    def models(self) -> Mapping[str, str]:
        return self.mix.models

    def program(self, rng: np.random.Generator) -> Program:
        """A request past the run's length: the mix's own draw."""
        return self.mix.program(rng)

    def program_at(self, index: int, rng: np.random.Generator) -> Program:
        if index >= len(self.part):
            return self.program(rng)
        return self.parts[self.part[index]].program_at(self.index[index], rng)

    def groups(self, requests: int) -> npt.NDArray[np.int64]:
        """Per request of the run's first ``requests`` (at most its length), its part
        (``measure.measure``'s ``groups``)."""
        if requests > len(self.part):
            raise InvalidInputError(f"requests: the run has {len(self.part)}, asked {requests}")
        return np.asarray(self.part[:requests], dtype=np.int64)

    def mean_calls(self) -> dict[str, float]:
        return self.mix.mean_calls()


def _part_seed(seed: int, part: int) -> int:
    return int(np.random.default_rng([seed, part]).integers(2**31))


def _tokens(request: ReplayRequest) -> int:
    return sum(p + c for _, calls in request.waves for _, p, c in calls)


def request_program(request: ReplayRequest) -> Program:
    """One replayed request as a program: its waves, the traced gaps between them as tools."""
    for gap, calls in request.waves:
        if gap > 0:
            yield Tool("gap", gap)
        steps = tuple(Llm(m, p, c) for m, p, c in calls)
        yield steps[0] if len(steps) == 1 else Parallel(steps)
    if request.tail > 0:
        yield Tool("gap", request.tail)
