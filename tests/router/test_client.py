"""The workflow-request client helpers: explicit headers, bound clients, tagging httpx clients."""

from __future__ import annotations

import asyncio

import openai
import pytest

from services.router.client import (
    current_request,
    tagged_async_http_client,
    tagged_http_client,
    workflow_request,
)
from services.runtime.store import Store
from tests.router.conftest import StartEngine, StartRouter, register


def test_workflow_request_nests_and_restores() -> None:
    assert current_request() is None
    with workflow_request("outer") as outer:
        assert len(outer.request_id) == 32
        with workflow_request("inner", "fixed") as inner:
            assert current_request() == inner
            assert inner.headers == {"x-scepsy-workflow": "inner", "x-scepsy-request-id": "fixed"}
            assert inner.metadata == tuple(inner.headers.items())
        assert current_request() == outer
    assert current_request() is None
    with pytest.raises(ValueError, match="workflow"), workflow_request(""):
        pass


async def test_tagged_http_clients_tag_calls_of_the_current_request_only(
    start_engine: StartEngine, start_router: StartRouter, store: Store
) -> None:
    await register(store, "m", await start_engine("m"))
    handle = await start_router()
    base = handle.http_url + "/v1"
    async with openai.AsyncOpenAI(
        base_url=base, api_key="x", http_client=tagged_async_http_client(), max_retries=0
    ) as client:
        with workflow_request("agent", "a-1"):
            # tasks started inside the request inherit it
            await asyncio.gather(*(client.completions.create(model="m", prompt="x")
                                   for _ in range(2)))  # fmt: skip
        await client.completions.create(model="m", prompt="untagged")

    def sync_calls() -> None:
        with (
            openai.OpenAI(
                base_url=base, api_key="x", http_client=tagged_http_client(), max_retries=0
            ) as client,
            workflow_request("agent", "a-2"),
        ):
            client.completions.create(model="m", prompt="x")

    await asyncio.to_thread(sync_calls)
    calls = await handle.trace(4)
    assert [(c["workflow"], c["request_id"] if c["workflow"] != "untagged" else None)
            for c in calls] == [("agent", "a-1"), ("agent", "a-1"), ("untagged", None),
                                ("agent", "a-2")]  # fmt: skip
