"""Accuracy of the analytic performance model on measured static-batch runs.

Predicts the latency of every validation-split row of llm-inference-bench (vLLM on H100 and A100,
except the H100 Llama-2-7b/70b rows the parameters are fitted on) and prints the median and p90
absolute percentage error, overall and per GPU type, model and TP degree.

    .venv/bin/python scripts/bench_perf.py [--data PATH] [--json]    # committed parameters
    .venv/bin/python scripts/bench_perf.py --refit [--write]         # fit on the fit split first

``--refit --write`` regenerates ``services/core/perf_params.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.errors import ScepsyError  # noqa: E402
from services.core.perf import fit as perf_fit  # noqa: E402
from services.core.perf.model import PARAMS_FILE, PerfParams, load_params  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "llm-inference-bench" / "All_results.csv"


def _write_params(params: PerfParams, path: Path) -> None:
    doc = {
        "comment": (
            "Fitted on the fit split of llm-inference-bench (vLLM, H100, Llama-2-7b/70b); "
            "every GPU type shares the H100 values (see services/core/perf/fit.py). "
            "Regenerate: .venv/bin/python scripts/bench_perf.py --refit --write"
        ),
        "reference_gpu": perf_fit.REFERENCE_GPU,
        "gpus": {
            name: {k: float(f"{v:.6g}") for k, v in p.to_dict().items()}
            for name, p in perf_fit.params_by_gpu(params).items()
        },
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")


def _print_table(table: list[dict[str, Any]], title: str) -> None:
    print(title)
    print(f"  {'group':6} {'value':34} {'rows':>5} {'pred':>5} {'median%':>8} {'p90%':>7}")
    for r in table:
        print(
            f"  {r['group']:6} {r['value']:34} {r['rows']:>5} {r['predicted']:>5} "
            f"{r['median_ape']:8.1f} {r['p90_ape']:7.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="All_results.csv")
    parser.add_argument("--refit", action="store_true", help="fit on the fit split first")
    parser.add_argument("--write", action="store_true", help=f"with --refit: update {PARAMS_FILE}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.write and not args.refit:
        parser.error("--write needs --refit")
    if not args.data.is_file():
        print(
            f"error: benchmark data not found at {args.data} "
            "(expected ../shared/data/llm-inference-bench/All_results.csv next to the repo; "
            "pass --data)",
            file=sys.stderr,
        )
        return 2
    try:
        rows = perf_fit.read_rows(args.data)
        fit_rows = perf_fit.fit_split(rows)
        validation = perf_fit.validation_split(rows)
        started = time.monotonic()
        if args.refit:
            reference = perf_fit.fit_params(fit_rows)
            params = perf_fit.params_by_gpu(reference)
            source = "refitted on the fit split"
            if args.write:
                _write_params(reference, PARAMS_FILE)
        else:
            params = load_params()
            source = f"committed ({PARAMS_FILE.name})"
        fit_seconds = time.monotonic() - started
        started = time.monotonic()
        val_preds = perf_fit.predict_rows(validation, params)
        fit_preds = perf_fit.predict_rows(fit_rows, params)
        predict_seconds = time.monotonic() - started
    except ScepsyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unknown = sorted({p.row.model for p in val_preds if p.latency_s is None})
    unpredicted = sum(1 for p in val_preds if p.latency_s is None)
    val_table = perf_fit.error_table(val_preds)
    fit_all = perf_fit.error_table(fit_preds)[0]
    reference_values = params[perf_fit.REFERENCE_GPU].to_dict()
    if args.json:
        print(
            json.dumps(
                {
                    "params_source": source,
                    "params": reference_values,
                    "data": str(args.data),
                    "fit_rows": len(fit_rows),
                    "validation_rows": len(validation),
                    "validation_unpredicted_rows": unpredicted,
                    "unknown_models": unknown,
                    "validation": val_table,
                    "fit": fit_all,
                    "fit_seconds": round(fit_seconds, 2),
                    "predict_seconds": round(predict_seconds, 2),
                }
            )
        )
        return 0
    print(f"parameters: {source}")
    for name, value in reference_values.items():
        print(f"  {name:22} {value:.4g}")
    print(
        f"rows: fit {len(fit_rows)}, validation {len(validation)}, "
        f"validation rows without a prediction {unpredicted}"
        + (f" (unknown models: {', '.join(unknown)})" if unknown else "")
    )
    _print_table(val_table, "latency error on the validation split (absolute %):")
    print(
        f"fit split, for reference: median {fit_all['median_ape']:.1f}%, "
        f"p90 {fit_all['p90_ape']:.1f}% over {fit_all['rows']} rows"
    )
    fit_time = f"fit {fit_seconds:.1f} s, " if args.refit else ""
    print(f"time: {fit_time}predictions {predict_seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
