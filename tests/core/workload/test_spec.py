"""The deployment spec: parsing, file references, and errors naming the field path."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.core.cluster.declared import parse_cluster
from services.core.cluster.inventory import NodeInventory
from services.core.cluster.models import ModelSpec, model_spec
from services.core.errors import InvalidInputError, NotFoundError
from services.core.workload.demand import LlmDemand
from services.core.workload.spec import load_spec, parse_spec
from services.core.workload.stats import WorkflowStats, workflow_stats
from services.core.workload.trace import Trace, TraceCall, TraceRequest, write_trace

INLINE: dict[str, Any] = {
    "version": 1,
    "cluster": {"gpu_type": "H100-SXM", "gpus": 8},
    "models": {"llama-8b": "meta-llama/Llama-3.1-8B", "prm": "llama3.1-8b-prm"},
    "workflows": [
        {
            "name": "agent",
            "rate": 2,
            "stats": {
                "tool_time": 0.4,
                "stages": [["llama-8b", "prm"]],
                "llms": {
                    "llama-8b": {"n": 3, "p": 1.5, "prompt_tokens": 900, "completion_tokens": 150},
                    "prm": {"n": 3, "prompt_tokens": 1100, "completion_tokens": 1},
                },
            },
        }
    ],
}

# one request: llama-8b [0,1] with 100/10 tokens, then 0.5 s of tool time, then prm [1.5,2]
TRACE = Trace(
    calls=(
        TraceCall("rag", "r1", "c1", "llama-8b", 0.0, 1.0, 100, 10),
        TraceCall("rag", "r1", "c2", "prm", 1.5, 2.0, 300, 1),
    ),
    requests=(TraceRequest("rag", "r1", 0.0, 2.0),),
)


class FakeFiles:
    """In-memory SpecFiles: traces and clusters by path."""

    def __init__(self) -> None:
        self.traces = {"rag.jsonl": workflow_stats(TRACE)}
        self.clusters = {
            "c.yaml": parse_cluster(
                {"version": 1, "nodes": [{"name": "n", "gpu_type": "L40S", "gpus": 4}]}
            )
        }

    def trace_stats(self, path: str) -> tuple[WorkflowStats, ...]:
        if path not in self.traces:
            raise InvalidInputError(f"trace {path!r}: cannot read: No such file or directory")
        return self.traces[path]

    def cluster(self, path: str) -> tuple[NodeInventory, ...]:
        return self.clusters[path]

    def model_config(self, path: str) -> ModelSpec:
        return model_spec("Qwen/Qwen3-0.6B")

    def weights(self, path: str) -> str:
        if "missing" in path:
            raise NotFoundError(f"weights path /base/{path} does not exist")
        return path if path.startswith("/") else f"/base/{path.removeprefix('./')}"


def test_inline_spec_and_defaults() -> None:
    spec = parse_spec(INLINE)
    assert (spec.fraction_unit, spec.rho) == (4, 0.9)
    assert (spec.gpu_type, spec.gpu_count) == ("H100-SXM", 8)
    assert spec.models["prm"].name == "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"
    (w,) = spec.workflows
    assert (w.name, w.rate, w.weight, w.source) == ("agent", 2.0, 1.0, "inline")
    assert w.demand.llms == (LlmDemand("llama-8b", 3, 1.5), LlmDemand("prm", 3, 1.0))
    assert w.demand.stages == (("llama-8b", "prm"),)
    assert w.demand.tool_time == 0.4
    assert set(spec.token_mix("prm")) == {(1100, 1)}
    assert spec.target_rates == {"agent": 2.0}


def test_trace_workflow_and_file_references() -> None:
    doc = copy.deepcopy(INLINE)
    doc.update(
        cluster="c.yaml", fraction_unit=2, rho=0.8, models={**doc["models"], "q": "q/config.json"}
    )
    doc["workflows"].append(
        {"name": "retrieval", "trace": "rag.jsonl", "trace_workflow": "rag", "rate": 1, "weight": 3}
    )
    spec = parse_spec(doc, files=FakeFiles())
    assert (spec.gpu_type, spec.gpu_count, spec.fraction_unit, spec.rho) == ("L40S", 4, 2, 0.8)
    assert spec.models["q"].name == "Qwen/Qwen3-0.6B"
    w = spec.workflows[1]
    assert (w.name, w.weight, w.source) == ("retrieval", 3.0, "rag.jsonl")
    # n = 1 for both, serial stages, tool time 0.5 (the gap [1, 1.5])
    assert w.demand.llms == (LlmDemand("llama-8b", 1, 1), LlmDemand("prm", 1, 1))
    assert w.demand.stages == (("llama-8b",), ("prm",))
    assert w.demand.tool_time == pytest.approx(0.5)
    # prm's mix weighs each workflow by its calls/s: agent 2 x 3 = 6, retrieval 1 x 1 = 1
    assert spec.token_mix("prm", size=7) == ((1100, 1),) * 6 + ((300, 1),)
    assert len(spec.token_mix("prm")) == 857 + 143
    assert spec.token_mix("q") == ()


def test_load_spec_from_disk(tmp_path: Path) -> None:
    write_trace(tmp_path / "traces.jsonl", TRACE.calls, TRACE.requests)
    (tmp_path / "cluster.yaml").write_text(
        "version: 1\nnodes:\n"
        "  - {name: a, gpu_type: A100-80GB-PCIe, gpus: 4, interconnect: nvlink-pairs}\n"
    )
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 1,
                "intermediate_size": 128,
                "vocab_size": 1000,
            }
        )
    )
    (tmp_path / "spec.yaml").write_text(
        """
