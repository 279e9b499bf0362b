"""The model catalogue: architecture facts, derived quantities, lookup and config.json loading."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from services.core.cluster.models import (
    CATALOGUE,
    ModelSpec,
    load_hf_config,
    model_spec,
    resolve_model,
)
from services.core.errors import InvalidInputError, NotFoundError
from services.profiler.tiny_model import ARCHITECTURE, MIN_VOCAB

DATA = (
    Path(__file__).resolve().parents[3].parent / "shared/data/llm-inference-bench/All_results.csv"
)

# Published parameter counts (model cards / papers), in billions.
PUBLISHED = [
    ("meta-llama/Llama-2-7b-hf", 6.74),
    ("meta-llama/Llama-2-70b-hf", 68.98),
    ("meta-llama/Meta-Llama-3-8B", 8.03),
    ("meta-llama/Meta-Llama-3-70B", 70.55),
    ("mistralai/Mistral-7B-v0.1", 7.24),
    ("mistralai/Mixtral-8x7B-v0.1", 46.70),
    ("Qwen/Qwen2-7B", 7.62),
    ("Qwen/Qwen2.5-0.5B", 0.494),
    ("Qwen/Qwen2.5-72B", 72.7),
    ("Qwen/Qwen3-8B", 8.19),
    ("meta-llama/Llama-3.2-1B", 1.24),
    ("EleutherAI/gpt-j-6b", 6.05),
    ("bigscience/bloom-7b1", 7.07),
    ("facebook/opt-6.7b", 6.66),
]


@pytest.mark.parametrize(("name", "billions"), PUBLISHED)
def test_parameter_count_matches_published(name: str, billions: float) -> None:
    assert model_spec(name).param_count / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize(
    ("name", "kv_bytes"),
    [
        # 2 (K, V) x layers x kv_heads x head_dim x 2 bytes
        ("meta-llama/Llama-2-7b-hf", 2 * 32 * 32 * 128 * 2),  # 512 KiB: full multi-head
        ("meta-llama/Meta-Llama-3-8B", 2 * 32 * 8 * 128 * 2),  # 128 KiB: 8 KV heads
        ("Qwen/Qwen3-0.6B", 2 * 28 * 8 * 128 * 2),  # head_dim 128 although hidden/heads = 64
        ("tiny-llama", 2 * 2 * 1 * 64 * 4),  # float32
    ],
)
def test_kv_bytes_per_token(name: str, kv_bytes: int) -> None:
    assert model_spec(name).kv_bytes_per_token == kv_bytes


def test_derived_quantities_of_llama2_7b_by_hand() -> None:
    m = model_spec("meta-llama/Llama-2-7b-hf")
    attention = 4 * 4096 * 4096  # Q, K, V, O all 4096 x 4096
    mlp = 3 * 4096 * 11008  # gate, up, down
    assert m.attention_params == attention
    assert m.expert_params == mlp
    assert m.param_count == 32 * (attention + mlp) + 2 * 32000 * 4096
    assert m.weight_bytes == 2 * m.param_count
    # one token multiplies through every layer and the LM head, not the input embedding
    assert m.flops_per_token == 2 * (32 * (attention + mlp) + 32000 * 4096)


def test_moe_counts_active_experts_only_in_flops() -> None:
    m = model_spec("mixtral-8x7b")
    assert (m.experts, m.active_experts) == (8, 2)
    # 2 of 8 experts: about 12.9B of 46.7B parameters work per token
    assert m.active_param_count / 1e9 == pytest.approx(12.75, rel=0.01)
    assert m.flops_per_token == 2 * m.active_param_count


def test_tiny_llama_matches_the_local_test_model() -> None:
    m = model_spec("tiny-llama")
    assert m.hidden == ARCHITECTURE["hidden_size"]
    assert m.intermediate == ARCHITECTURE["intermediate_size"]
    assert m.layers == ARCHITECTURE["num_hidden_layers"]
    assert m.heads == ARCHITECTURE["num_attention_heads"]
    assert m.kv_heads == ARCHITECTURE["num_key_value_heads"]
    assert m.max_position == ARCHITECTURE["max_position_embeddings"]
    assert m.vocab == MIN_VOCAB
    assert m.dtype_bytes == 4


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("META-LLAMA/LLAMA-2-7B-HF", "meta-llama/Llama-2-7b-hf"),
        ("llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),
        ("other-org/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),  # a mirror of the same weights
        ("Llama-3-8B", "meta-llama/Meta-Llama-3-8B"),
        ("  qwen3-8b ", "Qwen/Qwen3-8B"),
        ("Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
        ("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"),
        ("Qwen/Qwen3-Reranker-4B", "Qwen/Qwen3-Reranker-4B"),
    ],
)
def test_lookup(query: str, name: str) -> None:
    assert model_spec(query).name == name


def test_unknown_model_says_how_to_describe_it() -> None:
    with pytest.raises(NotFoundError, match=r"'acme/unknown-13b'.*config\.json"):
        model_spec("acme/unknown-13b")


def test_catalogue_names_are_unique() -> None:
    names = [m.name.lower() for m in CATALOGUE]
    assert len(names) == len(set(names))


@pytest.mark.skipif(not DATA.is_file(), reason="shared reference data not present")
def test_every_model_of_the_reference_data_is_in_the_catalogue() -> None:
    with DATA.open(newline="") as fh:
        models = {r["Model"] for r in csv.DictReader(fh) if r["Framework"] == "vLLM"}
    assert models
    for name in sorted(models):
        assert model_spec(name).name == name


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kv_heads", 3, "kv_heads: 3 must divide heads 32"),
        ("layers", 0, "layers: must be > 0"),
        ("active_experts", 2, r"active_experts: must be in 1\.\.experts=1"),
        ("dtype_bytes", 3, "dtype_bytes: must be 1, 2 or 4"),
    ],
)
def test_spec_validation(field: str, value: int, message: str) -> None:
    base: dict[str, Any] = dict(
        name="x", layers=2, hidden=64, heads=32, kv_heads=8, head_dim=2, intermediate=8, vocab=10
    )
    with pytest.raises(InvalidInputError, match=message):
        ModelSpec(**{**base, field: value})


# --- Hugging Face config.json ---------------------------------------------------------------

LLAMA_CONFIG: dict[str, Any] = {
    "_name_or_path": "acme/llama-like-3b",
    "model_type": "llama",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_load_hf_config_equals_catalogue_entry(tmp_path: Path) -> None:
    # the same facts as Llama-3.2-3B, so the derived numbers must agree
    spec = load_hf_config(_write(tmp_path, LLAMA_CONFIG))
    ref = model_spec("meta-llama/Llama-3.2-3B")
    assert spec.name == "acme/llama-like-3b"
    assert spec.head_dim == 128  # 3072 / 24
    assert spec.param_count == ref.param_count
    assert spec.kv_bytes_per_token == ref.kv_bytes_per_token


def test_load_hf_config_from_directory_and_by_resolve(tmp_path: Path) -> None:
    _write(tmp_path, {**LLAMA_CONFIG, "_name_or_path": ""})
    assert load_hf_config(tmp_path).name == tmp_path.name
    assert resolve_model(str(tmp_path)).layers == 28
    assert resolve_model(str(tmp_path / "config.json")).layers == 28


def test_load_hf_config_moe_gptj_and_fp32(tmp_path: Path) -> None:
    moe = load_hf_config(
        _write(tmp_path, {**LLAMA_CONFIG, "num_local_experts": 8, "num_experts_per_tok": 2})
    )
    assert (moe.experts, moe.active_experts) == (8, 2)
    gptj = load_hf_config(
        _write(
            tmp_path,
            {
                "model_type": "gptj",
                "n_embd": 4096,
                "n_layer": 28,
                "n_head": 16,
                "n_inner": None,
                "vocab_size": 50400,
                "n_positions": 2048,
            },
        ),
        name="gptj",
    )
    assert gptj.param_count == model_spec("EleutherAI/gpt-j-6b").param_count
    fp32 = load_hf_config(_write(tmp_path, {**LLAMA_CONFIG, "torch_dtype": "float32"}))
    assert fp32.dtype_bytes == 4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": None}, "missing field 'num_hidden_layers'"),
        ({"hidden_size": None}, "missing field 'hidden_size'"),
        ({"intermediate_size": None}, "missing field 'intermediate_size'"),
        ({"vocab_size": -5}, "vocab_size: must be a positive integer"),
        ({"torch_dtype": "float64"}, "torch_dtype: unsupported 'float64'"),
    ],
)
def test_load_hf_config_errors_name_the_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    config = {k: v for k, v in {**LLAMA_CONFIG, **change}.items() if v is not None}
    with pytest.raises(InvalidInputError, match=message):
        load_hf_config(_write(tmp_path, config))


def test_load_hf_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such file"):
        load_hf_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        load_hf_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="must be a JSON object"):
        load_hf_config(bad)
