"""Calibration recovers known parameters from profiles generated with them (pure: the
"measurements" are the analytic engine's own at those parameters), and reads measurement
documents naming the bad field. The engine test (real CPU measurements) is in
tests/profiler/test_vllm_backend.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from services.cli.main import main
from services.core.cluster.hardware import gpu_spec
from services.core.cluster.models import resolve_model
from services.core.errors import InvalidInputError
from services.core.perf.analytic import RequestMix
from services.core.perf.calibrate import (
    MeasuredProfile,
    Point,
    calibrate,
    latency_errors,
    predict_latency,
    predict_saturation,
    run_calibration,
    split,
)
from services.core.perf.model import load_params

TINY = resolve_model("tiny-llama")
CPU = gpu_spec("cpu")
COMMITTED = load_params()["cpu"]
TRUE = replace(COMMITTED, step_overhead_s=4e-3, seq_overhead_s=2e-4)


def synthetic(mix: RequestMix, fractions: tuple[float, ...]) -> MeasuredProfile:
    """A profile 'measured' on an engine that follows the analytic model with TRUE."""
    probe = MeasuredProfile(TINY, CPU, 1, 1.0, mix, (1.0,), (1.0,), 1.0)
    saturation = predict_saturation(probe, TRUE)
    rates = tuple(f * saturation for f in fractions)
    latencies = tuple(predict_latency(Point(probe, r, 1.0), TRUE) for r in rates)
    return MeasuredProfile(TINY, CPU, 1, 1.0, mix, rates, latencies, saturation)


def test_split_alternates_rates_within_each_profile() -> None:
    a = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(8, 8), (3, 1, 2, 5, 4), (1,) * 5, 6)
    fit, held = split([a])
    assert [p.rate for p in fit] == [1, 3, 5] and [p.rate for p in held] == [2, 4]
    # an even count: the highest rate is fitted too, every held-out rate lies between fitted ones
    b = replace(a, rates=(3, 1, 2, 5, 4, 6), latencies=(1,) * 6)
    fit, held = split([b])
    assert [p.rate for p in fit] == [1, 3, 6] and [p.rate for p in held] == [2, 4, 5]


def test_calibration_recovers_the_overheads_it_was_generated_with() -> None:
    profile = synthetic(RequestMix.fixed(64, 32), (0.1, 0.3, 0.5, 0.7))
    fit, held = split([profile])
    start = replace(COMMITTED, step_overhead_s=1e-3, seq_overhead_s=1e-5)
    fitted = calibrate(fit, start, names=("step_overhead_s", "seq_overhead_s"), iterations=60)
    assert fitted.step_overhead_s == pytest.approx(TRUE.step_overhead_s, rel=0.1)
    assert fitted.seq_overhead_s == pytest.approx(TRUE.seq_overhead_s, rel=0.3)
    # the held-out rates, never fitted, are predicted well after and badly before
    assert max(latency_errors(held, fitted)) < 5.0
    assert min(latency_errors(held, start)) > 20.0
    # the parameters not calibrated keep their values
    assert fitted.kv_bandwidth_eff == start.kv_bandwidth_eff


def test_run_calibration_scores_before_and_after_on_held_out_points() -> None:
    profile = synthetic(RequestMix.fixed(32, 16), (0.1, 0.4, 0.6))
    start = replace(COMMITTED, step_overhead_s=1e-3, seq_overhead_s=1e-5)
    result = run_calibration([profile], start, names=("step_overhead_s",), iterations=40)
    assert result.fit_points == 2 and len(result.held_out) == 1
    assert result.median_after < result.median_before


def test_a_measurement_document_missing_a_field_is_named() -> None:
    with pytest.raises(InvalidInputError, match=r"m\.json\[0\]: not a measurement document"):
        MeasuredProfile.from_measurement({"key": {}}, "m.json[0]")


def test_profiles_of_several_devices_are_refused() -> None:
    a = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(8, 8), (1,), (1,), 2)
    b = replace(a, gpu=gpu_spec("H100-SXM"))
    with pytest.raises(InvalidInputError, match="one device at a time"):
        run_calibration([a, b], COMMITTED)


def test_the_call_overhead_adds_to_every_latency_and_leaves_the_capacity() -> None:
    probe = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(32, 8), (1.0,), (1.0,), 1.0)
    none = replace(TRUE, call_overhead_s=0.0)  # the committed cpu entry has one
    slow = replace(TRUE, call_overhead_s=0.05)
    point = Point(probe, 5.0, 1.0)
    assert predict_latency(point, slow) == pytest.approx(predict_latency(point, none) + 0.05)
    assert predict_saturation(probe, slow) == pytest.approx(predict_saturation(probe, none))
    # params.json entries written before the field existed read as 0
    values = TRUE.to_dict()
    del values["call_overhead_s"]
    assert type(TRUE).from_dict(values).call_overhead_s == 0.0


def test_calibration_recovers_a_call_overhead() -> None:
    truth = replace(TRUE, call_overhead_s=0.02)
    probe = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(24, 4), (1.0,), (1.0,), 1.0)
    saturation = predict_saturation(probe, truth)
    rates = tuple(f * saturation for f in (0.1, 0.3, 0.5, 0.7))
    latencies = tuple(predict_latency(Point(probe, r, 1.0), truth) for r in rates)
    profile = replace(probe, rates=rates, latencies=latencies, saturation_rate=saturation)
    fit, held = split([profile])
    fitted = calibrate(fit, TRUE, names=("call_overhead_s",), iterations=40)
    assert fitted.call_overhead_s == pytest.approx(0.02, rel=0.1)
    assert max(latency_errors(held, fitted)) < 5.0


def test_calibration_recovers_a_frontend_stage() -> None:
    # an engine whose frontend sets the capacity: flat latency, then a sharp knee
    truth = replace(TRUE, step_overhead_s=4e-3, seq_overhead_s=2e-5, frontend_seq_s=4e-4)
    probe = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(16, 64), (1.0,), (1.0,), 1.0)
    saturation = predict_saturation(probe, truth)
    # the frontend's 2,500 tokens/s, not the engine's steps (4 ms + 20 us per sequence), cap it
    assert saturation == pytest.approx(1 / (4e-4 * 64), rel=0.1)
    rates = tuple(f * saturation for f in (0.1, 0.3, 0.5, 0.7, 0.85, 0.95))
    latencies = tuple(predict_latency(Point(probe, r, 1.0), truth) for r in rates)
    profile = replace(probe, rates=rates, latencies=latencies, saturation_rate=saturation)
    fit, held = split([profile])
    # from the GPUs' value (no stage): the start is seeded from the measured capacity
    start = replace(truth, frontend_seq_s=0.0, step_overhead_s=2e-3)
    fitted = calibrate(fit, start, names=("step_overhead_s", "frontend_seq_s"), iterations=60)
    assert fitted.frontend_seq_s == pytest.approx(4e-4, rel=0.1)
    assert fitted.step_overhead_s == pytest.approx(4e-3, rel=0.1)
    assert max(latency_errors(held, fitted)) < 5.0
    assert min(latency_errors(held, start)) > 20.0


def test_the_cli_fits_only_the_parameters_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truth = replace(COMMITTED, call_overhead_s=0.02)
    probe = MeasuredProfile(TINY, CPU, 1, 1.0, RequestMix.fixed(24, 4), (1.0,), (1.0,), 1.0)
    saturation = predict_saturation(probe, truth)
    rates = [f * saturation for f in (0.1, 0.3, 0.5)]
    doc = {
        "key": {"model": "tiny-llama", "gpu_type": "cpu", "tp": 1, "fraction": 1.0, "mix": "m"},
        "method": {"mix_samples": [[24, 4]]},
        "saturation_rate": saturation,
        "points": [
            {"rate": r, "ok": 10, "mean_latency": predict_latency(Point(probe, r, 1.0), truth)}
            for r in rates
        ],
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps([doc]))
    argv = ["perf", "calibrate", "--measurements", str(path), "--iterations", "20"]
    assert main([*argv, "--params", "call_overhead_s", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibrated"] == ["call_overhead_s"]
    assert out["after"]["call_overhead_s"] == pytest.approx(0.02, rel=0.15)
    unchanged = {k: v for k, v in out["after"].items() if k != "call_overhead_s"}
    assert unchanged == {k: v for k, v in out["before"].items() if k != "call_overhead_s"}
    assert main([*argv, "--params", "step_overhead_s,warp_speed"]) == 2
    assert "--params: unknown warp_speed" in capsys.readouterr().err
