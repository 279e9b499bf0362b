"""``scepsy fuzz``: hostile input for every parser, counted: cases tried and crashes per parser.

Each target is a parser as users reach it, fed by a hypothesis strategy of near-valid input
(a valid document with fields dropped, replaced by values of other types, edge values or
unknown fields added) and of arbitrary input (random documents, text, bytes):

| target | parser | a crash is |
|---|---|---|
| spec | a deployment spec file (``load_spec``) | anything but a ``ScepsyError`` |
| cluster | a cluster file (``load_cluster``) | anything but a ``ScepsyError`` |
| trace | a trace file (``read_trace``) | anything but a ``ScepsyError`` |
| allocation | an allocation file (``read_allocation``) | anything but a ``ScepsyError`` |
| http | request bodies POSTed to a real router (HTTP on loopback, a stub engine) | a 5xx answer |
| http-request | raw request bytes through the router's request parser | no 4xx refusal |
| proto | every request message of every service, decoded from bytes, then the router's and the
  converters' readers of what decoded | anything but ``DecodeError`` / ``ScepsyError`` |

``scepsy fuzz [--cases 10000] [--target NAME ...] [--seed N] [--json]`` runs each target for
``--cases`` generated inputs (no shrinking: the failing inputs are reported as found) and exits
1 when any crashed; the http target also counts the router's answers by status. The tests
(``tests/fuzz``) run the same targets with a few cases each.
Hypothesis is a development dependency (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from services.core.errors import ScepsyError

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

# --------------------------------------------------------------------------- valid documents
SPEC: dict[str, Any] = {
    "version": 1,
    "fraction_unit": 4,
    "rho": 0.9,
    "cluster": {"gpu_type": "H100-SXM", "gpus": 2},
    "models": {"generator": "Qwen/Qwen3-0.6B", "reranker": "Qwen/Qwen2.5-0.5B"},
    "workflows": [
        {
            "name": "rag",
            "rate": 1.0,
            "stats": {
                "tool_time": 0.05,
                "stages": [["generator"], ["reranker"]],
                "llms": {
                    "generator": {"n": 2, "p": 1, "prompt_tokens": 120, "completion_tokens": 32},
                    "reranker": {"n": 4, "p": 4, "prompt_tokens": 60, "completion_tokens": 4},
                },
            },
        }
    ],
}
CLUSTER: dict[str, Any] = {
    "version": 1,
    "name": "two",
    "nodes": [
        {"name": "a", "gpu_type": "H100-SXM", "gpus": 4, "interconnect": "nvswitch"},
        {"name": "b", "gpu_type": "H100-SXM", "gpus": 2, "interconnect": "pcie"},
    ],
}
ALLOCATION: dict[str, Any] = {
    "version": 1,
    "fraction_unit": 4,
    "models": {"a": {"fraction": 0.5, "tp": 1, "replicas": 2}, "b": {"tp": 2}},
}
TRACE_CALL: dict[str, Any] = {
    "v": 1, "kind": "call", "workflow": "rag", "request_id": "r1", "call_id": "c1",
    "model": "m", "start": 10.0, "end": 11.5, "prompt_tokens": 812, "completion_tokens": 96,
    "ttft": 0.04, "status": "ok", "replica": "node1/0",
}  # fmt: skip
TRACE_REQUEST: dict[str, Any] = {
    "v": 1, "kind": "request", "workflow": "rag", "request_id": "r1", "start": 9.8, "end": 12.4,
    "status": "ok",
}  # fmt: skip
CHAT: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 4,
    "temperature": 0.5,
    "stream": False,
}
COMPLETION: dict[str, Any] = {"model": "m", "prompt": "hi", "max_tokens": 4, "n": 1, "stop": ["x"]}

EDGES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -(10**30), 0.0, -0.0, 1e-300, 1e308,
    math.inf, -math.inf, math.nan, "", " ", "\x00", "\u202e", "a" * 300, [], {}, [[]], {"": {}},
)  # fmt: skip
HOSTILE_TEXT: tuple[str, ...] = (
    "[" * 5000 + "]" * 5000,
    "{a: " * 3000 + "1" + "}" * 3000,
    "a: &a [*a, *a]\nb: *a\n",
    "x: &x\n  - *x\n",
    "- " * 2000 + "1",
    "!!python/object/apply:os.system ['true']",
    "%YAML 9.9\n---\nx: 1",
    "\ufeffversion: 1",
    "version: 1\nversion: 2\n",
    "\x00\x01\x02",
)


# --------------------------------------------------------------------------- strategies
def json_values() -> SearchStrategy[Any]:
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.sampled_from(EDGES).map(copy.deepcopy),  # a copy: later edits may change it
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _slots(doc: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) of a nested document."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield doc, key
            yield from _slots(value)
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield doc, i
            yield from _slots(value)


def mutated(base: Any) -> SearchStrategy[Any]:
    """``base`` with up to four random edits: a value replaced (by a random value or an edge
    value), a field or item dropped, an unknown field or item added."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Callable[..., Any]) -> Any:
        doc = copy.deepcopy(base)
        for _ in range(draw(st.integers(0, 4))):
            slots = list(_slots(doc))
            if not slots:
                return draw(json_values())
            container, key = draw(st.sampled_from(slots))
            if key not in (container if isinstance(container, dict) else range(len(container))):
                continue  # dropped by an earlier edit
            action = draw(st.sampled_from(("replace", "edge", "drop", "add")))
            if action == "replace":
                container[key] = draw(json_values())
            elif action == "edge":
                container[key] = copy.deepcopy(draw(st.sampled_from(EDGES)))
            elif action == "drop":
                del container[key]
            elif isinstance(container, dict):
                container[draw(st.text(max_size=8))] = draw(json_values())
            else:
                container.append(draw(json_values()))
        return doc

    return build()


