"""services.core is pure: importing all of it loads no grpc, redis, pynvml or asyncio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_core_imports_no_io_libraries() -> None:
    modules = sorted(
        "services.core." + p.stem
        for p in (REPO / "services/core").glob("*.py")
        if p.stem != "__init__"
    )
    assert "services.core.cluster" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('grpc', 'redis', 'pynvml', 'asyncio', 'protos') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "", f"services.core pulled in: {out.stdout.strip()}"
