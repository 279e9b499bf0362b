"""A RAG workflow in plain asyncio with the OpenAI client, its LLM calls served by Scepsy.

One workflow request:

1. the generator turns the question into a search query (1 call);
2. a retriever (a small local corpus, word overlap, plus ``--tool-s`` of simulated search time)
   returns the ``--fanout`` best passages;
3. the reranker scores every passage, all at once (``--fanout`` concurrent calls);
4. the generator answers from the two best passages (1 call).

Nothing here knows about GPUs: the client sets ``base_url`` to the router and sends two headers
with every call of one request (``x-scepsy-workflow``, ``x-scepsy-request-id``), so the router's
trace knows which calls belong together. That trace is what Scepsy plans from, and what its
control loop watches: drive this at one rate, then at twice the rate, and ``scepsy loop
decisions`` shows the re-plan.

    python examples/asyncio_rag/rag.py --router http://127.0.0.1:8000 --rate 1 --duration 60

Requests arrive as a Poisson process at ``--rate`` per second for ``--duration`` seconds (or
``--requests`` of them); the summary gives requests, failures, calls per request and end-to-end
latency. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from openai import AsyncOpenAI

WORKFLOW_HEADER = "x-scepsy-workflow"
REQUEST_ID_HEADER = "x-scepsy-request-id"

CORPUS = (
    "Tensor parallelism splits each layer of a model across GPUs that talk over NVLink.",
    "A GPU fraction is enforced by the MPS active thread percentage and a memory cap.",
    "The share of a request's time that each LLM is busy varies little between requests.",
    "End-to-end latency of an agentic workflow varies a lot: branches, loops, fan-outs.",
    "A reranker scores retrieved passages so the generator reads only the best ones.",
    "Continuous batching lets an engine add new requests to a running batch every step.",
    "Replicas of a model share its calls; a router balances the load between them.",
    "Prefix caching reuses the KV cache of a shared prompt prefix across requests.",
    "A node agent starts the engines that the current plan places on its node.",
    "The control loop re-plans when the request rate leaves the plan's headroom.",
)
QUESTIONS = (
    "How is a GPU fraction enforced?",
    "Why can Scepsy allocate GPUs from aggregate statistics?",
    "What does a reranker do in a RAG pipeline?",
    "When does the control loop re-plan?",
    "What does tensor parallelism split?",
    "How does a router use replicas?",
)


@dataclass(frozen=True)
class Config:
    router: str = "http://127.0.0.1:8000"
    api_key: str = ""
    workflow: str = "rag-asyncio"
    generator: str = "generator"
    reranker: str = "reranker"
    rate: float = 1.0
    duration_s: float = 30.0
    requests: int = 0  # when > 0: this many requests, whatever the duration
    fanout: int = 4
    tool_s: float = 0.05
    max_tokens: int = 32
    timeout_s: float = 60.0
    seed: int = 0


@dataclass
class Outcome:
    request_id: str
    ok: bool
    latency_s: float
    calls: int
    answer: str = ""
    error: str = ""


@dataclass
class Summary:
    requests: int
    failed: int
    calls_per_request: float
    latency_mean_s: float
    latency_p50_s: float
    latency_p95_s: float
    wall_s: float
    errors: list[str] = field(default_factory=list)
    example_answer: str = ""


def retrieve(query: str, k: int) -> list[str]:
    """The ``k`` passages sharing the most words with ``query`` (ties: corpus order)."""
    words = set(re.findall(r"[a-z]+", query.lower()))
    scored = sorted(
        enumerate(CORPUS),
        key=lambda p: (-len(words & set(re.findall(r"[a-z]+", p[1].lower()))), p[0]),
    )
    return [text for _, text in scored[:k]]


def first_number(text: str, default: float) -> float:
    """The first number in a model's reply (a small model may not give one: ``default``)."""
    found = re.search(r"-?\d+(?:\.\d+)?", text)
    return float(found.group()) if found else default


