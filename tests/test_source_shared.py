"""What every source shares: the backoff formula and the dead-letter failure context."""

from __future__ import annotations

import re

from fastconn.backoff import doubling
from fastconn.deadletter import (
    DLT_ATTEMPTS,
    DLT_DELIVERIES,
    DLT_ERROR,
    DLT_FAILED,
    DLT_FUNCTION,
    DLT_MESSAGE_ID,
    DLT_PREFIX,
    DLT_REASON,
    DLT_STATUS,
    DLT_TIME,
    RESPONSE_EXCERPT,
    failure_context,
    response_excerpt,
)
from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict


def _outcome(*results: TargetResult, verdict: Verdict = Verdict.FAILED) -> Outcome:
    return Outcome(Message("t", b"p"), verdict, "id-1", results)


def test_doubling_starts_at_initial_and_stops_at_the_cap() -> None:
    assert [doubling(n, 1.0, 10.0) for n in range(0, 7)] == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert doubling(10_000, 0.5, 60.0) == 60.0  # no overflow for huge attempt numbers


def test_failure_context_names_the_first_failure_and_all_failed_functions() -> None:
    ok = TargetResult("a", 200, ErrorKind.NONE, 1, 0.1)
    bad = TargetResult("b", 400, ErrorKind.NONE, 2, 0.1, body=b"nope")
    down = TargetResult("c", 0, ErrorKind.CONNECT, 3, 0.1)
    context = dict(
        failure_context(
            _outcome(ok, bad, down), [("fastconn-dlt-original-x", "1")], deliveries=4, reason="why"
        )
    )
    assert context["fastconn-dlt-original-x"] == "1"
    assert context[DLT_MESSAGE_ID] == "id-1"
    assert context[DLT_DELIVERIES] == "4"
    assert context[DLT_REASON] == "why"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", context[DLT_TIME])
    assert context[DLT_FAILED] == "b,c"
    assert (context[DLT_FUNCTION], context[DLT_STATUS], context[DLT_ATTEMPTS]) == ("b", "400", "2")
    assert context[DLT_ERROR] == "HTTP 400"
    assert all(name.startswith(DLT_PREFIX) for name in context)


def test_failure_without_status_names_the_error_kind() -> None:
    down = TargetResult("c", 0, ErrorKind.TIMEOUT, 3, 0.1)
    assert dict(failure_context(_outcome(down), [], deliveries=1, reason="r"))[DLT_ERROR] == "timeout"


def test_response_excerpt_is_bounded_and_absent_without_a_body() -> None:
    long = TargetResult("b", 500, ErrorKind.NONE, 1, 0.1, body=b"x" * (RESPONSE_EXCERPT + 10))
    assert response_excerpt(_outcome(long)) == b"x" * RESPONSE_EXCERPT
    assert response_excerpt(_outcome(TargetResult("b", 500, ErrorKind.NONE, 1, 0.1))) is None
