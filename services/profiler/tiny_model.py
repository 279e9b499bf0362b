"""Build a tiny, randomly initialised Llama model that real vLLM engines serve on CPU.

Tests and demos need a model that loads in seconds and whose output can be checked exactly:
a byte-level BPE tokenizer trained on a small built-in corpus (padded with placeholder tokens to
``MIN_VOCAB`` entries, because ``vllm bench`` draws random token ids below 10000) and a two-layer
Llama with random float32 weights. Building is deterministic for a given seed, and a stamp file
marks a finished build, so building again into the same directory returns at once.

``generate_greedy`` runs transformers' ``generate`` without sampling: vLLM's greedy output for the
same weights must equal it, which makes it the correctness oracle of the engine tests.

Runs with the engine venv's interpreter (torch, transformers and tokenizers come with vLLM)::

    .venv-engine/bin/python -m services.profiler.tiny_model --out DIR [--seed S]
    .venv-engine/bin/python -m services.profiler.tiny_model --out DIR --generate "Hi" --max-tokens 8

Both print one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIN_VOCAB = 10_000
STAMP_NAME = ".scepsy-tiny-model"
# Bump when the recipe below changes, so that stale builds are rebuilt.
RECIPE_VERSION = 1

ARCHITECTURE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}

EOS = "<|endoftext|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = (
    "An agentic workflow calls several language models and tools to answer one request.",
    "The planner splits the GPUs of the cluster between the models of the workflow.",
    "A router sends each call to one replica of its model and records the call as a trace.",
    "Tensor parallelism splits one model over the GPUs of one NVLink domain.",
    "The profiler measures latency against arrival rate until the engine saturates.",
    "Retrieval finds documents, a reranker orders them, and a generator writes the answer.",
    "Beam search keeps the best partial answers; a reward model scores every step.",
    "What is the capital of France? The capital of France is Paris.",
    "How many GPUs does the plan use? It uses three GPUs and one half of a fourth.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "user: hello there! assistant: Hello, how can I help you today?",
    "Throughput is requests per second; latency is seconds per request.",
)


def _stamp_text(seed: int) -> str:
    return json.dumps({"recipe": RECIPE_VERSION, "seed": seed, **ARCHITECTURE}, sort_keys=True)


def is_built(out: Path, seed: int = 0) -> bool:
    """True when ``out`` holds a finished build of this recipe with this seed."""
    stamp = out / STAMP_NAME
    return stamp.is_file() and stamp.read_text() == _stamp_text(seed)


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2_000,
        min_frequency=1,
        special_tokens=[EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    # Placeholders fill the vocabulary up to MIN_VOCAB; they are ordinary (non-special) tokens
    # that no text encodes to, so decoding them is lossless in both transformers and vLLM.
    missing = MIN_VOCAB - backend.get_vocab_size()
    backend.add_tokens([f"<|placeholder_{i:05d}|>" for i in range(max(missing, 0))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=ARCHITECTURE["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )


def build(out: Path, seed: int = 0) -> dict[str, Any]:
    """Build the model into ``out`` unless a finished build is there; return a summary."""
    started = time.monotonic()
    if is_built(out, seed):
        return {"model_dir": str(out), "built": False, "seed": seed}
    if out.exists() and any(out.iterdir()) and not (out / STAMP_NAME).is_file():
        # Only ever replace an empty directory or an earlier build (another seed or recipe).
        raise FileExistsError(f"{out} is not empty and holds no tiny model build")

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **ARCHITECTURE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    # Build next to the destination and rename, so that a reader never sees a half-written model.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    try:
        tokenizer.save_pretrained(staging)
        model.save_pretrained(staging, safe_serialization=True)
        (staging / STAMP_NAME).write_text(_stamp_text(seed))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "model_dir": str(out),
        "built": True,
        "seed": seed,
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.monotonic() - started, 2),
    }


def generate_greedy(model_dir: Path, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Greedy-decode ``prompt`` with transformers: the reference output for vLLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_tokens,
        )
    token_ids = output[0, len(prompt_ids) :].tolist()
    return {
        "prompt": prompt,
        "prompt_token_ids": prompt_ids,
        "token_ids": token_ids,
        "text": tokenizer.decode(token_ids, skip_special_tokens=True),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.profiler.tiny_model",
        description="Build a tiny random Llama model (and tokenizer) for CPU vLLM engines.",
    )
    parser.add_argument("--out", type=Path, required=True, help="model directory")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument(
        "--generate",
        metavar="PROMPT",
        help="instead of building, greedy-decode PROMPT with transformers and print the tokens",
    )
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens to generate (default 8)")
    args = parser.parse_args(argv)
    if args.generate is not None:
        if not (args.out / STAMP_NAME).is_file():
            print(f"error: no finished tiny model in {args.out}", file=sys.stderr)
            return 2
        result = generate_greedy(args.out, args.generate, args.max_tokens)
    else:
        try:
            result = build(args.out, args.seed)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
