"""scripts/merge_bench.py: bench blocks run separately merged into one report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "merge_bench.py"
HEAD = "workflow,gpus,system,rate"


def block(root: Path, name: str, gpus: int, calls: int, head: str = HEAD) -> Path:
    d = root / name
    d.mkdir()
    (d / "report.txt").write_text(f"table of {name}\n{calls} LLM calls simulated\n")
    comparison = {"workflow": name, "gpus": gpus, "baseline": "static"}
    data = {
        "settings": {"seed": 0},
        "calls_simulated": calls,
        "comparisons": [comparison],
        "workflows": [{"workflow": name}],
    }
    (d / "bench.json").write_text(json.dumps(data))
    (d / "curves.csv").write_text(f"{head}\n{name},{gpus},scepsy,1.0\n")
    (d / f"{name}.png").write_bytes(b"png " + name.encode())
    return d


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_blocks_merge_into_one_report(tmp_path: Path) -> None:
    a, b = block(tmp_path, "beam", 4, 100), block(tmp_path, "rag", 8, 250)
    out = tmp_path / "out"
    done = run("--out", str(out), "--header", "H", "--block", str(a), "cmd a",
               "--block", str(b), "cmd b")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = (out / "report.txt").read_text()
    assert report.startswith("H\nCommands:\n  cmd a\n  cmd b\n")
    assert report.index("table of beam") < report.index("table of rag")
    data = json.loads((out / "bench.json").read_text())
    assert data["calls_simulated"] == 350
    assert [c["workflow"] for c in data["comparisons"]] == ["beam", "rag"]
    assert data["runs"] == [
        {"workflows": ["beam"], "gpu_counts": [4]},
        {"workflows": ["rag"], "gpu_counts": [8]},
    ]
    assert (out / "curves.csv").read_text().splitlines() == [
        HEAD, "beam,4,scepsy,1.0", "rag,8,scepsy,1.0",
    ]  # fmt: skip
    assert (out / "rag.png").read_bytes() == b"png rag"


def test_a_block_that_differs_or_lacks_a_file_is_refused(tmp_path: Path) -> None:
    a = block(tmp_path, "beam", 4, 100)
    b = block(tmp_path, "rag", 8, 250, head="workflow,gpus")
    done = run("--out", str(tmp_path / "out"), "--header", "H", "--block", str(a), "a",
               "--block", str(b), "b")  # fmt: skip
    assert done.returncode == 2 and f"--block {b}: curves.csv header differs" in done.stderr
    (a / "bench.json").unlink()
    done = run("--out", str(tmp_path / "out2"), "--header", "H", "--block", str(a), "a")
    assert done.returncode == 2 and f"--block {a}: no bench.json" in done.stderr
    assert not (tmp_path / "out2").exists()  # nothing written


PLOTTED = "workflow,gpus,system,rate,sustainable,mean_latency,p99_latency"


def test_a_workflow_run_in_two_blocks_is_plotted_from_both(tmp_path: Path) -> None:
    """``--gpus 4`` and ``--gpus 8`` of one workflow as two processes: one PNG with both."""
    a = block(tmp_path, "coserve", 4, 100, head=PLOTTED)
    (tmp_path / "b").mkdir()
    b = block(tmp_path / "b", "coserve", 8, 200, head=PLOTTED)
    for d, gpus in ((a, 4), (b, 8)):
        (d / "curves.csv").write_text(
            f"{PLOTTED}\ncoserve,{gpus},scepsy,1.0,True,2.0,5.0\n"
            f"coserve,{gpus},scepsy,2.0,False,9.0,30.0\n"
        )
    out = tmp_path / "out"
    done = run("--out", str(out), "--header", "H", "--block", str(a), "cmd a",
               "--block", str(b), "cmd b")  # fmt: skip
    assert done.returncode == 0, done.stderr
    png = (out / "coserve.png").read_bytes()
    assert png.startswith(b"\x89PNG")  # drawn, not either block's copy
    assert int.from_bytes(png[16:20], "big") > 800  # two panels of 4.2 in at 110 dpi
    assert len((out / "curves.csv").read_text().splitlines()) == 5
