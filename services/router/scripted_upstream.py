"""An OpenAI-compatible upstream that answers at once, from a script instead of a model.

Its main role is the router benchmark's "upstream that answers at once", which isolates the
router's own cost (``scripts/bench_router.py``). Router tests use it only for conditions a real
vLLM engine cannot produce on demand: a ``/health`` that flips to 503, a replica answering 500
before its first byte, a stream that breaks off mid-way, a replica that comes back on the same
port; everything else is tested on real engines (``tests/router/test_engines.py``).

It serves ``/health``, ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``,
streamed or not. The answer is ``max_tokens`` words ``w0 w1 ...`` (``tokens`` when unset); with
``n`` > 1, choice ``i`` > 0 says ``s{i}w0 s{i}w1 ...`` and a stream interleaves the choices token
by token, as vLLM does. ``prompt_tokens`` counts the prompt's words. Timing:
``first_token_delay_s`` before the first token, ``token_delay_s`` between tokens. It counts the
calls it got; ``healthy = False`` makes ``/health`` answer 503, ``health_delays`` holds the
delays of the next ``/health`` answers (one popped per check: a busy engine answering slowly) and
``fail_status`` makes every call answer that HTTP status.

``python -m services.router.scripted_upstream --model M [--port P]`` runs one and prints
``{"url": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web


class ScriptedUpstream:
    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: int = 4,
        first_token_delay_s: float = 0.0,
        token_delay_s: float = 0.0,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.tokens = tokens
        self.first_token_delay_s = first_token_delay_s
        self.token_delay_s = token_delay_s
        self.healthy = True
        self.health_delays: list[float] = []  # the next /health answers wait this long, in turn
        self.fail_status: int | None = None  # answer every call with this HTTP status
        self.calls = 0
        self.peers: set[tuple[str, int]] = set()  # client addresses of the generation calls
        self._runner: web.AppRunner | None = None

    @property
    def connections(self) -> int:
        """Connections the generation calls came on."""
        return len(self.peers)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Close the port and every connection at once (like a killed engine)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        if self.health_delays:
            await _sleep(self.health_delays.pop(0))
        return web.Response(status=200 if self.healthy else 503)

    async def _models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model, "object": "model", "created": 1, "owned_by": "vllm",
                 "root": f"/models/{self.model}", "parent": None, "max_model_len": 256}  # fmt: skip
        return web.json_response({"object": "list", "data": [entry]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, chat=True)

    async def _answer(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        body = await request.json()
        if body.get("model") != self.model:
            return web.json_response(
                {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                           "type": "NotFoundError", "param": None, "code": 404}},
                status=404,
            )  # fmt: skip
        self.calls += 1
        if self.fail_status is not None:
            return web.json_response(
                {"error": {"message": "scripted failure", "type": "InternalServerError",
                           "param": None, "code": self.fail_status}},
                status=self.fail_status,
            )  # fmt: skip
        await _sleep(self.first_token_delay_s)
        length = int(body.get("max_tokens") or self.tokens)
        words = [
            [f"w{j}" if i == 0 else f"s{i}w{j}" for j in range(length)]
            for i in range(int(body.get("n") or 1))
        ]
        usage = {
            "prompt_tokens": _prompt_words(body, chat),
            "completion_tokens": length * len(words),
            "total_tokens": _prompt_words(body, chat) + length * len(words),
        }
        if body.get("stream"):
            return await self._stream(request, body, chat, words, usage)
        choices: list[dict[str, Any]] = []
        for i, sequence in enumerate(words):
            text = " ".join(sequence)
            choice: dict[str, Any] = {"index": i, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return web.json_response(
            {"id": _id(), "object": "chat.completion" if chat else "text_completion",
             "created": int(time.time()), "model": self.model, "choices": choices,
             "usage": usage}
        )  # fmt: skip

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        words: list[list[str]],
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        cid = _id()
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            chunk = {"id": cid, "object": kind, "model": self.model, "choices": choices}
            data = json.dumps({**chunk, **(extra or {})}).encode()
            await response.write(b"data: " + data + b"\n\n")

        if chat:
            for i in range(len(words)):
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}}])
        for j in range(len(words[0])):
            if j:
                await _sleep(self.token_delay_s)
            for i, sequence in enumerate(words):
                piece = sequence[j] if j == 0 else " " + sequence[j]
                last = j == len(sequence) - 1
                choice: dict[str, Any] = {"index": i, "finish_reason": "length" if last else None}
                choice.update({"delta": {"content": piece}} if chat else {"text": piece})
                await send([choice])
        if (body.get("stream_options") or {}).get("include_usage"):
            await send([], {"usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _sleep(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


def _id() -> str:
    return "scripted-" + uuid.uuid4().hex[:12]


def _prompt_words(body: dict[str, Any], chat: bool) -> int:
    if chat:
        return sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
    prompt = body.get("prompt")
    return len(prompt.split()) if isinstance(prompt, str) else len(prompt or [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.router.scripted_upstream")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--first-token-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args(argv)

    async def run() -> None:
        upstream = ScriptedUpstream(
            args.model,
            host=args.host,
            port=args.port,
            tokens=args.tokens,
            first_token_delay_s=args.first_token_delay,
            token_delay_s=args.token_delay,
        )
        await upstream.start()
        print(json.dumps({"url": upstream.url}), flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
