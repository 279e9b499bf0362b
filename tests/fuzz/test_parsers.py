"""Property tests over every parser (the ``scepsy fuzz`` targets, with a few cases each): hostile
input gets a clear error (a ``ScepsyError`` naming the problem, an OpenAI-shaped 4xx), never a
crash or a 500. ``scepsy fuzz`` runs the same targets with 10,000 cases each. The hostile texts
(nesting thousands of levels deep, YAML aliases, tags, control bytes), which the generated cases
meet one time in 50, are each read by every file parser here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cli import fuzz
from services.core.errors import ScepsyError

FEW = settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _no_crash(check: Any, value: Any, allowed: tuple[type[BaseException], ...]) -> None:
    try:
        check(value)
    except allowed as exc:
        assert str(exc), "an error must say what is wrong"


@FEW
@given(st.one_of(fuzz.mutated(fuzz.SPEC).map(fuzz._yaml), st.text(max_size=100)))
def test_spec_files(text: str) -> None:
    _no_crash(fuzz.check_spec, text, (ScepsyError,))


@FEW
@given(st.one_of(fuzz.mutated(fuzz.CLUSTER).map(fuzz._yaml), st.text(max_size=100)))
def test_cluster_files(text: str) -> None:
    _no_crash(fuzz.check_cluster, text, (ScepsyError,))


@FEW
@given(st.lists(fuzz.mutated(fuzz.TRACE_CALL).map(fuzz._json), max_size=4).map("\n".join))
def test_trace_files(text: str) -> None:
    _no_crash(fuzz.check_trace, text, (ScepsyError,))


@FEW
@given(st.one_of(fuzz.mutated(fuzz.ALLOCATION).map(fuzz._yaml), st.text(max_size=100)))
def test_allocation_files(text: str) -> None:
    _no_crash(fuzz.check_allocation, text, (ScepsyError,))


@pytest.mark.parametrize("text", fuzz.HOSTILE_TEXT, ids=range(len(fuzz.HOSTILE_TEXT)))
@pytest.mark.parametrize("parser", ["spec", "cluster", "trace", "allocation"])
def test_hostile_texts_are_clear_errors_in_every_file_parser(parser: str, text: str) -> None:
    # deep nesting ended in a RecursionError inside these readers
    _no_crash(fuzz.TARGETS[parser].check, text, (ScepsyError,))


@FEW
@given(fuzz.proto_inputs())
def test_proto_messages(case: tuple[str, bytes]) -> None:
    from google.protobuf.message import DecodeError

    _no_crash(fuzz.check_proto, case, (ScepsyError, DecodeError))


@pytest.fixture(scope="module")
def http_check() -> Iterator[fuzz.HttpCheck]:
    with fuzz.running_router() as address:
        check = fuzz.HttpCheck(address)
        yield check
        check.close()


def test_http_bodies(http_check: fuzz.HttpCheck) -> None:
    @FEW
    @given(fuzz.http_bodies())
    def property_(case: tuple[str, bytes]) -> None:
        http_check(case)  # raises on a 5xx or a 4xx that is not OpenAI-shaped

    property_()


@FEW
@given(fuzz.http_requests())
def test_raw_http_requests(data: bytes) -> None:
    fuzz.check_http_request(data)  # a 4xx refusal or a request, nothing else


@pytest.mark.parametrize(
    "data",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n",
        b"POST / HTTP/1.1\r\n\xff: \xfe\r\n\r\n",
        b"\r\n\r\n",
    ],
)
def test_hostile_request_heads_are_refused_or_read(data: bytes) -> None:
    fuzz.check_http_request(data)


def test_the_http_target_counts_answers_by_status() -> None:
    with fuzz.running_router() as address:
        check = fuzz.HttpCheck(address)
        try:
            result = fuzz.run_target(fuzz.TARGETS["http"], 10, check=check)
        finally:
            check.close()
    assert result.crashes == 0 and sum(check.statuses.values()) == 10
    assert all(status < 500 for status in check.statuses)


def test_the_fuzz_command_counts_cases_and_crashes(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli.main import main

    assert main(["fuzz", "--cases", "25", "--target", "proto", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["target"] == "proto" and result["cases"] == 25 and result["crashes"] == 0

    # a crash is counted and fails the command: a parser that raises something else
    def boom(value: Any) -> None:
        raise IndexError("not a parser's error")

    target = fuzz.Target("boom", fuzz.json_values, boom)
    crashed = fuzz.run_target(target, 10)
    assert crashed.cases == 10 and crashed.crashes == 10 and "IndexError" in crashed.examples[0]


# found by `scepsy fuzz --target cluster`: the file built that many devices (MemoryError; 17.9 GB
# before the fuzz run was stopped) or overflowed
@pytest.mark.parametrize("gpus", [2**31, 2**63])
def test_a_cluster_file_with_an_absurd_gpu_count_is_a_clear_error(gpus: int) -> None:
    # in a child whose address space is capped at 2 GiB, so that the blow-up cannot take the
    # host's memory (a cap here would also bind every process this test session starts)
    import subprocess
    import sys

    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from services.cli import fuzz\n"
        "from services.core.errors import ScepsyError\n"
        "import copy\n"
        f"doc = copy.deepcopy(fuzz.CLUSTER); doc['nodes'][0]['gpus'] = {gpus}\n"
        "text = fuzz._yaml(doc)\n"
        "try:\n    fuzz.check_cluster(text)\nexcept ScepsyError as exc:\n"
        "    print('clear error:', exc)\nexcept BaseException as exc:\n"
        "    print('crash:', type(exc).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.startswith("clear error:") and "gpus" in done.stdout, done.stdout


# found by `scepsy fuzz --target spec` (14 of 10,000 cases): ValueError / UnicodeEncodeError
# from pathlib
@pytest.mark.parametrize("path", ["\x00", "a\udc80\ud930"], ids=["nul", "surrogates"])
def test_a_spec_naming_an_impossible_cluster_path_is_a_clear_error(path: str) -> None:
    import copy

    doc = copy.deepcopy(fuzz.SPEC)
    doc["cluster"] = path
    with pytest.raises(ScepsyError, match="cluster"):
        fuzz.check_spec(fuzz._json(doc))


# found by `scepsy fuzz --target allocation`: replicas 2**31 built one instance per replica
# until memory ran out (the 10,000-case run sat at its 4 GiB cap)
def test_an_allocation_file_with_an_absurd_replica_count_is_a_clear_error() -> None:
    # in a child capped at 1 GiB and 20 s, so that the blow-up takes neither the host's memory
    # nor the suite's time
    import subprocess
    import sys

    code = (
        "import copy, resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from services.cli import fuzz\n"
        "from services.core.errors import ScepsyError\n"
        "doc = copy.deepcopy(fuzz.ALLOCATION); doc['models']['a']['replicas'] = 2**31\n"
        "try:\n    fuzz.check_allocation(fuzz._yaml(doc))\nexcept ScepsyError as exc:\n"
        "    print('clear error:', exc)\nexcept BaseException as exc:\n"
        "    print('crash:', type(exc).__name__)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("no answer within 20 s") from None
    assert done.stdout.startswith("clear error:") and "replicas" in done.stdout, done.stdout
