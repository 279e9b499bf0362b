"""Drive LLM calls and whole workflow programs against real engines or the router, with asyncio.

One call (``send_completion``) is an OpenAI ``/v1/completions`` request, streamed so that the time
to the first token is seen, with a prompt of exactly ``prompt_tokens`` token ids (drawn at random,
so no prefix cache hits) and ``max_tokens = completion_tokens`` with ``ignore_eos``: the engine
does the work the program asked for, as the simulator's engine does. A call that fails (HTTP
error, an error event inside the stream, a refused connection, its deadline) is a
``CallOutcome`` with ``error`` set, never an exception.

``WorkflowDriver`` runs the simulator's workflow programs (``services.core.sim.program``) on the
real router: each request is a program driven with awaits (an ``Llm`` step becomes a call
tagged with the workflow name and request id, a ``Tool`` step sleeps its seconds, a
``Parallel`` step gathers its branches); requests arrive as a Poisson process at a target rate
(or at replayed offsets). The same workflow definition serves the simulator and real engines.
Each request's span (arrival to last step, tool time included) is kept as a trace ``request``
record and, given a store, appended to the router's trace stream beside the calls the router
records, so the statistics built from that trace count the tool time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from services.core.errors import InvalidInputError
from services.core.sim.program import (
    Llm,
    LlmResult,
    Parallel,
    Program,
    Tool,
    ToolResult,
    Workflow,
)
from services.core.workload.trace import Status, Trace, TraceCall, TraceRequest, dumps
from services.router.schema import REQUEST_ID_HEADER, WORKFLOW_HEADER
from services.runtime.store import Store

# Token ids of the random prompts: above the special tokens of small vocabularies, below every
# real vocabulary's size (the tiny test model has 10000 entries).
TOKEN_IDS = (100, 1000)
DEFAULT_CALL_TIMEOUT_S = 120.0
TRACE_MAX_LEN = 1_000_000  # the request records share the router's capped trace stream

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """One call as its client saw it: wall-clock times (``time.time``), tokens, the error."""

    start: float
    end: float
    ttft: float | None  # s from start to the first token; None when none came
    prompt_tokens: int
    completion_tokens: int
    error: str = ""  # empty when the call succeeded

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than two tokens)."""
        if self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


def prompt_ids(tokens: int, rng: np.random.Generator) -> list[int]:
    return [int(t) for t in rng.integers(TOKEN_IDS[0], TOKEN_IDS[1], size=tokens)]


