"""Fitting the performance model's efficiencies to measured static-batch runs.

The measurements are the vLLM rows of llm-inference-bench's ``All_results.csv`` (see
``shared/data/README.md``): offline static batches on one node, tensor parallelism 1-4, inputs of
128-2048 tokens with as many output tokens, batches of 1-64. The data set defines latency as the
time of the whole batch and throughput as batch x (input + output) / latency.

- fit split: H100 rows of Llama-2-7b and Llama-2-70b; validation split: every other H100 and
  A100 row. ``fit_params`` only ever sees the fit split.
- the engine measured was vLLM V0 (2024): no chunked prefill, a prefill token budget of
  max(max_model_len, 2048), 90% of GPU memory. ``bench_config`` reproduces that.
- the fit minimises the mean squared log latency error with Nelder-Mead on log-scaled
  parameters inside physical bounds, starting from datasheet-like guesses.
- A100 and every other GPU type get the H100's fitted efficiencies and overheads (they are
  ratios to each GPU's own peak figures and CPU-side costs), the documented transfer rule; the
  data set has no A100 rows in the fit split.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from services.core.cluster.hardware import GPUS, gpu_spec
from services.core.cluster.models import ModelSpec, model_spec
from services.core.errors import InvalidInputError, NotFoundError
from services.core.perf.batching import SchedulerConfig, static_batch
from services.core.perf.model import FloatArray, PerfModel, PerfParams, load_params

# Hardware names of the data set -> catalogue GPU types. Argonne's A100 systems (Polaris) carry
# the 40 GB SXM4 part; the H100 nodes the 80 GB SXM5 part.
HARDWARE: dict[str, str] = {
    "Nvidia H100 GPU": "H100-SXM",
    "Nvidia A100 GPU": "A100-40GB-SXM",
}
FIT_MODELS = ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf")
FIT_HARDWARE = "Nvidia H100 GPU"
VALIDATION_HARDWARE = ("Nvidia H100 GPU", "Nvidia A100 GPU")
REFERENCE_GPU = "H100-SXM"

INITIAL = PerfParams(
    compute_eff=0.6,
    bandwidth_eff=0.85,
    kv_bandwidth_eff=0.6,
    attn_compute_eff=0.02,
    step_overhead_s=3e-3,
    seq_overhead_s=40e-6,
    allreduce_latency_s=15e-6,
    allreduce_hop_s=5e-6,
)


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One measured static-batch run."""

    hardware: str
    tp: int
    framework: str
    model: str
    io_len: int  # input tokens = output tokens
    batch: int
    latency_s: float
    throughput: float

    @property
    def gpu_type(self) -> str:
        return HARDWARE[self.hardware]


def read_rows(path: str | Path) -> list[BenchRow]:
    """All rows of ``All_results.csv``; raises ``InvalidInputError`` naming a bad line."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"benchmark data {str(p)!r}: no such file")
    rows: list[BenchRow] = []
    with p.open(newline="") as fh:
        for line_no, rec in enumerate(csv.DictReader(fh), start=2):
            try:
                rows.append(
                    BenchRow(
                        hardware=rec["Hardware"],
                        tp=int(rec["Num of Hardware"]),
                        framework=rec["Framework"],
                        model=rec["Model"],
                        io_len=int(rec["Input Output Length"]),
                        batch=int(rec["Batch Size"]),
                        latency_s=float(rec["Latency"]),
                        throughput=float(rec["Throughput"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{p}:{line_no}: malformed row ({exc})") from None
    return rows


def fit_split(rows: Iterable[BenchRow]) -> list[BenchRow]:
    return [
        r
        for r in rows
        if r.framework == "vLLM" and r.hardware == FIT_HARDWARE and r.model in FIT_MODELS
    ]


def validation_split(rows: Iterable[BenchRow]) -> list[BenchRow]:
    return [
        r
        for r in rows
        if r.framework == "vLLM"
        and r.hardware in VALIDATION_HARDWARE
        and not (r.hardware == FIT_HARDWARE and r.model in FIT_MODELS)
    ]


def bench_config(model: ModelSpec) -> SchedulerConfig:
    """vLLM V0 defaults as the data set's runs used them."""
    return SchedulerConfig(
        max_num_seqs=256,
        max_batched_tokens=max(model.max_position, 2048),
        chunked_prefill=False,
    )


