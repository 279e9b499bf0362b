"""A LangGraph RAG agent with a self-check loop, its LLM calls served by Scepsy.

The graph, per workflow request::

    rewrite (generator) -> retrieve (tool) -> rerank (reranker, --fanout calls at once)
        -> answer (generator) -> check (reranker) --"no", attempts left--> rewrite
                                                  --otherwise-----------> END

The check makes the number of calls data-dependent (a request takes one to ``--attempts``
rounds), which is what Scepsy's statistics are for: per-request latency varies, the share of
time each LLM is busy much less.

LangChain owns the HTTP calls here, so the calls are tagged implicitly: ``ChatOpenAI`` gets
Scepsy's tagging httpx client (``tagged_async_http_client``), and each graph invocation runs
inside ``workflow_request(name)``; every call it makes carries the request's workflow and id.

    python examples/langgraph_rag/graph.py --router http://127.0.0.1:8000 --rate 0.5 --duration 60

Exit status 1 when any request failed.
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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph

from services.router.client import tagged_async_http_client, workflow_request

DOCS = (
    "Scepsy traces every LLM call of a workflow request through its router.",
    "From the trace it computes, per LLM, calls per request and time-weighted concurrency.",
    "Profiles give each LLM's latency against load for a TP degree and a GPU fraction.",
    "The Aggregate LLM Pipeline predicts workflow latency and throughput of an allocation.",
    "The search picks the allocation with the lowest predicted latency at the target rate.",
    "The placer puts tensor-parallel groups inside one NVLink domain and packs fractions.",
    "Node agents reconcile their vLLM engines with the current plan's placement.",
    "The control loop re-plans when the rate, the time shares or the nodes drift.",
)
QUESTIONS = (
    "What does the Aggregate LLM Pipeline predict?",
    "Where does the placer put tensor-parallel groups?",
    "When does the control loop re-plan?",
    "What does Scepsy compute from the trace?",
)


class State(TypedDict):
    question: str
    query: str
    passages: list[str]
    answer: str
    verdict: str
    attempts: int


@dataclass(frozen=True)
class Config:
    router: str = "http://127.0.0.1:8000"
    api_key: str = ""
    workflow: str = "rag-langgraph"
    generator: str = "generator"
    reranker: str = "reranker"
    rate: float = 0.5
    duration_s: float = 30.0
    requests: int = 0
    fanout: int = 3
    attempts: int = 2
    tool_s: float = 0.05
    max_tokens: int = 32
    timeout_s: float = 60.0
    seed: int = 0


def retrieve_docs(query: str, k: int) -> list[str]:
    words = set(re.findall(r"[a-z]+", query.lower()))
    ranked = sorted(
        enumerate(DOCS),
        key=lambda d: (-len(words & set(re.findall(r"[a-z]+", d[1].lower()))), d[0]),
    )
    return [text for _, text in ranked[:k]]


def build_graph(generator: ChatOpenAI, reranker: ChatOpenAI, config: Config) -> Any:
    """The compiled graph (module docstring)."""

    async def ask(llm: ChatOpenAI, prompt: str) -> str:
        reply = await llm.ainvoke([HumanMessage(prompt)])
        return str(reply.content)

    async def rewrite(state: State) -> dict[str, Any]:
        hint = (
            f" A previous answer was judged off: {state['answer']!r}." if state["attempts"] else ""
        )
        query = await ask(generator, f"Search query for: {state['question']}.{hint}")
        return {"query": query, "attempts": state["attempts"] + 1}

    async def retrieve(state: State) -> dict[str, Any]:
        await asyncio.sleep(config.tool_s)  # the search service
        return {"passages": retrieve_docs(f"{state['question']} {state['query']}", config.fanout)}

    async def rerank(state: State) -> dict[str, Any]:
        prompts = [
            f"Question: {state['question']}\nPassage: {p}\nRelevance from 0 to 10:"
            for p in state["passages"]
        ]
        scores = await asyncio.gather(*(ask(reranker, p) for p in prompts))

        def score(i: int) -> float:
            found = re.search(r"\d+(?:\.\d+)?", scores[i])
            return float(found.group()) if found else 0.0

        order = sorted(range(len(prompts)), key=lambda i: (-score(i), i))
        return {"passages": [state["passages"][i] for i in order[:2]]}

    async def answer(state: State) -> dict[str, Any]:
        context = "\n".join(state["passages"])
        text = await ask(
            generator, f"Context:\n{context}\nQuestion: {state['question']}\nShort answer:"
        )
        return {"answer": text}

    async def check(state: State) -> dict[str, Any]:
        verdict = await ask(
            reranker,
            f"Question: {state['question']}\nAnswer: {state['answer']}\n"
            "Does the answer address the question? yes or no:",
        )
        return {"verdict": verdict}

    def again(state: State) -> str:
        satisfied = "yes" in state["verdict"].lower()
        return END if satisfied or state["attempts"] >= config.attempts else "rewrite"

    graph = StateGraph(State)
    for name, node in (
        ("rewrite", rewrite),
        ("retrieve", retrieve),
        ("rerank", rerank),
        ("answer", answer),
        ("check", check),
    ):
        graph.add_node(name, node)
    graph.add_edge(START, "rewrite")
    graph.add_edge("rewrite", "retrieve")
    graph.add_edge("retrieve", "rerank")
    graph.add_edge("rerank", "answer")
    graph.add_edge("answer", "check")
    graph.add_conditional_edges("check", again, ["rewrite", END])
    return graph.compile()


@dataclass
class Summary:
    requests: int
    failed: int
    rounds_mean: float
    latency_mean_s: float
    latency_p95_s: float
    wall_s: float
    errors: list[str]
    example_answer: str


async def run(config: Config) -> Summary:
    """Drive the graph at ``config.rate`` (Poisson arrivals) and summarise."""
    rng = random.Random(config.seed)
    async with tagged_async_http_client(timeout=config.timeout_s) as http:

        def llm(model: str) -> ChatOpenAI:
            return ChatOpenAI(
                model=model,
                base_url=config.router.rstrip("/") + "/v1",
                api_key=config.api_key or "none",  # type: ignore[arg-type]
                temperature=0,
                max_completion_tokens=config.max_tokens,
                max_retries=0,
                http_async_client=http,
            )

        app = build_graph(llm(config.generator), llm(config.reranker), config)

        async def one(question: str) -> tuple[bool, float, int, str]:
            start = time.monotonic()
            with workflow_request(config.workflow):  # every call inside carries the tags
                try:
                    state = await app.ainvoke(
                        {"question": question, "query": "", "passages": [], "answer": "",
                         "verdict": "", "attempts": 0}
                    )  # fmt: skip
                except Exception as exc:  # one failed request must not stop the run
                    return False, time.monotonic() - start, 0, repr(exc)
            return True, time.monotonic() - start, state["attempts"], state["answer"]

        tasks: list[asyncio.Task[tuple[bool, float, int, str]]] = []
        began, at = time.monotonic(), 0.0
        while (config.requests > 0 and len(tasks) < config.requests) or (
            config.requests <= 0 and at < config.duration_s
        ):
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            tasks.append(asyncio.create_task(one(QUESTIONS[rng.randrange(len(QUESTIONS))])))
            at += rng.expovariate(config.rate)
        results = await asyncio.gather(*tasks)
    ok = [r for r in results if r[0]]
    latencies = sorted(r[1] for r in ok) or [0.0]
    return Summary(
        requests=len(results),
        failed=len(results) - len(ok),
        rounds_mean=statistics.fmean(r[2] for r in ok) if ok else 0.0,
        latency_mean_s=statistics.fmean(latencies),
        latency_p95_s=latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        wall_s=time.monotonic() - began,
        errors=sorted({r[3] for r in results if not r[0]})[:5],
        example_answer=ok[0][3] if ok else "",
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--router",
        default=os.environ.get("SCEPSY_ROUTER_URL", Config.router),
        help="the router's HTTP address (env SCEPSY_ROUTER_URL)",
    )
    p.add_argument("--workflow", default=Config.workflow, help="the workflow's name in the trace")
    p.add_argument("--generator", default=Config.generator)
    p.add_argument("--reranker", default=Config.reranker)
    p.add_argument("--rate", type=float, default=Config.rate, help="requests per second")
    p.add_argument("--duration", type=float, default=Config.duration_s, help="seconds")
    p.add_argument("--requests", type=int, default=0, help="this many requests instead")
    p.add_argument("--fanout", type=int, default=Config.fanout, help="passages reranked")
    p.add_argument("--attempts", type=int, default=Config.attempts, help="rounds at most")
    p.add_argument("--tool-s", type=float, default=Config.tool_s, help="simulated search time")
    p.add_argument("--max-tokens", type=int, default=Config.max_tokens)
    p.add_argument("--timeout", type=float, default=Config.timeout_s, help="per call, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    for name in ("rate", "fanout", "attempts", "max_tokens", "timeout"):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')}: must be > 0, got {getattr(a, name)}")
    config = Config(
        router=a.router, api_key=os.environ.get("SCEPSY_API_KEY", ""), workflow=a.workflow,
        generator=a.generator, reranker=a.reranker, rate=a.rate, duration_s=a.duration,
        requests=a.requests, fanout=a.fanout, attempts=a.attempts, tool_s=a.tool_s,
        max_tokens=a.max_tokens, timeout_s=a.timeout, seed=a.seed,
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
            f"{summary.rounds_mean:.2f} rounds per request; latency mean "
            f"{summary.latency_mean_s:.3f} s, p95 {summary.latency_p95_s:.3f} s"
        )
        for error in summary.errors:
            print(f"  error: {error}")
        if summary.example_answer:
            print(f"  an answer: {summary.example_answer.strip()[:200]}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
