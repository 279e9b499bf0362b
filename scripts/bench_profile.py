"""Benchmark: measured profiles of the tiny model on real vLLM CPU engines, and the calibrated
``cpu`` performance model.

1. One profile end to end as ``scepsy profile --backend vllm`` runs it: the backend starts the
   engine, sweeps rising Poisson rates to saturation and stops the engine. Target: under 3 min.
2. More request mixes (and one fan-out sweep) measured on one engine the bench starts and the
   backend attaches to.
3. Calibration (``services.core.perf.calibrate``): the ``cpu`` parameters fitted on every other
   rate of each profile; the median latency error on the held-out rates before (the reference
   GPU's fitted parameters, which every device got by the transfer rule before calibration) and
   after. Target: at most 15 % after.

    flock /tmp/scepsy-engines.lock .venv/bin/python scripts/bench_profile.py [--quick]
        [--out measurements.json] [--write-params] [--warmup S] [--window S] [--sub-windows N]
        [--measure-only]

``--window``/``--sub-windows``: a point's latency is the median of the window's sub-window means
(longer windows and more parts: fewer points spoiled by a slow stretch of a shared host).
``--measure-only`` writes ``--out`` without fitting; several runs' files are fitted together by
``scepsy perf calibrate --measurements FILE ...`` (one run's points on this host are too noisy).

Needs the engine venv (``make engine-venv``; ``SCEPSY_ENGINE_VENV``). ``--out`` keeps the
measurement documents (the input of ``scepsy perf calibrate``); ``--write-params`` stores the
fitted ``cpu`` entry in ``services/core/perf/params.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.cli.perf import write_params  # noqa: E402
from services.core.cluster.hardware import gpu_spec  # noqa: E402
from services.core.cluster.models import resolve_model  # noqa: E402
from services.core.errors import NotFoundError  # noqa: E402
from services.core.perf.analytic import RequestMix  # noqa: E402
from services.core.perf.calibrate import (  # noqa: E402
    CALIBRATED,
    MeasuredProfile,
    latency_errors,
    median,
    run_calibration,
)
from services.core.perf.fit import REFERENCE_GPU  # noqa: E402
from services.core.perf.model import load_params  # noqa: E402
from services.profiler.vllm_backend import (  # noqa: E402
    Measurement,
    SweepConfig,
    VllmBackend,
    engine_spec,
    stderr_progress,
)
from services.runtime.engines import (  # noqa: E402
    LocalEngine,
    run_engine_module,
    vllm_executable,
)

MIXES = ((64, 32), (16, 64), (128, 16), (32, 96), (96, 48))
TARGET_PROFILE_S = 180.0
TARGET_ERROR_PCT = 15.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two mixes, no fan-out sweep")
    parser.add_argument("--out", type=Path, help="write the measurement documents (JSON list)")
    parser.add_argument("--write-params", action="store_true", help="write the fitted cpu entry")
    parser.add_argument("--iterations", type=int, default=150, help="Nelder-Mead steps")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=2,
        help="cpu devices the host declares: the engine binds to one device's cores, as a "
        "plan's engine does (2 on a 2-core host: one core; 1: every core)",
    )
    parser.add_argument(
        "--window",
        type=float,
        default=SweepConfig().window_s,
        help="measured seconds per rate (longer: fewer points spoiled by a stall of the host)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=SweepConfig().warmup_s,
        help="seconds at each rate before its window (the engine settles at a new rate)",
    )
    parser.add_argument(
        "--sub-windows",
        type=int,
        default=SweepConfig().sub_windows,
        help="parts of each window; a point's latency is the median of their means",
    )
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="measure and write --out, no calibration (run `scepsy perf calibrate` on it later)",
    )
    args = parser.parse_args()

    try:
        vllm_executable()
    except NotFoundError as exc:
        print(f"no engine venv, nothing measured: {exc}")
        return 0
    model, cpu = resolve_model("tiny-llama"), gpu_spec("cpu")
    work = Path(tempfile.mkdtemp(prefix="scepsy-bench-profile-"))
    model_dir = work / "tiny"
    run_engine_module("services.profiler.tiny_model", ["--out", str(model_dir)])
    mixes = MIXES[:2] if args.quick else MIXES
    config = SweepConfig(warmup_s=args.warmup, window_s=args.window, sub_windows=args.sub_windows)

    # 1. end to end: the backend starts and stops its own engine
    started = time.monotonic()
    first = VllmBackend(
        model_dir=model_dir,
        config=config,
        log_dir=work / "logs",
        progress=stderr_progress,
        cpu_devices=args.cpu_devices,
    ).measure(model, cpu, 1, 1.0, RequestMix.fixed(*mixes[0]), seed=0)
    end_to_end = time.monotonic() - started
    measurements: list[Measurement] = [first]

    # 2. more mixes on one engine
    # the same binding as the backend's own engine (one device's cores)
    spec = engine_spec(
        model, cpu, 1, 1.0, str(model_dir), "tiny-llama", config.max_model_len, args.cpu_devices
    )
    with LocalEngine(spec, work / "logs" / "shared.log") as engine:
        engine.start()
        engine.wait_ready(time.monotonic() + 300)
        attached = VllmBackend(endpoint=engine.base_url, config=config, progress=stderr_progress)
        for i, mix in enumerate(mixes[1:], start=1):
            measurements.append(
                attached.measure(model, cpu, 1, 1.0, RequestMix.fixed(*mix), seed=i)
            )
        if not args.quick:
            fanout = VllmBackend(
                endpoint=engine.base_url,
                config=replace(config, mode="fanout", fanout=6),
                progress=stderr_progress,
            )
            fan = fanout.measure(model, cpu, 1, 1.0, RequestMix.fixed(*mixes[0]), seed=9)

    docs = [m.to_dict() for m in measurements]
    if args.out is not None:
        args.out.write_text(json.dumps(docs, indent=2) + "\n")

    print(
        f"\nmeasured profiles (tiny-llama, vLLM CPU engine, 1 engine bound to "
        f"core(s) {dict(spec.env).get('VLLM_CPU_OMP_THREADS_BIND')})"
    )
    print(f"{'mix':<16} {'rates':>5} {'sat/s':>7} {'idle s':>7} {'stop':>10} {'sweep s':>8}")
    for m in measurements:
        print(
            f"{m.key.mix:<16} {len(m.points):5d} {m.saturation_rate:7.2f} "
            f"{m.idle_latency:7.3f} {m.stop_reason:>10} {m.method['seconds']:8.1f}"
        )
    if not args.quick:
        print(
            f"{'fan-out x6 ' + fan.key.mix:<16} {len(fan.points):5d} {fan.saturation_rate:7.2f} "
            f"{fan.idle_latency:7.3f} {fan.stop_reason:>10} {fan.method['seconds']:8.1f}"
        )
        base = first.profile()
        fan_profile = fan.profile()
        print("fan-out vs Poisson at the same rate (mean latency, s):")
        for fp in fan_profile.points:
            poisson = base.latency_at(fp.rate)
            print(f"  {fp.rate:7.2f}/s  fan-out {fp.mean_latency:.3f}  poisson {poisson:.3f}")
    verdict = "ok" if end_to_end <= TARGET_PROFILE_S else "OVER TARGET"
    print(
        f"end-to-end profile time (engine start + sweep + stop): {end_to_end:.0f} s "
        f"(target <= {TARGET_PROFILE_S:.0f} s: {verdict})"
    )

    if args.measure_only:
        return 0
    profiles = [MeasuredProfile.from_measurement(d) for d in docs]
    committed = load_params()[REFERENCE_GPU]
    result = run_calibration(profiles, committed, iterations=args.iterations)
    previous = latency_errors(result.held_out, load_params()["cpu"])
    print(
        f"\ncalibration of cpu: {result.fit_points} points fitted, {len(result.held_out)} held out"
    )
    print(f"{'profile':<34} {'rate/s':>7} {'measured s':>10} {'before %':>9} {'after %':>8}")
    for p, b, a in zip(result.held_out, result.errors_before, result.errors_after, strict=True):
        print(f"{p.profile.label:<34} {p.rate:7.2f} {p.latency:10.4f} {b:9.1f} {a:8.1f}")
    verdict = "ok" if result.median_after <= TARGET_ERROR_PCT else "OVER TARGET"
    print(
        f"median held-out latency error: before {result.median_before:.1f}%, after "
        f"{result.median_after:.1f}% (target <= {TARGET_ERROR_PCT:.0f}%: {verdict})"
    )
    print(
        f"  (the committed cpu entry before this run: median {median(previous):.1f}% on the same "
        f"held-out rates; profiles bound to one of {args.cpu_devices} cpu device(s); point "
        f"latency = median of the {config.window_s:g} s window's {config.sub_windows} "
        "sub-window means)"
    )
    for name in CALIBRATED:
        print(f"  {name:<16} {getattr(committed, name):.4g} -> {getattr(result.after, name):.4g}")
    if args.write_params:
        write_params("cpu", result.after.to_dict())
        print("wrote the cpu entry of services/core/perf/params.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
