"""Model facts: the architecture catalogue every part agrees on.

A ``ModelSpec`` holds what the performance model needs to know about a decoder-only transformer:
shapes (layers, hidden size, heads, KV heads, head dim, MLP width, vocabulary), the mixture of
experts (``experts`` / ``active_experts``; 1/1 for dense models) and the bytes of one weight and
KV-cache element. Everything else (parameters, weight bytes, KV bytes per token, FLOPs per token)
is derived from those facts, so that the catalogue cannot disagree with itself.

Counting conventions (they match published parameter counts to within 0.5%): linear layers only
(norms and biases are ignored); the attention block is Q, K, V and O projections; a gated MLP
(SwiGLU) has three ``hidden x intermediate`` matrices, a plain MLP two; a MoE layer has
``experts`` MLPs plus a router; the input embedding and the LM head are ``vocab x hidden`` each
and count once when tied. Architecture figures come from each model's published ``config.json``.

``model_spec(name)`` looks a model up case-insensitively, with or without its organisation prefix
(``meta-llama/Llama-2-7b-hf`` or ``llama-2-7b-hf``) or by a short alias; ``load_hf_config(path)``
builds a spec from any Hugging Face ``config.json``; ``resolve_model`` accepts either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.errors import InvalidInputError, NotFoundError


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture facts of one decoder-only LLM (per model, independent of hardware)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # MLP width of one expert
    vocab: int
    experts: int = 1
    active_experts: int = 1  # experts each token is routed to
    dtype_bytes: int = 2  # weights and KV cache
    gated_mlp: bool = True  # SwiGLU-style MLP with gate, up and down matrices
    tied_embeddings: bool = False
    max_position: int = 4096  # context window from config.json (vLLM's default max_model_len)

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value > 0):
                raise InvalidInputError(f"model {self.name!r}: {field}: must be > 0, got {value!r}")
        if self.heads % self.kv_heads:
            raise InvalidInputError(
                f"model {self.name!r}: kv_heads: {self.kv_heads} must divide heads {self.heads}"
            )
        if not 1 <= self.active_experts <= self.experts:
            raise InvalidInputError(
                f"model {self.name!r}: active_experts: must be in 1..experts={self.experts}, "
                f"got {self.active_experts}"
            )
        if self.dtype_bytes not in (1, 2, 4):
            raise InvalidInputError(
                f"model {self.name!r}: dtype_bytes: must be 1, 2 or 4, got {self.dtype_bytes}"
            )

    # --- parameter counts (linear weights) ---------------------------------------------------

    @property
    def attention_params(self) -> int:
        """Q, K, V, O projection weights of one layer."""
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        return self.hidden * (2 * q_out + 2 * kv_out)

    @property
    def expert_params(self) -> int:
        """Weights of one MLP (one expert)."""
        return (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def router_params(self) -> int:
        return self.hidden * self.experts if self.experts > 1 else 0

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def param_count(self) -> int:
        per_layer = self.attention_params + self.experts * self.expert_params + self.router_params
        return self.layers * per_layer + self.embedding_params

    @property
    def active_param_count(self) -> int:
        """Weights one token multiplies through (the embedding lookup is not a matmul)."""
        per_layer = (
            self.attention_params + self.active_experts * self.expert_params + self.router_params
        )
        return self.layers * per_layer + self.lm_head_params

    # --- bytes and FLOPs ------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        return self.param_count * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the weights (2 per multiply-add), no attention."""
        return 2 * self.active_param_count

    def attention_flops(self, pairs: float) -> float:
        """FLOPs of attention over ``pairs`` (query, key) pairs: QK^T and PV, all layers."""
        return 4.0 * self.layers * self.heads * self.head_dim * pairs

    @property
    def is_moe(self) -> bool:
        return self.experts > 1