version: 1
cluster: cluster.yaml
models:
  llama-8b: {config: m}
  prm: m/config.json
workflows:
  - {name: rag, trace: traces.jsonl, rate: 0.5}
"""
    )
    spec = load_spec(tmp_path / "spec.yaml")
    assert (spec.gpu_type, spec.gpu_count) == ("A100-80GB-PCIe", 4)
    assert spec.models["llama-8b"].layers == 2
    assert spec.workflows[0].source == "traces.jsonl"


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("version: [1\n")
    with pytest.raises(InvalidInputError, match=r"bad\.yaml: not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "s.yaml").write_text(json.dumps({**INLINE, "cluster": "nope.yaml"}))
    with pytest.raises(InvalidInputError, match=r"^s\.yaml: cluster: .*nope\.yaml: cannot read"):
        load_spec(tmp_path / "s.yaml")


def edit(path: str, value: Any) -> dict[str, Any]:
    """INLINE with the value at a dotted path replaced (``None`` deletes it)."""
    doc = copy.deepcopy(INLINE)
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is None:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


W = "spec: workflows[0]"
S = "workflows.0.stats"
L = "workflows.0.stats.llms.prm"
ERRORS: list[tuple[str, Any, str]] = [
    ("not a mapping", [1], "spec: top level: must be a mapping, got list"),
    ("unknown top field", edit("gpus", 3), "spec: gpus: unknown field"),
    ("missing version", edit("version", None), "spec: version: must be 1, got None"),
    ("version 2", edit("version", 2), "spec: version: must be 1, got 2"),
    ("bad k", edit("fraction_unit", 0), "spec: fraction_unit: must be a positive integer, got 0"),
    ("bad rho", edit("rho", 1.5), "spec: rho: must be in (0, 1], got 1.5"),
    ("rho text", edit("rho", "high"), "spec: rho: must be a number, got 'high'"),
    ("no cluster", edit("cluster", None), "spec: cluster: missing"),
    ("bad gpu", edit("cluster.gpu_type", "X1"), "spec: cluster: nodes[0].gpu_type: gpu type 'X1'"),
    ("bad gpus", edit("cluster.gpus", 0), "spec: cluster: nodes[0].gpus: must be a positive int"),
    ("cluster field", edit("cluster.nodez", 1), "spec: cluster.nodez: unknown field"),
    ("file without reader", edit("cluster", "c.yaml"), "spec: cluster: refers to a file"),
    ("no models", edit("models", {}), "spec: models: must be a non-empty mapping"),
    ("unknown model", edit("models.prm", "gpt-17"), "spec: models.prm: model 'gpt-17' is not in"),
    ("bad model ref", edit("models.prm", {"path": "x"}), "spec: models.prm.path: unknown field"),
    ("no workflows", edit("workflows", []), "spec: workflows: must be a non-empty list"),
    ("bad rate", edit("workflows.0.rate", -1), f"{W}.rate: must be a positive number, got -1"),
    ("no rate", edit("workflows.0.rate", None), f"{W}.rate: must be a positive number, got None"),
    ("bad weight", edit("workflows.0.weight", 0), f"{W}.weight: must be a positive number"),
    ("no name", edit("workflows.0.name", ""), f"{W}.name: must be a non-empty string"),
    ("wf field", edit("workflows.0.target", 3), f"{W}.target: unknown field"),
    ("both sources", edit("workflows.0.trace", "t.jsonl"), f"{W}: needs exactly one of"),
    ("no source", edit(S, None), f"{W}: needs exactly one of"),
    (
        "undeclared llm",
        edit("models.prm", None),
        f"{W}.stats.llms.prm: model 'prm' is not declared",
    ),
    ("bad n", edit(f"{L}.n", 0), f"{W}.stats.llms.prm.n: must be a positive number, got 0"),
    ("bad p", edit(f"{L}.p", 0.5), f"{W}.stats.llms.prm.p: must be >= 1, got 0.5"),
    ("no tokens", edit(f"{L}.prompt_tokens", None), f"{W}.stats.llms.prm.prompt_tokens: must be a"),
    ("llm field", edit(f"{L}.ttft", 1), f"{W}.stats.llms.prm.ttft: unknown field"),
    ("bad tool", edit(f"{S}.tool_time", -1), f"{W}.stats.tool_time: must be >= 0"),
    ("bad stages", edit(f"{S}.stages", [["prm"]]), f"{W}.stats.stages: must be a list of lists"),
    ("no llms", edit(f"{S}.llms", {}), f"{W}.stats.llms: must be a non-empty mapping"),
]


@pytest.mark.parametrize(("case", "doc", "message"), ERRORS, ids=[c for c, _, _ in ERRORS])
def test_errors_name_the_field(case: str, doc: Any, message: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_spec(doc)
    assert str(info.value).startswith(message), (case, str(info.value))


def test_duplicate_workflow() -> None:
    doc = copy.deepcopy(INLINE)
    doc["workflows"].append(copy.deepcopy(doc["workflows"][0]))
    with pytest.raises(
        InvalidInputError, match=r"spec: workflows\[1\]\.name: duplicate workflow 'agent'"
    ):
        parse_spec(doc)


@pytest.mark.parametrize(
    ("workflow", "message"),
    [
        (
            {"name": "rag", "trace": "other.jsonl", "rate": 1},
            "spec: workflows[1].trace: trace 'other.jsonl': cannot read",
        ),
        (
            {"name": "chat", "trace": "rag.jsonl", "rate": 1},
            "spec: workflows[1].trace: no requests of workflow 'chat' in rag.jsonl (found: ['rag'",
        ),
    ],
)
def test_trace_reference_errors(workflow: dict[str, Any], message: str) -> None:
    doc = copy.deepcopy(INLINE)
    doc["workflows"].append(workflow)
    with pytest.raises(InvalidInputError) as info:
        parse_spec(doc, files=FakeFiles())
    assert str(info.value).startswith(message)


def test_trace_model_must_be_declared() -> None:
    doc = copy.deepcopy(INLINE)
    doc["models"] = {"llama-8b": "meta-llama/Llama-3.1-8B"}
    doc["workflows"] = [{"name": "rag", "trace": "rag.jsonl", "rate": 1}]
    with pytest.raises(
        InvalidInputError, match=r"workflows\[0\]\.trace: model 'prm' is not declared"
    ):
        parse_spec(doc, files=FakeFiles())


SERVED = """
version: 1
cluster: {gpu_type: cpu, gpus: 2}
models:
  gen: Qwen/Qwen3-0.6B
  tiny:
    config: ./models/tiny
    max_model_len: 256
    engine_args: [--max-num-seqs, "8"]
  named: {model: Qwen/Qwen3-0.6B, weights: /w/qwen, served_name: qwen}
