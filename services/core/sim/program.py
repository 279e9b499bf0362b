"""Workflow programs: ordinary Python generators that call LLMs and tools.

A workflow request is a generator (a ``Program``) that yields what it wants done and receives the
result when it is done:

- ``yield Llm(model, prompt_tokens, completion_tokens)`` -> an ``LlmResult``;
- ``yield Tool(name, seconds)`` -> a ``ToolResult`` (tools take wall time, no GPU);
- ``yield Parallel((a, b, ...))`` -> a tuple of results in branch order, once all are done; a
  branch is an ``Llm``, a ``Tool`` or another ``Program`` (whose return value is its result);
- ``yield from sub_program(...)`` composes programs sequentially.

A program's control flow may depend on anything it computed and on the random generator it is
given, but never on timing: the same generator state gives the same calls whatever the cluster,
so every system compared in the simulator serves exactly the same requests (common random
numbers), and a program is deterministic per seed. ``completion_tokens`` is the length the LLM
will generate: in the simulator the engine runs exactly that many decode steps; a driver for real
engines sends ``max_tokens`` with ``ignore_eos`` and a prompt of ``prompt_tokens`` tokens.

The discrete-event simulator (``services.core.sim.simulator``) drives programs synchronously; a
driver for the real router does the same with awaits (send the step, await the call, ``send``
the result back), which is why steps are plain data.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.core.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class Llm:
    """One LLM call: ``model`` is the deployment name of the LLM (as in traces)."""

    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool call (retrieval, code execution, web search): ``seconds`` of wall time."""

    name: str
    seconds: float


Program = Generator["Step", Any, Any]


@dataclass(frozen=True, slots=True)
class Parallel:
    """Branches run concurrently; the result is the tuple of their results, in order."""

    branches: tuple[Llm | Tool | Program, ...]


Step = Llm | Tool | Parallel


@dataclass(frozen=True, slots=True)
class LlmResult:
    model: str
    prompt_tokens: int
    completion_tokens: int
    start: float  # s, when the call was sent
    end: float  # s, its last token
    ttft: float  # s, time to its first token
    replica: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    name: str
    start: float
    end: float


class Workflow(Protocol):
    """A workflow definition: its LLMs and the program of one request.

    ``models`` maps the deployment names its programs call to catalogue models;
    ``mean_calls`` is the expected number of calls per request to each LLM, derived from the
    definition (the tests check simulated programs against it).
    """

    @property
    def name(self) -> str: ...

    @property
    def models(self) -> Mapping[str, str]: ...

    def program(self, rng: np.random.Generator) -> Program: ...

    def mean_calls(self) -> dict[str, float]: ...


@dataclass(frozen=True, slots=True)
class Lengths:
    """A token-length distribution: log-normal with ``mean`` and coefficient of variation
    ``cv`` (0: always ``mean``), rounded and clipped to [``lo``, ``hi``]."""

    mean: float
    cv: float = 0.0
    lo: int = 1
    hi: int = 1 << 20

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.cv >= 0 and 1 <= self.lo <= self.hi):
            raise InvalidInputError(
                f"lengths: need mean > 0, cv >= 0, 1 <= lo <= hi; got {self.mean}, {self.cv}, "
                f"{self.lo}, {self.hi}"
            )

    def draw(self, rng: np.random.Generator) -> int:
        if self.cv == 0:
            return min(max(round(self.mean), self.lo), self.hi)
        sigma2 = math.log1p(self.cv * self.cv)
        value = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2))
        return min(max(round(value), self.lo), self.hi)

    def draws(self, rng: np.random.Generator, n: int) -> list[int]:
        if self.cv == 0:
            return [self.draw(rng)] * n
        sigma2 = math.log1p(self.cv * self.cv)
        values = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size=n)
        return [int(v) for v in np.clip(np.rint(values), self.lo, self.hi)]


@dataclass(frozen=True, slots=True)
class Seconds:
    """A duration distribution: log-normal with ``mean`` and ``cv`` (0: always ``mean``)."""

    mean: float
    cv: float = 0.0

    def __post_init__(self) -> None:
        if not (self.mean >= 0 and self.cv >= 0):
            raise InvalidInputError(f"seconds: need mean >= 0, cv >= 0; got {self.mean}, {self.cv}")

    def draw(self, rng: np.random.Generator) -> float:
        if self.cv == 0 or self.mean == 0:
            return self.mean
        sigma2 = math.log1p(self.cv * self.cv)
        return float(rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2)))


def run_instantly(program: Program) -> tuple[list[Llm], list[Tool]]:
    """Drive ``program`` with zero-latency results; the LLM and tool calls it makes, in order.

    For tests and dry runs: since programs never depend on timing, these are exactly the calls
    the simulator will see for the same random generator state.
    """
    calls: list[Llm] = []
    tools: list[Tool] = []

    def step_result(step: Llm | Tool | Program) -> Any:
        if isinstance(step, Llm):
            calls.append(step)
            return LlmResult(step.model, step.prompt_tokens, step.completion_tokens, 0, 0, 0, "-")
        if isinstance(step, Tool):
            tools.append(step)
            return ToolResult(step.name, 0.0, 0.0)
        return drive(step)

    def drive(gen: Program) -> Any:
        value: Any = None
        while True:
            try:
                step = gen.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(step, Parallel):
                value = tuple(step_result(b) for b in step.branches)
            else:
                value = step_result(step)

    drive(program)
    return calls, tools
