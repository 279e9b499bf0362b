"""Input nested thousands of levels deep is a clear error naming the source, never a crash
(the YAML and JSON parsers recurse per level)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.cluster.declared import cluster_from_text
from services.core.errors import InvalidInputError, ScepsyError
from services.core.planning.plan import spec_from_text
from services.core.workload.spec import load_spec
from services.core.workload.trace import parse_trace_lines

DEEP_YAML = "[" * 20_000 + "]" * 20_000
DEEP_JSON = '{"v": ' + "[" * 20_000 + "]" * 20_000 + "}"


def test_deep_spec_text_and_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^spec_yaml: nested too deeply"):
        spec_from_text(DEEP_YAML, source="spec_yaml")
    (tmp_path / "deep.yaml").write_text(DEEP_YAML)
    with pytest.raises(InvalidInputError, match=r"deep.yaml: nested too deeply"):
        load_spec(tmp_path / "deep.yaml")


def test_deep_cluster_and_trace() -> None:
    with pytest.raises(ScepsyError, match=r"^cluster.yaml: nested too deeply"):
        cluster_from_text(DEEP_YAML, source="cluster.yaml")
    with pytest.raises(InvalidInputError, match=r"^t.jsonl line 1: nested too deeply"):
        parse_trace_lines([DEEP_JSON], source="t.jsonl")
