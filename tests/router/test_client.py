"""The workflow-request context: nesting and the tags it carries. The tagging clients (bound
openai clients, tagging httpx clients, gRPC metadata) are tested against real engines in
``test_engines``."""

from __future__ import annotations

import pytest

from services.router.client import current_request, workflow_request


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