def predict_latency(row: BenchRow, params: PerfParams) -> float:
    """Predicted latency (s) of one benchmark row with ``params`` for its GPU."""
    model = model_spec(row.model)
    perf = PerfModel.create(model, gpu_spec(row.gpu_type), row.tp, 1.0, params)
    latency, _ = static_batch(perf, row.batch, row.io_len, row.io_len, bench_config(model))
    return latency


def log_errors(rows: Sequence[BenchRow], params: PerfParams) -> FloatArray:
    return np.array([math.log(predict_latency(r, params) / r.latency_s) for r in rows])


# Search box of every fitted parameter; the search runs on log-scaled coordinates inside it.
BOUNDS: dict[str, tuple[float, float]] = {
    "compute_eff": (0.05, 1.0),
    "bandwidth_eff": (0.05, 1.0),
    "kv_bandwidth_eff": (0.05, 1.0),
    "attn_compute_eff": (0.002, 1.0),
    "step_overhead_s": (1e-5, 0.05),
    "seq_overhead_s": (1e-7, 1e-3),
    "allreduce_latency_s": (1e-7, 1e-3),
    "allreduce_hop_s": (1e-8, 1e-3),
    # calibration only (``calibrate.CALIBRATED``)
    "call_overhead_s": (1e-4, 0.2),
    "frontend_seq_s": (1e-6, 5e-3),
}
# fields of the calibration only: 0 for the GPUs, whose data set measures static batches inside
# the engine (no client, no frontend)
CALIBRATION_ONLY = ("call_overhead_s", "frontend_seq_s")
# the GPU fit's parameters: every other field
_NAMES = tuple(f.name for f in fields(PerfParams) if f.name not in CALIBRATION_ONLY)
_LO = np.log([BOUNDS[n][0] for n in _NAMES])
_HI = np.log([BOUNDS[n][1] for n in _NAMES])


def _to_params(x: FloatArray) -> PerfParams:
    """Unit-box coordinates -> parameters (log-uniform between the bounds)."""
    values = np.exp(_LO + np.clip(x, 0.0, 1.0) * (_HI - _LO))
    return PerfParams(**{name: float(v) for name, v in zip(_NAMES, values, strict=True)})


def _to_unit(p: PerfParams) -> FloatArray:
    values = np.log(np.array([getattr(p, n) for n in _NAMES], dtype=np.float64))
    unit: FloatArray = np.clip((values - _LO) / (_HI - _LO), 0.0, 1.0)
    return unit