# Architecture rows: name, layers, hidden, heads, kv_heads, intermediate, vocab, max_position,
# then overrides of the Llama-family defaults (gated MLP, head_dim = hidden / heads, untied).
_Q2V = 152064  # vocabulary of Qwen2/2.5 at 7B and larger
_QV = 151936  # vocabulary of Qwen1.5, Qwen2.5 up to 3B, Qwen3
_L3V = 128256
_TIED: dict[str, Any] = {"tied_embeddings": True}
_Q3: dict[str, Any] = {"head_dim": 128}  # Qwen3 uses 128-wide heads at every size
_Q3T: dict[str, Any] = {"head_dim": 128, "tied_embeddings": True}
_PLAIN: dict[str, Any] = {"gated_mlp": False}  # GPT-style two-matrix MLP
_PLAIN_TIED: dict[str, Any] = {"gated_mlp": False, "tied_embeddings": True}
_NONE: dict[str, Any] = {}

_ROWS: tuple[tuple[str, int, int, int, int, int, int, int, dict[str, Any]], ...] = (
    # models of the llm-inference-bench vLLM rows
    ("meta-llama/Llama-2-7b-hf", 32, 4096, 32, 32, 11008, 32000, 4096, _NONE),
    ("meta-llama/Llama-2-70b-hf", 80, 8192, 64, 8, 28672, 32000, 4096, _NONE),
    ("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, _L3V, 8192, _NONE),
    ("meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, _L3V, 8192, _NONE),
    ("mistralai/Mistral-7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768, _NONE),
    (
        "mistralai/Mixtral-8x7B-v0.1", 32, 4096, 32, 8, 14336, 32000, 32768,
        {"experts": 8, "active_experts": 2},
    ),
    ("Qwen/Qwen2-7B", 28, 3584, 28, 4, 18944, _Q2V, 131072, _NONE),
    ("Qwen/Qwen2-72B", 80, 8192, 64, 8, 29568, _Q2V, 131072, _NONE),
    ("Qwen/Qwen1.5-7B", 32, 4096, 32, 32, 11008, _QV, 32768, _NONE),
    # DeciLM-7B varies its KV heads per layer (4, 2 or 1); vLLM serves it with the maximum (4) in
    # every layer, which is what memory and bandwidth see.
    ("Deci/DeciLM-7B", 32, 4096, 32, 4, 14336, 32000, 8192, _NONE),
    ("BAAI/Aquila-7B", 32, 4096, 32, 32, 11008, 100008, 2048, _NONE),
    ("huggyllama/llama-7b", 32, 4096, 32, 32, 11008, 32000, 2048, _NONE),
    ("EleutherAI/gpt-j-6b", 28, 4096, 16, 16, 16384, 50400, 2048, _PLAIN),
    ("bigscience/bloom-7b1", 30, 4096, 32, 32, 16384, 250880, 2048, _PLAIN_TIED),
    ("facebook/opt-6.7b", 32, 4096, 32, 32, 16384, 50272, 2048, _PLAIN_TIED),
    # Llama 3.1 / 3.2 and a process reward model built on Llama-3.1-8B
    ("meta-llama/Llama-3.1-8B", 32, 4096, 32, 8, 14336, _L3V, 131072, _NONE),
    ("meta-llama/Llama-3.1-70B", 80, 8192, 64, 8, 28672, _L3V, 131072, _NONE),
    ("meta-llama/Llama-3.2-1B", 16, 2048, 32, 8, 8192, _L3V, 131072, _TIED),
    ("meta-llama/Llama-3.2-3B", 28, 3072, 24, 8, 8192, _L3V, 131072, _TIED),
    ("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data", 32, 4096, 32, 8, 14336, _L3V, 131072, _NONE),
    # Qwen2.5
    ("Qwen/Qwen2.5-0.5B", 24, 896, 14, 2, 4864, _QV, 32768, _TIED),
    ("Qwen/Qwen2.5-1.5B", 28, 1536, 12, 2, 8960, _QV, 32768, _TIED),
    ("Qwen/Qwen2.5-3B", 36, 2048, 16, 2, 11008, _QV, 32768, _TIED),
    ("Qwen/Qwen2.5-7B", 28, 3584, 28, 4, 18944, _Q2V, 32768, _NONE),
    ("Qwen/Qwen2.5-14B", 48, 5120, 40, 8, 13824, _Q2V, 32768, _NONE),
    ("Qwen/Qwen2.5-32B", 64, 5120, 40, 8, 27648, _Q2V, 32768, _NONE),
    ("Qwen/Qwen2.5-72B", 80, 8192, 64, 8, 29568, _Q2V, 32768, _NONE),
    # Qwen3 and its reranker
    ("Qwen/Qwen3-0.6B", 28, 1024, 16, 8, 3072, _QV, 40960, _Q3T),
    ("Qwen/Qwen3-1.7B", 28, 2048, 16, 8, 6144, _QV, 40960, _Q3T),
    ("Qwen/Qwen3-4B", 36, 2560, 32, 8, 9728, _QV, 40960, _Q3T),
    ("Qwen/Qwen3-8B", 36, 4096, 32, 8, 12288, _QV, 40960, _Q3),
    ("Qwen/Qwen3-14B", 40, 5120, 40, 8, 17408, _QV, 40960, _Q3),
    ("Qwen/Qwen3-32B", 64, 5120, 64, 8, 25600, _QV, 40960, _Q3),
    ("Qwen/Qwen3-Reranker-4B", 36, 2560, 32, 8, 9728, _QV, 40960, _Q3T),
    # the local CPU test engine's model (services/profiler/tiny_model.py), saved as float32
    ("tiny-llama", 2, 64, 1, 1, 128, 10000, 256, {"dtype_bytes": 4}),
)  # fmt: skip

# Short names people use besides the repository names (the instruct variants share architectures).
_ALIASES: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "meta-llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B",
    "meta-llama-3-70b-instruct": "meta-llama/Meta-Llama-3-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "llama-7b": "huggyllama/llama-7b",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B",
    "meta-llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B",
    "meta-llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B",
    "llama3.1-8b-prm": "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data",
    "qwen2-7b-instruct": "Qwen/Qwen2-7B",
    "qwen2-72b-instruct": "Qwen/Qwen2-72B",
    **{f"qwen2.5-{s}-instruct": f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B")},
    **{f"qwen2.5-{s}-instruct": f"Qwen/Qwen2.5-{s}" for s in ("14B", "32B", "72B")},
}


def _build(row: tuple[str, int, int, int, int, int, int, int, dict[str, Any]]) -> ModelSpec:
    name, layers, hidden, heads, kv_heads, intermediate, vocab, max_position, extra = row
    fields: dict[str, Any] = {"head_dim": hidden // heads, **extra}
    return ModelSpec(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_position=max_position,
        **fields,
    )


CATALOGUE: tuple[ModelSpec, ...] = tuple(_build(row) for row in _ROWS)


_BY_NAME = {spec.name: spec for spec in CATALOGUE}
_INDEX: dict[str, ModelSpec] = {
    **{alias.lower(): _BY_NAME[name] for alias, name in _ALIASES.items()},
    **{spec.name.rsplit("/", 1)[-1].lower(): spec for spec in CATALOGUE},
    **{spec.name.lower(): spec for spec in CATALOGUE},
}


def model_spec(name: str) -> ModelSpec:
    """Catalogue entry for ``name`` (case-insensitive; organisation prefix optional).

    Raises ``NotFoundError`` for unknown names, saying how to describe the model instead.
    """
    key = name.strip().lower()
    spec = _INDEX.get(key) or _INDEX.get(key.rsplit("/", 1)[-1])
    if spec is None:
        raise NotFoundError(
            f"model {name!r} is not in the catalogue; pass the path of its Hugging Face "
            f"config.json (or of the model directory) instead. Known: {', '.join(known_models())}"
        )
    return spec


def known_models() -> tuple[str, ...]:
    return tuple(spec.name for spec in CATALOGUE)


# --- Hugging Face config.json -----------------------------------------------------------------

# Keys used by different model families for the same fact, in order of preference.
_HF_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}
# Families whose MLP is two matrices (up, down) rather than gated SwiGLU.
_PLAIN_MLP_TYPES = frozenset({"gptj", "gpt2", "gpt_neox", "bloom", "opt", "falcon", "gpt_bigcode"})
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}


def _first(config: dict[str, Any], keys: tuple[str, ...], path: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"{path}: {key}: must be a positive integer, got {value!r}")
            return value
    raise InvalidInputError(f"{path}: missing field {keys[0]!r} (or one of {', '.join(keys[1:])})")


def spec_from_hf_config(config: dict[str, Any], name: str, path: str = "config.json") -> ModelSpec:
    """Build a ``ModelSpec`` from a parsed Hugging Face config (``path`` names it in errors)."""
    text = config.get("text_config")
    if isinstance(text, dict):  # multimodal wrappers keep the language model's facts here
        config = {**config, **text}
    layers = _first(config, _HF_KEYS["layers"], path)
    hidden = _first(config, _HF_KEYS["hidden"], path)
    heads = _first(config, _HF_KEYS["heads"], path)
    vocab = _first(config, _HF_KEYS["vocab"], path)
    model_type = str(config.get("model_type", "")).lower()
    gated = model_type not in _PLAIN_MLP_TYPES
    per_layer_kv = config.get("num_key_value_heads_per_layer")
    if isinstance(per_layer_kv, list) and per_layer_kv:
        kv_heads = max(int(v) for v in per_layer_kv)  # served with the maximum (see DeciLM)
    else:
        kv_heads = config.get("num_key_value_heads") or config.get("multi_query_group_num") or heads
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    active = config.get("num_experts_per_tok") or 1
    if experts > 1 and config.get("moe_intermediate_size"):
        intermediate = int(config["moe_intermediate_size"])
    elif config.get("intermediate_size") or config.get("ffn_dim") or config.get("n_inner"):
        intermediate = _first(config, ("intermediate_size", "ffn_dim", "n_inner"), path)
    elif not gated:
        intermediate = 4 * hidden  # GPT-2 convention when n_inner is null
    else:
        raise InvalidInputError(f"{path}: missing field 'intermediate_size'")
    dtype_name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype_name not in _DTYPE_BYTES:
        raise InvalidInputError(
            f"{path}: torch_dtype: unsupported {dtype_name!r} (known: {', '.join(_DTYPE_BYTES)})"
        )
    max_position = (
        config.get("max_position_embeddings")
        or config.get("n_positions")
        or config.get("seq_length")
    )
    return ModelSpec(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        intermediate=intermediate,
        vocab=vocab,
        experts=int(experts),
        active_experts=int(active) if experts > 1 else 1,
        dtype_bytes=_DTYPE_BYTES[dtype_name],
        gated_mlp=gated,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position=int(max_position) if max_position else 2048,
    )


def load_hf_config(path: str | Path, name: str | None = None) -> ModelSpec:
    """Read a Hugging Face ``config.json`` (or a model directory holding one) into a spec.

    The spec is named ``name``, else the config's ``_name_or_path``, else the directory name.
    Raises ``InvalidInputError`` naming the file and the missing or malformed field.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"model config {str(p)!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"model config {str(p)!r}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InvalidInputError(f"model config {str(p)!r}: must be a JSON object")
    label = name or str(raw.get("_name_or_path") or "") or p.parent.name or p.stem
    return spec_from_hf_config(raw, label, str(p))


def resolve_model(name_or_path: str) -> ModelSpec:
    """A catalogue name, or a path to a config.json / model directory."""
    p = Path(name_or_path)
    if p.suffix == ".json" or (p.is_dir() and (p / "config.json").is_file()):
        return load_hf_config(p)
    return model_spec(name_or_path)
