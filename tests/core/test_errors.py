"""The domain errors' structured fields: defaults, derivation from messages, rebuilding."""

from __future__ import annotations

import pytest

from services.core import errors
from services.core.errors import InvalidInputError, field_from_message, value_from_message
from services.core.placement.rules import InfeasibleKind, PlacementInfeasible
from services.core.planning.search import AllocationInfeasible


@pytest.mark.parametrize(
    ("message", "field", "value"),
    [
        # "<field>: <problem>, got <value>"
        ("workflows[0].rate: must be > 0, got -1.0", "workflows[0].rate", "-1.0"),
        ("mix.input_len: must be >= 1, got 0", "mix.input_len", "0"),
        ("rho: must be in (0, 1], got 1.5", "rho", "1.5"),
        ("tp: must be one of (1, 2, 4, 8), got 3", "tp", "3"),
        ("--rates: must be >= 1, got 0", "--rates", "0"),
        ("models.qwen-7b.tp: unknown field", "models.qwen-7b.tp", ""),
        # a request field then the path inside it: joined
        ("spec_yaml: workflows[1].rate: must be > 0, got 0", "spec_yaml.workflows[1].rate", "0"),
        ("spec_yaml: cluster: nodes[0].gpus: bad", "spec_yaml.cluster.nodes[0].gpus", ""),
        # a leading file name is the source, not a field
        ("c.yaml: nodes[0].gpus: must be a positive integer, got 'x'", "nodes[0].gpus", "'x'"),
        ("/tmp/spec.yaml: version: must be 1, got 2", "version", "2"),
        ("spec.yaml: not valid YAML: mapping values", "", ""),
        # the value is what follows the last "got", whether after "," or ";"
        ("seconds: need mean >= 0, cv >= 0; got -1, 2", "seconds", "-1, 2"),
        # no field prefix: nothing derived
        ("request body must be a JSON object, got list", "", "list"),
        ("perf params: alpha: must be in (0, 1]", "", ""),
        ("trace 'a.jsonl': cannot read: No such file", "", ""),
        ("model config 'm.json': must be a JSON object", "", ""),
        ("a.csv:3: malformed row (bad)", "", ""),
        ("no colon at all", "", ""),
        ("", "", ""),
    ],
)
def test_invalid_input_takes_field_and_value_from_its_message(
    message: str, field: str, value: str
) -> None:
    assert (field_from_message(message), value_from_message(message)) == (field, value)
    exc = InvalidInputError(message)
    assert (exc.field, exc.value, str(exc)) == (field, value, message)


def test_explicit_fields_win_and_empty_means_none() -> None:
    exc = InvalidInputError("rate: must be > 0, got -1", field="workflows[2].rate", value="-1.0")
    assert (exc.field, exc.value) == ("workflows[2].rate", "-1.0")
    bare = InvalidInputError("rate: must be > 0, got -1", field="", value="")
    assert (bare.field, bare.value) == ("", "")


def test_other_classes_derive_nothing() -> None:
    exc = errors.NotFoundError("node: 'x' not found, got nothing")
    assert (exc.field, exc.value, dict(exc.details)) == ("", "", {})


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (errors.ScepsyError("x"), "error"),
        (errors.InvalidInputError("x"), "invalid_input"),
        (errors.ConfigError("x"), "invalid_config"),
        (errors.InventoryError("x"), "invalid_inventory"),
        (errors.UnknownGpuError("x"), "unknown_gpu"),
        (errors.NotFoundError("x"), "not_found"),
        (errors.InfeasibleError("x"), "infeasible"),
        (errors.UnavailableError("x"), "unavailable"),
        (errors.UnavailableError("x", reason="redis_down"), "redis_down"),
    ],
)
def test_each_class_has_a_default_reason(exc: errors.ScepsyError, reason: str) -> None:
    assert exc.reason == reason


def test_placement_infeasible_fields_and_rebuild() -> None:
    exc = PlacementInfeasible(
        InfeasibleKind.TP_EXCEEDS_DOMAIN, "big: TP 8 ...", model="big", needed=8, available=2
    )
    assert str(exc) == "tp_exceeds_domain: big: TP 8 ..."
    assert (exc.reason, exc.field) == ("tp_exceeds_domain", "allocation")
    assert dict(exc.details) == {"model": "big", "needed": 8.0, "available": 2.0}
    # what a client holds after the wire: every detail as text
    text = {k: str(v) for k, v in exc.details.items()}
    back = PlacementInfeasible.from_fields(str(exc), reason=exc.reason, details=text)
    assert type(back) is PlacementInfeasible
    assert (back.kind, back.model, back.needed, back.available, str(back)) == (
        InfeasibleKind.TP_EXCEEDS_DOMAIN,
        "big",
        8.0,
        2.0,
        str(exc),
    )
    with pytest.raises(ValueError):
        PlacementInfeasible.from_fields(str(exc), reason="no_such_kind", details=text)
    with pytest.raises(KeyError):
        PlacementInfeasible.from_fields(str(exc), reason=exc.reason, details={"model": "big"})


def test_allocation_infeasible_fields_and_rebuild() -> None:
    exc = AllocationInfeasible(["A: too slow", "B: no fit"], {"w2": 3.25, "w.1": 0.1 + 0.2})
    assert exc.reason == "allocation_infeasible"
    assert dict(exc.details) == {
        "reasons.0": "A: too slow",
        "reasons.1": "B: no fit",
        "best_throughput.w2": 3.25,
        "best_throughput.w.1": 0.1 + 0.2,
    }
    # the wire gives the details back as text, in any order
    text = {k: repr(v) if isinstance(v, float) else v for k, v in reversed(exc.details.items())}
    back = AllocationInfeasible.from_fields(str(exc), reason=exc.reason, details=text)
    assert (back.reasons, back.best_throughput, str(back)) == (
        exc.reasons,
        exc.best_throughput,
        str(exc),
    )
    assert back.best_throughput["w.1"] == 0.1 + 0.2  # exact, not 0.3
