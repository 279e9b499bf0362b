"""The JSON depth check the front ends apply before parsing: brackets inside strings do not
count, and the count stops just past the limit."""

from __future__ import annotations

import pytest

from services.router.schema import json_depth


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b'"x"', 0),
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),  # { [ { [
        (b'{"a": "[[[\\"[", "b": [[1]]}', 3),  # { [ [ ; the string's brackets and \" skipped
        (b"[{}]", 2),
        (b"[][][]", 1),
        (b"[" * 1000 + b"]" * 1000, 65),  # counted to the limit + 1 only
        (b"[[]" * 100, 65),  # unbalanced, 100 open: still counted
        (b"[" * 65 + b"]" * 65, 65),
        (b"[}", 0),  # mismatched: left to the parser
    ],
)
def test_json_depth(raw: bytes, depth: int) -> None:
    assert json_depth(raw, 64) == depth
