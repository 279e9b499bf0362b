"""The spec a re-plan is made from, and the moves between two placements."""

from __future__ import annotations

import pytest
import yaml

from services.core.control.moves import Move, diff, moves_dict
from services.core.control.respec import respec, spec_workflows, traced_name
from services.core.errors import InvalidInputError
from services.core.placement.rules import DEFAULT_MEMORY_MARGIN, Assignment, make_assignment

SPEC = """
version: 1
models: {A: Qwen/Qwen2.5-0.5B, B: Qwen/Qwen3-0.6B}
workflows:
  - name: rag
    rate: 2
    stats:
      llms: {A: {n: 2, prompt_tokens: 100, completion_tokens: 10}}
  - name: chat
    rate: 1.5
    trace: router
    trace_workflow: chat-v2
  - name: batch
    rate: 0.5
    trace: traces/batch.jsonl
"""


def test_nothing_to_change_keeps_the_text_byte_for_byte() -> None:
    assert respec(SPEC, {}) == SPEC


def test_rates_and_traced_workflows_change_only_those() -> None:
    text = respec(SPEC, {"rag": 3.123456, "chat": 0.25}, frozenset({"rag", "batch"}))
    doc = yaml.safe_load(text)
    rag, chat, batch = doc["workflows"]
    # rag: its observed rate (4 significant digits), and the router's trace instead of stats
    assert rag == {"name": "rag", "rate": 3.123, "trace": "router"}
    # chat: the rate only; it keeps the trace workflow it is recorded under
    assert chat == {"name": "chat", "rate": 0.25, "trace": "router", "trace_workflow": "chat-v2"}
    # batch: a trace file becomes the router's trace, the rate stays
    assert batch == {"name": "batch", "rate": 0.5, "trace": "router"}
    assert doc["models"] == {"A": "Qwen/Qwen2.5-0.5B", "B": "Qwen/Qwen3-0.6B"}
    assert [traced_name(w) for w in spec_workflows(text)] == ["rag", "chat-v2", "batch"]


def test_json_specs_and_errors() -> None:
    as_json = '{"version": 1, "workflows": [{"name": "w", "rate": 1, "stats": {}}]}'
    assert yaml.safe_load(respec(as_json, {"w": 2.0}))["workflows"][0]["rate"] == 2.0
    with pytest.raises(InvalidInputError, match=r"rates\.w: must be > 0"):
        respec(as_json, {"w": 0.0})
    with pytest.raises(InvalidInputError, match="spec: workflows: must be a list"):
        respec("version: 1\n", {"w": 1.0})
    with pytest.raises(InvalidInputError, match="spec: top level: must be a mapping"):
        respec("- 1\n", {"w": 1.0})


def a(model: str, replica: int, node: str, gpus: tuple[int, ...], units: int = 4) -> Assignment:
    return make_assignment(model, replica, node, gpus, units, 4, DEFAULT_MEMORY_MARGIN)


@pytest.mark.parametrize(
    "old, new, kept, expected",
    [
        # nothing changes
        ([a("A", 0, "n1", (0,))], [a("A", 0, "n1", (0,))], 1, []),
        # same configuration elsewhere: moved; a new replica: started
        (
            [a("A", 0, "n2", (0,))],
            [a("A", 0, "n1", (1,)), a("A", 1, "n1", (0,))],
            0,
            [Move("move", "A", 0, "n2:0@4/4", "n1:1@4/4"), Move("start", "A", 1, "", "n1:0@4/4")],
        ),
        # TP 1 -> TP 2 under the same replica id: resized; B gone: stopped
        (
            [a("A", 0, "n1", (0,)), a("B", 0, "n1", (1,), 2)],
            [a("A", 0, "n1", (0, 1))],
            0,
            [
                Move("resize", "A", 0, "n1:0@4/4", "n1:0,1@4/4"),
                Move("stop", "B", 0, "n1:1@2/4", ""),
            ],
        ),
    ],
)
def test_moves(
    old: list[Assignment], new: list[Assignment], kept: int, expected: list[Move]
) -> None:
    moves = diff(old, new, 4)
    assert (moves.kept, list(moves.moves)) == (kept, expected)
    assert moves_dict(moves)["kept"] == kept