def documents(base: Any) -> SearchStrategy[str]:
    """The text of a near-valid or arbitrary YAML/JSON document."""
    from hypothesis import strategies as st

    return _rarely(
        st.sampled_from(HOSTILE_TEXT),
        st.one_of(
            mutated(base).map(_yaml),
            mutated(base).map(_json),
            json_values().map(_yaml),
            st.text(max_size=200),
        ),
    )


def _rarely(rare: SearchStrategy[Any], usual: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """``rare`` one time in 50 (the hostile texts are few and slow to parse), else ``usual``."""
    from hypothesis import strategies as st

    return st.integers(0, 49).flatmap(lambda i: rare if i == 0 else usual)


def trace_texts() -> SearchStrategy[str]:
    from hypothesis import strategies as st

    line = st.one_of(
        mutated(TRACE_CALL).map(_json),
        mutated(TRACE_REQUEST).map(_json),
        json_values().map(_json),
        st.text(max_size=80).filter(lambda t: "\n" not in t and "\r" not in t),
    )
    return _rarely(
        st.sampled_from(HOSTILE_TEXT),
        st.one_of(st.lists(line, max_size=6).map("\n".join), st.text(max_size=200)),
    )


def http_bodies() -> SearchStrategy[tuple[str, bytes]]:
    """(path, body) for the router's two generation routes."""
    from hypothesis import strategies as st

    body = st.one_of(
        mutated(CHAT).map(lambda d: _json(d).encode()),
        mutated(COMPLETION).map(lambda d: _json(d).encode()),
        mutated({**CHAT, "stream": True}).map(lambda d: _json(d).encode()),
        json_values().map(lambda d: _json(d).encode()),
        st.binary(max_size=200),
        st.sampled_from([t.encode() for t in HOSTILE_TEXT]),
    )
    paths = st.sampled_from(("/v1/chat/completions", "/v1/completions"))
    return st.tuples(paths, body)


HTTP_PIECES: tuple[bytes, ...] = (
    b"POST /v1/completions HTTP/1.1\r\n", b"GET /health HTTP/1.0\r\n", b"POST  HTTP/1.1\r\n",
    b"Host: x\r\n", b"Content-Length: 5\r\n", b"Content-Length: -1\r\n",
    b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n", b"Connection: close\r\n",
    b"Expect: 100-continue\r\n", b" folded\r\n", b"X: \xff\xfe\r\n", b":\r\n", b"\r\n",
    b"5\r\nhello\r\n", b"0\r\n\r\n", b"ffffffffffffffffffff\r\n", b"3;ext\r\nabc\r\n", b"\n",
)  # fmt: skip


def http_requests() -> SearchStrategy[bytes]:
    """Raw request bytes for the router's HTTP server parser: pieces of requests (valid and
    not) in any order, and arbitrary bytes."""
    from hypothesis import strategies as st

    piece = st.one_of(st.sampled_from(HTTP_PIECES), st.binary(max_size=40))
    return st.one_of(st.lists(piece, max_size=12).map(b"".join), st.binary(max_size=300))


def check_http_request(data: bytes) -> None:
    """The router's request head and chunked-body parsers on ``data``: a refusal
    (``HttpError``, a 4xx) or a request, never another exception."""
    from services.router.http_server import HttpError, _dechunk, _parse_head

    head, _, rest = data.partition(b"\r\n\r\n")
    try:
        _parse_head(head)
    except HttpError as exc:
        assert 400 <= exc.status < 500, exc.status
    try:
        body, end = _dechunk(rest, 0, 1 << 20)
        assert body is None or 0 < end <= len(rest)
    except HttpError as exc:
        assert 400 <= exc.status < 500, exc.status


def proto_inputs() -> SearchStrategy[tuple[str, bytes]]:
    """(message type name, bytes): random bytes, and valid encodings with bytes flipped, cut or
    added."""
    from hypothesis import strategies as st

    names = sorted(_request_messages())

    @st.composite
    def build(draw: Callable[..., Any]) -> tuple[str, bytes]:
        name = draw(st.sampled_from(names))
        if draw(st.booleans()):
            return name, draw(st.binary(max_size=300))
        data = bytearray(_sample_message(name))
        for _ in range(draw(st.integers(1, 4))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            edit = draw(st.sampled_from(("flip", "cut", "insert")))
            if edit == "flip":
                data[at] ^= draw(st.integers(1, 255))
            elif edit == "cut":
                del data[at:]
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=8))
        return name, bytes(data)

    return build()


