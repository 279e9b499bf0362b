"""``scepsy validate``: bad input is exit 2 naming the flag; with a real router process and a real
tiny-model engine (serving both RAG deployment names), a short run prints predicted against
measured latency and throughput and writes the CSV and the plot."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.main import main
from services.core.errors import NotFoundError
from services.runtime.engines import EngineSpec, LocalEngine, run_engine_module, vllm_executable
from services.runtime.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rates", "1,x"], "error: --rates: comma-separated numbers"),
        (["--rates", "1", "--load", "0.5"], "error: --rates: give --rates or --load"),
        (["--load", "0,0.5"], "error: --load: numbers > 0"),
        (["--requests", "1"], "error: --requests: must be >= 2, got 1"),
        (["--router", "127.0.0.1:8000"], "error: --router: an http(s) base URL"),
    ],
)
def test_bad_flags_are_exit_2_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["validate", "--workflow", "rag", "--router", "http://127.0.0.1:1", *flags]
    # --router given twice: the last one wins (argparse), so the bad-router case applies
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.out == ""


def test_no_registered_engine_is_named(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["validate", "--workflow", "rag", "--router", "http://127.0.0.1:1"]
    argv += ["--redis-url", redis_url, "--namespace", namespace]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no engines registered for reranker, generator" in err
    assert "scepsy endpoints add" in err


# ------------------------------------------------------------------------------- real engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEngine]:
    try:
        vllm = vllm_executable()
    except NotFoundError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the engine tests: {exc}")
        pytest.skip(f"no engine venv ({exc})")
    model_dir = tmp_path_factory.mktemp("models") / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    spec = EngineSpec.cpu(
        model_dir, "reranker", extra_args=["--served-model-name", "reranker", "generator"]
    )
    with LocalEngine(spec, tmp_path_factory.mktemp("logs") / "engine.log", vllm=vllm) as e:
        e.start()
        e.wait_ready(time.monotonic() + 300)
        yield e


@pytest.fixture
def router(redis_url: str, namespace: str, tmp_path: Path) -> Iterator[str]:
    """The router as its own process (``validate`` runs its own event loop)."""
    port = free_port()
    env = dict(os.environ, SCEPSY_REDIS_URL=redis_url)
    argv = [sys.executable, "-m", "services.router", "--namespace", namespace, "--port", "0"]
    argv += ["--http-port", str(port), "--log-level", "warning", "--refresh-s", "0.2"]
    with (tmp_path / "router.log").open("wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            with opener.open(url + "/health", timeout=1):
                break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "router.log"
            ).read_text()
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(timeout=15)


@pytest.mark.engine
@pytest.mark.slow
def test_validate_prints_predicted_against_measured_and_writes_the_plot(
    engine: LocalEngine,
    router: str,
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_flags = ["--redis-url", redis_url, "--namespace", namespace]
    for model in ("reranker", "generator"):
        assert main(["endpoints", "add", model, engine.base_url, *store_flags]) == 0
    time.sleep(1.0)  # the router refreshes its replicas every 0.2 s
    capsys.readouterr()
    argv = ["validate", "--workflow", "rag", "--router", router, "--profiles", "analytic"]
    argv += ["--rates", "0.3,0.6", "--requests", "6", "--pilot-requests", "4"]
    argv += ["--capacity-requests", "8", "--out", str(tmp_path / "out"), *store_flags]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "workflow rag (tiny) on cpu" in out
    assert "reranker n=" in out and "generator n=1.00" in out
    assert "throughput (capacity): predicted" in out and "median error: latency" in out
    with (tmp_path / "out" / "validate.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["rate"]) for r in rows] == [0.3, 0.6]
    for r in rows:
        assert float(r["measured_latency_s"]) > 0 and float(r["predicted_latency_s"]) > 0
        assert int(r["errors"]) == 0
        measured, predicted = float(r["measured_latency_s"]), float(r["predicted_latency_s"])
        assert float(r["latency_error_pct"]) == pytest.approx(
            abs(predicted / measured - 1) * 100, rel=1e-3
        )
    assert (tmp_path / "out" / "validate.png").stat().st_size > 1000