async def one_request(client: AsyncOpenAI, config: Config, question: str) -> Outcome:
    """One workflow request (module docstring)."""
    request_id = uuid.uuid4().hex
    headers = {WORKFLOW_HEADER: config.workflow, REQUEST_ID_HEADER: request_id}
    start = time.monotonic()
    calls = 0

    async def chat(model: str, prompt: str, max_tokens: int) -> str:
        nonlocal calls
        calls += 1
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            extra_headers=headers,
        )
        return reply.choices[0].message.content or ""

    try:
        query = await chat(
            config.generator, f"Write a short search query for: {question}", config.max_tokens
        )
        await asyncio.sleep(config.tool_s)  # the search service
        passages = retrieve(f"{question} {query}", config.fanout)
        scores = await asyncio.gather(
            *(
                chat(
                    config.reranker,
                    f"Question: {question}\nPassage: {p}\nRelevance from 0 to 10:",
                    4,
                )
                for p in passages
            )
        )
        # the retriever's order breaks ties (and stands in when the model gives no number)
        ranked = sorted(range(len(passages)), key=lambda i: (-first_number(scores[i], 0.0), i))
        context = "\n".join(passages[i] for i in ranked[:2])
        answer = await chat(
            config.generator,
            f"Answer from the context.\nContext:\n{context}\nQuestion: {question}\nAnswer:",
            config.max_tokens,
        )
    except Exception as exc:  # one failed request must not stop the run
        return Outcome(request_id, False, time.monotonic() - start, calls, error=repr(exc))
    return Outcome(request_id, True, time.monotonic() - start, calls, answer=answer)


async def run(config: Config) -> Summary:
    """Drive the workflow at ``config.rate`` (Poisson arrivals) and summarise."""
    rng = random.Random(config.seed)
    client = AsyncOpenAI(
        base_url=config.router.rstrip("/") + "/v1",
        api_key=config.api_key or "none",
        timeout=config.timeout_s,
        max_retries=0,
    )
    tasks: list[asyncio.Task[Outcome]] = []
    began = time.monotonic()
    async with client:
        at = 0.0
        while True:
            if config.requests > 0 and len(tasks) >= config.requests:
                break
            if config.requests <= 0 and at >= config.duration_s:
                break
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            question = QUESTIONS[rng.randrange(len(QUESTIONS))]
            tasks.append(asyncio.create_task(one_request(client, config, question)))
            at += rng.expovariate(config.rate)
        outcomes = await asyncio.gather(*tasks)
    return summarise(outcomes, time.monotonic() - began)


def summarise(outcomes: Sequence[Outcome], wall_s: float) -> Summary:
    ok = [o for o in outcomes if o.ok]
    latencies = sorted(o.latency_s for o in ok) or [0.0]
    return Summary(
        requests=len(outcomes),
        failed=len(outcomes) - len(ok),
        calls_per_request=statistics.fmean(o.calls for o in ok) if ok else 0.0,
        latency_mean_s=statistics.fmean(latencies),
        latency_p50_s=latencies[len(latencies) // 2],
        latency_p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        wall_s=wall_s,
        errors=sorted({o.error for o in outcomes if not o.ok})[:5],
        example_answer=ok[0].answer if ok else "",
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--router",
        default=os.environ.get("SCEPSY_ROUTER_URL", Config.router),
        help="the router's HTTP address (env SCEPSY_ROUTER_URL)",
    )
    p.add_argument("--workflow", default=Config.workflow, help="the workflow's name in the trace")
    p.add_argument("--generator", default=Config.generator, help="model name of the generator")
    p.add_argument("--reranker", default=Config.reranker, help="model name of the reranker")
    p.add_argument("--rate", type=float, default=Config.rate, help="requests per second")
    p.add_argument("--duration", type=float, default=Config.duration_s, help="seconds")
    p.add_argument("--requests", type=int, default=0, help="this many requests instead")
    p.add_argument("--fanout", type=int, default=Config.fanout, help="passages reranked")
    p.add_argument("--tool-s", type=float, default=Config.tool_s, help="simulated search time")
    p.add_argument("--max-tokens", type=int, default=Config.max_tokens)
    p.add_argument("--timeout", type=float, default=Config.timeout_s, help="per call, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    for name in ("rate", "fanout", "max_tokens", "timeout"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')}: must be > 0, got {getattr(a, name)}")
    config = Config(
        router=a.router,
        api_key=os.environ.get("SCEPSY_API_KEY", ""),
        workflow=a.workflow,
        generator=a.generator,
        reranker=a.reranker,
        rate=a.rate,
        duration_s=a.duration,
        requests=a.requests,
        fanout=a.fanout,
        tool_s=a.tool_s,
        max_tokens=a.max_tokens,
        timeout_s=a.timeout,
        seed=a.seed,
    )  # fmt: skip
    return config, a.json


def main(argv: Sequence[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    summary = asyncio.run(run(config))
    if as_json:
        print(json.dumps(asdict(summary)))
    else:
        print(
            f"{summary.requests} requests in {summary.wall_s:.1f} s, {summary.failed} failed; "
            f"{summary.calls_per_request:.1f} LLM calls per request; latency mean "
            f"{summary.latency_mean_s:.3f} s, p50 {summary.latency_p50_s:.3f} s, "
            f"p95 {summary.latency_p95_s:.3f} s"
        )
        for error in summary.errors:
            print(f"  error: {error}")
        if summary.example_answer:
            print(f"  an answer: {summary.example_answer.strip()[:200]}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