def _yaml(doc: Any) -> str:
    return str(yaml.safe_dump(doc, allow_unicode=True))


def _json(doc: Any) -> str:
    return json.dumps(doc, allow_nan=True)


# --------------------------------------------------------------------------- the parsers
def _via_file(text: str, read: Callable[[Path], Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="scepsy-fuzz-") as d:
        path = Path(d) / "input.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        read(path)


def check_spec(text: str) -> None:
    from services.core.workload.spec import load_spec

    _via_file(text, load_spec)


def check_cluster(text: str) -> None:
    from services.core.cluster.declared import load_cluster

    _via_file(text, load_cluster)


def check_trace(text: str) -> None:
    from services.core.workload.trace import read_trace

    _via_file(text, read_trace)


def check_allocation(text: str) -> None:
    from services.cli.place import read_allocation

    _via_file(text, lambda p: read_allocation(str(p)))


def _request_messages() -> dict[str, Any]:
    """Every request message of every service, by full name."""
    from protos.scepsy.v1 import (
        agent_pb2,
        placer_pb2,
        planner_pb2,
        profiler_pb2,
        router_pb2,
        types_pb2,
    )

    found: dict[str, Any] = {}
    for module in (agent_pb2, placer_pb2, planner_pb2, profiler_pb2, router_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[method.input_type.full_name] = GetMessageClass(method.input_type)
    for name in ("Node", "Profile", "Allocation", "Placement", "Model"):  # stored in Redis
        message = types_pb2.DESCRIPTOR.message_types_by_name.get(name)
        if message is not None:
            found[message.full_name] = GetMessageClass(message)
    found["scepsy.v1.Plan"] = planner_pb2.Plan
    return found


def _sample_message(name: str) -> bytes:
    """A valid, non-empty encoding of message ``name`` (some fields set)."""
    from protos.scepsy.v1 import router_pb2

    cls = _request_messages()[name]
    if cls is router_pb2.GenerateRequest:
        message = router_pb2.GenerateRequest(
            model="m",
            messages=[router_pb2.ChatMessage(role="user", content="hi")],
            max_tokens=4,
            extra_json='{"n": 2}',
        )
        return bytes(message.SerializeToString())
    message = cls()
    for f in cls.DESCRIPTOR.fields:
        if f.is_repeated or f.message_type is not None:
            continue
        if f.type == f.TYPE_STRING:
            setattr(message, f.name, "x")
        elif f.type == f.TYPE_BOOL:
            setattr(message, f.name, True)
        elif f.type in (f.TYPE_DOUBLE, f.TYPE_FLOAT):
            setattr(message, f.name, 1.5)
        elif f.enum_type is None and f.type != f.TYPE_BYTES:
            setattr(message, f.name, 3)
    return bytes(message.SerializeToString()) or b"\x0a\x01x"


def check_proto(case: tuple[str, bytes]) -> None:
    from protos.scepsy.v1 import planner_pb2, router_pb2, types_pb2
    from services.router.grpc_api import request_body
    from services.runtime import convert

    name, data = case
    cls = _request_messages()[name]
    try:
        message = cls.FromString(data)
    except DecodeError:
        return
    readers: dict[Any, Callable[[Any], Any]] = {
        router_pb2.GenerateRequest: request_body,
        types_pb2.Node: convert.node_from_pb,
        types_pb2.Profile: convert.profile_from_pb,
        types_pb2.Allocation: convert.allocation_from_pb,
        types_pb2.Model: convert.model_from_pb,
        planner_pb2.Plan: convert.plan_from_pb,
    }
    reader = readers.get(cls)
    if reader is not None:
        reader(message)


# --------------------------------------------------------------------------- http: a router
class _StubEngine:
    """An OpenAI-shaped engine that answers every call with one short completion (or stream),
    whatever was asked: the router's handling is under test, not an engine's."""

    ANSWER = b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"ok"}]}'

    async def start(self) -> str:
        from aiohttp import web

        async def answer(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if b'"stream": true' not in body and b'"stream":true' not in body:
                return web.Response(body=self.ANSWER, content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: " + self.ANSWER + b"\n\ndata: [DONE]\n\n")
            await response.write_eof()
            return response

        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        app.router.add_post("/v1/completions", answer)
        app.router.add_get("/health", health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()


@contextmanager
def running_router() -> Iterator[tuple[str, int]]:
    """A real router (own Redis server process, a stub engine for model ``m``) served on an
    event loop in a background thread; yields its HTTP (host, port)."""
    from services.core.routing import Endpoint
    from services.router.config import RouterConfig
    from services.router.service import Router, router_binding
    from services.runtime.logging import configure_logging
    from services.runtime.redis_server import RedisServer
    from services.runtime.server import Server
    from services.runtime.store import Store

    configure_logging("console", "error")
    redis = RedisServer().start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-router", daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(60)

    async def start() -> tuple[Any, ...]:
        engine = _StubEngine()
        url = await engine.start()
        store = Store.connect(redis.url, 2.0, "fuzz")
        await store.put_endpoint(Endpoint("m", "m-0", url))
        config = RouterConfig(
            redis_url=redis.url, namespace="fuzz", port=0, http_port=0, drain_s=0.0,
            grace_s=1.0, trace=False, log_level="error", max_body_bytes=1 << 20,
        )  # fmt: skip
        router = Router(config, store)
        server = Server(config, [router_binding(router)])
        await server.start()
        return engine, store, router, server

    engine, store, router, server = run(start())
    try:
        yield "127.0.0.1", router.http_port
    finally:

        async def stop() -> None:
            await server.stop()
            await store.close()
            await engine.stop()

        run(stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        redis.stop()


class HttpCheck:
    """POST a body to the router; a 5xx answer (or no answer) is a crash."""

    def __init__(self, address: tuple[str, int]) -> None:
        self._address = address
        self._connection: HTTPConnection | None = None
        self.statuses: Counter[int] = Counter()  # answers by HTTP status

    def __call__(self, case: tuple[str, bytes]) -> None:
        path, body = case
        for attempt in (1, 2):
            if self._connection is None:
                self._connection = HTTPConnection(*self._address, timeout=10)
            try:
                self._connection.request(
                    "POST", path, body=body, headers={"Content-Type": "application/json"}
                )
                reply = self._connection.getresponse()
                answer = reply.read()
                break
            except (ConnectionError, OSError):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
        self.statuses[reply.status] += 1
        if reply.status >= 500:
            raise AssertionError(f"HTTP {reply.status}: {answer[:300]!r}")
        if reply.status >= 400:
            error = json.loads(answer)["error"]  # OpenAI-shaped
            assert error["code"] == reply.status and error["message"], answer

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


# --------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable[[], SearchStrategy[Any]]
    check: Callable[[Any], None]
    allowed: tuple[type[BaseException], ...] = (ScepsyError,)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("spec", lambda: documents(SPEC), check_spec),
        Target("cluster", lambda: documents(CLUSTER), check_cluster),
        Target("trace", trace_texts, check_trace),
        Target("allocation", lambda: documents(ALLOCATION), check_allocation),
        Target("http", http_bodies, lambda case: None),  # check: HttpCheck, bound at run time
        Target("http-request", http_requests, check_http_request),
        Target("proto", proto_inputs, check_proto, (ScepsyError, DecodeError)),
    )
}


@dataclass
class Result:
    target: str
    cases: int = 0
    crashes: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)  # the first few crashes
    statuses: dict[int, int] | None = None  # http: answers by status (5xx count as crashes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "cases": self.cases,
            "crashes": self.crashes,
            "seconds": round(self.seconds, 2),
            "examples": self.examples,
            **({"statuses": self.statuses} if self.statuses is not None else {}),
        }

    @property
    def status_5xx(self) -> int | None:
        if self.statuses is None:
            return None
        return sum(count for status, count in self.statuses.items() if status >= 500)