def _nelder_mead(
    f: Callable[[FloatArray], float], x0: FloatArray, scale: float, iterations: int
) -> tuple[FloatArray, float]:
    """Plain Nelder-Mead (reflect, expand, contract, shrink) from ``x0``; deterministic."""
    dim = len(x0)
    simplex = [x0] + [x0 + scale * np.eye(dim)[i] for i in range(dim)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        f_r = f(reflected)
        if f_r < values[0]:
            expanded = centroid + 2.0 * (centroid - worst)
            f_e = f(expanded)
            simplex[-1], values[-1] = (expanded, f_e) if f_e < f_r else (reflected, f_r)
        elif f_r < values[-2]:
            simplex[-1], values[-1] = reflected, f_r
        else:
            contracted = centroid + 0.5 * (worst - centroid)
            f_c = f(contracted)
            if f_c < values[-1]:
                simplex[-1], values[-1] = contracted, f_c
            else:
                best = simplex[0]
                simplex = [best + 0.5 * (x - best) for x in simplex]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = int(np.argmin(values))
    return simplex[i], values[i]


nelder_mead = _nelder_mead  # public: the calibration of measured profiles uses it too


# Starting points of the search: decode attention runs on CUDA cores, so its FLOP/s may or may
# not bind; a start on each side of that threshold lets the search find both basins.
STARTS: tuple[PerfParams, ...] = (
    INITIAL,
    replace(INITIAL, attn_compute_eff=0.01, compute_eff=0.45),
    replace(INITIAL, attn_compute_eff=0.1, compute_eff=0.3),
)


def fit_params(
    rows: Sequence[BenchRow],
    starts: Sequence[PerfParams] = STARTS,
    iterations: int = 250,
    on_start: Callable[[int, float, PerfParams], None] | None = None,
) -> PerfParams:
    """Parameters minimising the mean squared log latency error over ``rows`` (the fit split).

    Nelder-Mead on log-scaled coordinates within ``BOUNDS`` from each of ``starts``, restarted
    once from its own result with a fresh simplex; the lowest loss wins. Deterministic: the same
    rows always give the same parameters.
    """
    if not rows:
        raise InvalidInputError("fit: no rows in the fit split")

    def loss(x: FloatArray) -> float:
        return float(np.mean(log_errors(rows, _to_params(x)) ** 2))

    best_x, best_value = _to_unit(starts[0]), math.inf
    for i, start in enumerate(starts):
        x, _ = _nelder_mead(loss, _to_unit(start), 0.1, iterations)
        x, value = _nelder_mead(loss, np.clip(x, 0.0, 1.0), 0.05, iterations)
        x = np.clip(x, 0.0, 1.0)
        if on_start is not None:
            on_start(i, value, _to_params(x))
        if value < best_value:
            best_x, best_value = x, value
    return _to_params(best_x)


# Devices calibrated on their own measured profiles (``services.core.perf.calibrate``, ``scepsy
# perf calibrate --write``): the transfer rule leaves their committed parameters alone.
CALIBRATED_DEVICES = ("cpu",)


def params_by_gpu(reference: PerfParams) -> dict[str, PerfParams]:
    """The transfer rule: every catalogue GPU gets the reference GPU's fitted parameters, except
    the calibrated devices, which keep their committed ones."""
    committed = load_params()
    return {
        name: committed[name] if name in CALIBRATED_DEVICES and name in committed else reference
        for name in GPUS
    }


@dataclass(frozen=True, slots=True)
class Prediction:
    row: BenchRow
    latency_s: float | None  # None when the model is not in the catalogue

    @property
    def abs_pct_error(self) -> float:
        if self.latency_s is None:
            return math.nan
        return abs(self.latency_s / self.row.latency_s - 1.0) * 100.0


def predict_rows(rows: Sequence[BenchRow], params: dict[str, PerfParams]) -> list[Prediction]:
    """A prediction for every row, with the parameters of the row's GPU type."""
    out: list[Prediction] = []
    for row in rows:
        try:
            model_spec(row.model)
        except NotFoundError:
            out.append(Prediction(row, None))
            continue
        out.append(Prediction(row, predict_latency(row, params[row.gpu_type])))
    return out


def error_table(predictions: Sequence[Prediction]) -> list[dict[str, Any]]:
    """Median and p90 absolute percentage latency error: overall, per GPU, model and TP."""
    groups: dict[tuple[str, str], list[Prediction]] = {("all", "all"): list(predictions)}
    for p in predictions:
        for key in (
            ("gpu", p.row.gpu_type),
            ("model", p.row.model),
            ("tp", str(p.row.tp)),
        ):
            groups.setdefault(key, []).append(p)
    table: list[dict[str, Any]] = []
    for (kind, value), preds in groups.items():
        errors = np.array([p.abs_pct_error for p in preds if p.latency_s is not None])
        table.append(
            {
                "group": kind,
                "value": value,
                "rows": len(preds),
                "predicted": int(errors.size),
                "median_ape": float(np.median(errors)) if errors.size else math.nan,
                "p90_ape": float(np.percentile(errors, 90)) if errors.size else math.nan,
            }
        )
    order = {"all": 0, "gpu": 1, "model": 2, "tp": 3}
    table.sort(key=lambda r: (order[r["group"]], r["value"]))
    return table
