"""Arrival processes: Poisson, and replay of recorded production timestamps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.core.errors import InvalidInputError
from services.core.sim.arrivals import (
    load_timestamps,
    parse_azure,
    parse_mooncake,
    poisson,
    poisson_at,
    replay,
)

REPO = Path(__file__).resolve().parents[3]
DATA = REPO.parent / "shared" / "data"


def test_poisson_is_seeded_and_has_its_rate() -> None:
    a, b = poisson(4.0, 20_000, 1), poisson(4.0, 20_000, 1)
    assert np.array_equal(a, b)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    # mean gap 1/4 s; the sample mean of 20,000 gaps is within 3% (about 4 standard errors)
    assert np.diff(a).mean() == pytest.approx(0.25, rel=0.03)
    assert not np.array_equal(a, poisson(4.0, 20_000, 2))


def test_replay_keeps_the_shape_and_scales_to_the_rate() -> None:
    recorded = np.array([0.0, 1.0, 1.5, 4.0])  # span 4 s, mean gap 4/3 s
    # to 3 requests/s: times x (4/3) / (1/3)... i.e. x (1 / (4/3)) / 3 = x 0.25
    assert replay(recorded, 3.0, 4) == pytest.approx([0.0, 0.25, 0.375, 1.0])
    # 6 requests: the recording again, one mean gap after its end (at 4 + 4/3 s)
    tiled = replay(recorded, 3.0, 6)
    assert tiled[4:] == pytest.approx([(4 + 4 / 3) * 0.25, (4 + 4 / 3 + 1) * 0.25])


def test_parsers_read_the_public_formats() -> None:
    azure = ["TIMESTAMP,ContextTokens,GeneratedTokens", "2023-11-16 18:15:46.5,374,44",
             "2023-11-16 18:15:48.25,396,109"]  # fmt: skip
    assert parse_azure(azure) == pytest.approx([0.0, 1.75])
    mooncake = ['{"timestamp": 1000, "input_length": 1}', "", '{"timestamp": 3500}']
    assert parse_mooncake(mooncake) == pytest.approx([0.0, 2.5])
    with pytest.raises(InvalidInputError, match="line 2: bad TIMESTAMP"):
        parse_azure(["TIMESTAMP", "yesterday"])
    with pytest.raises(InvalidInputError, match="line 1: no numeric 'timestamp'"):
        parse_mooncake(['{"t": 1}'])


@pytest.mark.parametrize(
    "path",
    [
        "azure-llm-trace-2023/AzureLLMInferenceTrace_conv.csv",
        "mooncake-trace/conversation_trace.jsonl",
    ],
)
def test_the_shared_traces_replay(path: str) -> None:
    file = DATA / path
    if not file.exists():
        pytest.skip(f"{file} not present")
    times = load_timestamps(file)
    assert times[0] == 0.0 and len(times) > 1000
    arrivals = replay(times, 5.0, 2000)
    assert len(arrivals) == 2000
    assert 1999 / arrivals[-1] == pytest.approx(5.0, rel=0.5)  # bursty, but about the rate


def test_poisson_at_offers_exactly_the_rate_with_poisson_gaps() -> None:
    rate, n = 41.5, 2_870
    free_rates, exact_rates = [], []
    for seed in range(20):
        free, exact = poisson(rate, n, seed), poisson_at(rate, n, seed)
        free_rates.append((n - 1) / free[-1])
        exact_rates.append((n - 1) / exact[-1])
        # the same draws, scaled: gaps in the same proportions, sorted, the first at 0
        assert exact[0] == 0 and np.all(np.diff(exact) >= 0)
        np.testing.assert_allclose(exact[1:] / exact[-1], free[1:] / free[-1], rtol=1e-12)
        gaps = np.diff(exact) * rate  # unit-mean exponential-like: CV near 1
        assert 0.9 < gaps.std() / gaps.mean() < 1.1
    np.testing.assert_allclose(exact_rates, rate, rtol=1e-12)
    assert np.std(np.asarray(free_rates) / rate) > 0.005  # a free draw misses by ~1/sqrt(n)
    assert poisson_at(rate, 1, 0).tolist() == [0.0]