def run_target(
    target: Target, cases: int, seed: int = 0, check: Callable[[Any], None] | None = None
) -> Result:
    """Feed ``cases`` generated inputs to ``target``'s parser; count the crashes."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed

    result = Result(target.name)
    call = check or target.check

    @fixed_seed(seed)
    @settings(
        max_examples=cases,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(target.strategy())
    def feed(value: Any) -> None:
        result.cases += 1
        try:
            call(value)
        except target.allowed:
            pass
        except Exception as exc:  # a crash: counted, and the run goes on
            result.crashes += 1
            if len(result.examples) < 3:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                result.examples.append(
                    f"{type(exc).__name__}: {str(exc)[:200]} at {where.filename}:{where.lineno}"
                    f" on {value!r:.200}"
                )

    started = time.monotonic()
    feed()
    result.seconds = time.monotonic() - started
    return result


def run(names: list[str], cases: int, seed: int) -> list[Result]:
    results = []
    for name in names:
        target = TARGETS[name]
        if name == "http":
            with running_router() as address:
                check = HttpCheck(address)
                try:
                    results.append(run_target(target, cases, seed, check))
                    results[-1].statuses = dict(sorted(check.statuses.items()))
                finally:
                    check.close()
        else:
            results.append(run_target(target, cases, seed))
    return results


def register(sub: Any) -> None:
    fuzz = sub.add_parser(
        "fuzz", help="feed hostile input to every parser; count cases and crashes"
    )
    fuzz.add_argument("--cases", type=int, default=10_000, help="inputs per target")
    fuzz.add_argument(
        "--target",
        action="append",
        choices=sorted(TARGETS),
        help="a target to run (repeatable; default: all)",
    )
    fuzz.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    fuzz.add_argument(
        "--max-memory-gib",
        type=float,
        help="cap this process's address space (e.g. 4): a parser that blows up memory fails "
        "its case with a MemoryError (a crash) instead of taking the host's memory; processes "
        "it starts inherit the cap",
    )
    fuzz.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fuzz.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from services.core.errors import InvalidInputError

    if args.cases < 1:
        raise InvalidInputError(f"--cases: must be >= 1, got {args.cases}")
    try:
        import hypothesis  # noqa: F401 - a development dependency
    except ImportError:
        raise InvalidInputError(
            "fuzz: needs hypothesis (a development dependency): pip install -e '.[dev]'"
        ) from None
    if args.max_memory_gib is not None:
        if args.max_memory_gib <= 0:
            raise InvalidInputError(f"--max-memory-gib: must be > 0, got {args.max_memory_gib}")
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = int(args.max_memory_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))
    names = args.target or list(TARGETS)
    results = run(names, args.cases, args.seed)
    if args.json:
        print(json.dumps([r.as_dict() for r in results]))
    else:
        print(f"{'target':<12} {'cases':>8} {'crashes':>8} {'5xx':>6} {'seconds':>8}")
        for r in results:
            fives = "-" if r.status_5xx is None else str(r.status_5xx)
            print(f"{r.target:<12} {r.cases:>8} {r.crashes:>8} {fives:>6} {r.seconds:>8.1f}")
            for example in r.examples:
                print(f"  {example}")
    return 1 if any(r.crashes for r in results) else 0