def _error_text(status: int, body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")
    return f"http {status}: {str(message)[:200]}"


async def send_completion(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    rng: np.random.Generator,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    clock: Clock = time.time,
) -> CallOutcome:
    """One streamed completion of ``prompt_tokens`` random token ids and exactly
    ``completion_tokens`` output tokens; failures are returned, not raised."""
    body = {
        "model": model,
        "prompt": prompt_ids(prompt_tokens, rng),
        "max_tokens": completion_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = clock()
    first: float | None = None
    chunks = 0
    usage: dict[str, Any] = {}
    error = ""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(
                f"{base_url}/v1/completions", json=body, headers=dict(headers or {})
            ) as reply:
                if reply.status != 200:
                    error = _error_text(reply.status, await reply.read())
                else:
                    async for raw in reply.content:
                        line = raw.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        event = json.loads(data)
                        if "error" in event:
                            error = f"stream error: {str(event['error'])[:200]}"
                            break
                        if event.get("choices"):
                            chunks += 1
                            if first is None:
                                first = clock()
                        if event.get("usage"):
                            usage = event["usage"]
    except TimeoutError:
        error = f"timeout after {timeout_s:g} s"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    end = clock()
    completion = int(usage.get("completion_tokens", chunks)) if not error else chunks
    if not error and completion < completion_tokens:
        error = f"short answer: {completion} of {completion_tokens} tokens"
    return CallOutcome(
        start=start,
        end=end,
        ttft=None if first is None else first - start,
        prompt_tokens=int(usage.get("prompt_tokens", prompt_tokens)),
        completion_tokens=completion,
        error=error,
    )


# vLLM's API server closes a connection idle for 5 s (uvicorn's keep-alive timeout); a client
# that keeps it longer (aiohttp: 15 s) races that close and sends calls on connections being
# closed: bursts of ServerDisconnectedError a few seconds after a busy window, counted as failed
# calls by the profiler's sweeps. Idle connections are dropped well before the engine's timeout.
KEEPALIVE_S = 2.0


def direct_session(connections: int = 512) -> aiohttp.ClientSession:
    """A client session for local engines and routers: no proxies from the environment, many
    connections (fan-out sends dozens of calls at once), idle ones kept ``KEEPALIVE_S``."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, trust_env=False)


# ------------------------------------------------------------------------------- arrivals
def poisson_offsets(rate: float, count: int, rng: np.random.Generator) -> list[float]:
    """``count`` arrival offsets (s, the first at 0) of a Poisson process of ``rate`` per s."""
    if not rate > 0 or not math.isfinite(rate):
        raise InvalidInputError(f"rate: must be > 0, got {rate}")
    if count < 1:
        raise InvalidInputError(f"requests: must be >= 1, got {count}")
    gaps = rng.exponential(1.0 / rate, size=count)
    return [float(x) for x in np.cumsum(gaps) - gaps[0]]


# ------------------------------------------------------------------------------- workflows
@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """One workflow request: its span, status and calls (deployment model name, outcome)."""

    request_id: str
    arrival: float  # when it was due (wall clock)
    start: float
    end: float
    status: Status
    calls: tuple[tuple[str, CallOutcome], ...]
    tool_s: float  # summed tool seconds (parallel tools each count)

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class DriveResult:
    """Every request of one run; ``warmup`` of them (the first) are left out of statistics."""

    workflow: str
    rate: float
    requests: tuple[RequestOutcome, ...]
    warmup: int = 0

    @property
    def measured(self) -> tuple[RequestOutcome, ...]:
        return self.requests[self.warmup :]

    @property
    def errors(self) -> int:
        return sum(r.status != "ok" for r in self.measured)

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.measured if r.status == "ok"]

    def latency_stats(self) -> dict[str, float]:
        return latency_stats(self.latencies)

    def window_latency(self, parts: int = 3) -> float:
        """The median over ``parts`` equal stretches of the run (by request start) of the mean
        latency of the ok requests starting in each: on a shared host one slow stretch (another
        tenant's burst) moves the run's mean, not this median. NaN without ok requests."""
        if parts < 1:
            raise InvalidInputError(f"parts: must be >= 1, got {parts}")
        ok = [r for r in self.measured if r.status == "ok"]
        if not ok:
            return math.nan
        lo = min(r.start for r in ok)
        hi = max(r.start for r in ok)
        groups: list[list[float]] = [[] for _ in range(parts)]
        for r in ok:
            i = int((r.start - lo) / (hi - lo) * parts) if hi > lo else 0
            groups[min(i, parts - 1)].append(r.latency)
        return float(np.median([np.mean(g) for g in groups if g]))

    def throughput(self) -> float:
        """Requests/s completed (ok) by the measured requests: (n - 1) over the time from the
        first one's start to the last completion, less the mean latency (the tail a system that
        keeps up adds after the last arrival). The offered rate while the system keeps up, the
        completion rate once it falls behind (the last completions come ever later)."""
        ok = [r for r in self.measured if r.status == "ok"]
        if len(ok) < 2:
            return math.nan
        span = max(r.end for r in ok) - min(r.start for r in self.measured)
        span -= float(np.mean([r.latency for r in ok]))
        return (len(ok) - 1) / span if span > 0 else math.nan

    def saturated_throughput(self) -> float:
        """Requests/s completed from the first measured arrival to the last completion: the
        capacity, when requests arrive faster than they complete."""
        measured = [r for r in self.measured if r.status == "ok"]
        if len(measured) < 2:
            return math.nan
        lo = min(r.start for r in self.measured)
        hi = max(r.end for r in measured)
        return len(measured) / (hi - lo) if hi > lo else math.nan

    def trace(self) -> Trace:
        """The run as a trace: every call and every request span, as the client saw them."""
        calls: list[TraceCall] = []
        requests: list[TraceRequest] = []
        for r in self.requests:
            requests.append(TraceRequest(self.workflow, r.request_id, r.start, r.end, r.status))
            for i, (model, c) in enumerate(r.calls):
                calls.append(
                    TraceCall(
                        self.workflow,
                        r.request_id,
                        f"{r.request_id}-{i}",
                        model,
                        c.start,
                        c.end,
                        c.prompt_tokens,
                        c.completion_tokens,
                        c.ttft,
                        "ok" if c.ok else "error",
                    )
                )
        return Trace(tuple(calls), tuple(requests))


class _CallFailed(Exception):
    def __init__(self, outcome: CallOutcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass
class _Request:
    request_id: str
    calls: list[tuple[str, CallOutcome]] = field(default_factory=list)
    tool_s: float = 0.0


class WorkflowDriver:
    """Run ``workflow``'s programs on the router at ``base_url`` (module docstring).

    ``models`` maps the program's deployment names to the router's model names (default: the
    same names). ``store``, when given, receives each request's span as a trace record.
    """

    def __init__(
        self,
        base_url: str,
        workflow: Workflow,
        session: aiohttp.ClientSession,
        *,
        models: Mapping[str, str] | None = None,
        store: Store | None = None,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        api_key: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.workflow = workflow
        self._session = session
        self._models = dict(models or {})
        self._store = store
        self._timeout_s = call_timeout_s
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clock = clock

    async def request(
        self, rng: np.random.Generator, request_id: str | None = None, arrival: float | None = None
    ) -> RequestOutcome:
        """Run one request's program to its end (or its first failed call)."""
        state = _Request(request_id or uuid.uuid4().hex)
        start = self._clock()
        status: Status = "ok"
        program = self.workflow.program(rng)
        try:
            await self._drive(program, state, rng)
        except _CallFailed:
            status = "error"
        finally:
            program.close()
        end = self._clock()
        outcome = RequestOutcome(
            state.request_id,
            start if arrival is None else arrival,
            start,
            end,
            status,
            tuple(state.calls),
            state.tool_s,
        )
        if self._store is not None:
            record = TraceRequest(self.workflow.name, state.request_id, start, end, status)
            await self._store.append_trace([dumps(record)], TRACE_MAX_LEN)
        return outcome

    async def run(
        self,
        rate: float,
        requests: int,
        *,
        seed: int = 0,
        warmup: int = 0,
        offsets: Sequence[float] | None = None,
        on_done: Callable[[RequestOutcome], None] | None = None,
    ) -> DriveResult:
        """``requests`` requests arriving at ``rate`` per s (Poisson; or at ``offsets`` s after
        the start, replayed); the first ``warmup`` are left out of the statistics. Request i's
        program gets its own generator seeded (seed, i): the calls do not depend on timing."""
        if offsets is None:
            offsets = poisson_offsets(rate, requests, np.random.default_rng([seed, 1 << 20]))
        elif len(offsets) != requests:
            raise InvalidInputError(f"offsets: {len(offsets)} given for {requests} requests")
        if not 0 <= warmup < requests:
            raise InvalidInputError(f"warmup: must be in [0, {requests}), got {warmup}")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        wall0 = self._clock()

        async def one(i: int) -> RequestOutcome:
            delay = t0 + offsets[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = await self.request(
                np.random.default_rng([seed, i]),
                f"{self.workflow.name}-{seed}-{i}-{uuid.uuid4().hex[:8]}",
                wall0 + offsets[i],
            )
            if on_done is not None:
                on_done(outcome)
            return outcome

        outcomes = await asyncio.gather(*(one(i) for i in range(requests)))
        return DriveResult(self.workflow.name, rate, tuple(outcomes), warmup)

    # -- one program ------------------------------------------------------------------------
    async def _drive(self, program: Program, state: _Request, rng: np.random.Generator) -> Any:
        value: Any = None
        while True:
            try:
                step = program.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(step, Parallel):
                value = tuple(
                    await asyncio.gather(*(self._branch(b, state, rng) for b in step.branches))
                )
            else:
                value = await self._branch(step, state, rng)

    async def _branch(
        self, step: Llm | Tool | Program, state: _Request, rng: np.random.Generator
    ) -> Any:
        if isinstance(step, Llm):
            return await self._call(step, state, rng)
        if isinstance(step, Tool):
            start = self._clock()
            await asyncio.sleep(step.seconds)
            state.tool_s += step.seconds
            return ToolResult(step.name, start, self._clock())
        return await self._drive(step, state, rng)

    async def _call(self, step: Llm, state: _Request, rng: np.random.Generator) -> LlmResult:
        headers = {
            WORKFLOW_HEADER: self.workflow.name,
            REQUEST_ID_HEADER: state.request_id,
            **self._auth,
        }
        # The prompt's token ids come from a fresh generator: the program's generator must see
        # the same draws whatever the timing, and equal prompts would hit the prefix cache.
        tokens = np.random.default_rng()
        outcome = await send_completion(
            self._session,
            self.base_url,
            self._models.get(step.model, step.model),
            step.prompt_tokens,
            step.completion_tokens,
            tokens,
            headers=headers,
            timeout_s=self._timeout_s,
            clock=self._clock,
        )
        state.calls.append((step.model, outcome))
        if not outcome.ok:
            raise _CallFailed(outcome)
        return LlmResult(
            step.model,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.start,
            outcome.end,
            outcome.ttft or 0.0,
            "",
        )


# ------------------------------------------------------------------------------- tiny variants
TINY_MODEL = "tiny-llama"


def tiny_workflow(name: str) -> Workflow:
    """The evaluation workflow ``name`` with the same structure (stages, fan-out, loops) but
    lengths scaled to the tiny CPU test model (every call fits its 256-token context) and its
    LLMs all ``tiny-llama``: real engines on this machine can run it."""
    from services.core.sim.program import Lengths, Seconds
    from services.core.sim.workflows import BeamSearch, Composite, RagReranker

    rag = RagReranker(
        candidates=(4, 8),
        top_n=2,
        query=Lengths(16, 0.5, 4, 32),
        passage=Lengths(24, 0.4, 8, 48),
        instructions=16,
        answer=Lengths(32, 0.5, 8, 64),
        retrieval=Seconds(0.03, 0.3),
        models={"reranker": TINY_MODEL, "generator": TINY_MODEL},
    )
    beam = BeamSearch(
        n_choices=(8,),
        n_weights=(1.0,),
        width=4,
        max_rounds=4,
        p_answer=0.3,
        system=16,
        question=Lengths(24, 0.5, 8, 48),
        step=Lengths(12, 0.5, 4, 24),
        models={"policy": TINY_MODEL, "prm": TINY_MODEL},
    )
    workflows: dict[str, Workflow] = {
        "rag": rag,
        "beam": beam,
        "composite": Composite(
            rag=RagReranker(
                candidates=(4, 6),
                top_n=1,
                query=rag.query,
                passage=rag.passage,
                instructions=rag.instructions,
                answer=rag.answer,
                retrieval=rag.retrieval,
                models=rag.models,
            ),
            beam=beam,
            models={"reranker": TINY_MODEL, "policy": TINY_MODEL, "prm": TINY_MODEL},
        ),
    }
    if name not in workflows:
        raise InvalidInputError(
            f"workflow: no tiny variant of {name!r} (choose from {', '.join(sorted(workflows))})"
        )
    return workflows[name]


def latency_stats(latencies: Sequence[float]) -> dict[str, float]:
    """Mean, p50 and p99 of request latencies (NaN for none)."""
    values = np.asarray(latencies, dtype=float)
    if values.size == 0:
        return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
    }