workflows:
  - name: w
    rate: 1
    stats: {llms: {gen: {n: 1, prompt_tokens: 10, completion_tokens: 2}}}
"""


def test_serving_defaults_and_long_form() -> None:
    spec = parse_spec(yaml.safe_load(SERVED), files=FakeFiles())
    gen, tiny, named = (spec.serving[m] for m in ("gen", "tiny", "named"))
    # a catalogue name is also the Hugging Face id of the weights; the key is the served name
    assert (gen.weights, gen.served_name, gen.max_model_len, gen.local) == (
        "Qwen/Qwen3-0.6B",
        "gen",
        None,
        False,
    )
    # a local config's directory holds the weights; it becomes absolute through SpecFiles
    assert (tiny.weights, tiny.max_model_len, tiny.engine_args) == (
        "/base/models/tiny",
        256,
        ("--max-num-seqs", "8"),
    )
    assert (named.weights, named.served_name, named.local) == ("/w/qwen", "qwen", True)


@pytest.mark.parametrize(
    ("entry", "field", "problem"),
    [
        ({"model": "Qwen/Qwen3-0.6B", "weights": "./missing"}, "models.m.weights", "missing"),
        ({"model": "Qwen/Qwen3-0.6B", "weights": ""}, "models.m.weights", "non-empty"),
        ({"model": "Qwen/Qwen3-0.6B", "max_model_len": 0}, "models.m.max_model_len", "positive"),
        ({"model": "Qwen/Qwen3-0.6B", "engine_args": "--x"}, "models.m.engine_args", "list"),
        (
            {"model": "Qwen/Qwen3-0.6B", "engine_args": ["--port=9"]},
            "models.m.engine_args",
            "set by Scepsy",
        ),
        ({"weights": "/w"}, "models.m", "exactly one of 'model'"),
        ({"model": "Qwen/Qwen3-0.6B", "gpus": 2}, "models.m.gpus", "unknown field"),
        ({"config": {"hidden_size": 8}}, "models.m", "missing field"),
    ],
)
def test_serving_errors_name_the_field(entry: dict[str, object], field: str, problem: str) -> None:
    doc = yaml.safe_load(SERVED)
    doc["models"] = {"m": entry}
    doc["workflows"][0]["stats"]["llms"] = {
        "m": {"n": 1, "prompt_tokens": 1, "completion_tokens": 1}
    }
    with pytest.raises(InvalidInputError) as caught:
        parse_spec(doc, files=FakeFiles())
    assert str(caught.value).startswith(f"spec: {field}: "), str(caught.value)
    assert problem in str(caught.value)


def test_missing_local_weights_name_the_model_and_path(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(
        SERVED.replace("config: ./models/tiny", "model: Qwen/Qwen3-0.6B\n    weights: ./nope")
    )
    with pytest.raises(InvalidInputError) as caught:
        load_spec(tmp_path / "spec.yaml")
    message = str(caught.value)
    assert "models.tiny.weights" in message and "'tiny'" in message
    assert str(tmp_path / "nope") in message


def test_relative_weights_without_a_spec_file_are_refused() -> None:
    doc = yaml.safe_load(SERVED)
    doc["models"] = {"gen": {"model": "Qwen/Qwen3-0.6B", "weights": "./w"}}
    with pytest.raises(InvalidInputError, match=r"models.gen.weights: .*needs the spec file"):
        parse_spec(doc)
