"""The SQS source's configuration, headers and pure decisions, without a server."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fastconn.message import ErrorKind, Message, Outcome, TargetResult, Verdict
from fastconn.sources.sqs.config import SqsConfig
from fastconn.sources.sqs.headers import attribute_headers
from fastconn.sources.sqs.settle import (
    DLT_CONTEXT,
    DLT_QUEUE_URL,
    MAX_ATTRIBUTES,
    DeadLetter,
    Delay,
    Delete,
    Redrive,
    dead_letter_attributes,
    decide,
    worse,
)

Q = "https://sqs.eu-west-1.amazonaws.com/123456789012/orders"


def outcome(verdict: Verdict, *, retry_after: float | None = None, body: bytes | None = None) -> Outcome:
    status = {Verdict.OK: 200, Verdict.RETRY: 503, Verdict.FAILED: 400, Verdict.UNROUTED: 0}[verdict]
    results = (
        ()
        if verdict is Verdict.UNROUTED
        else (TargetResult("fn", status, ErrorKind.NONE, 1, 0.01, retry_after, body),)
    )
    return Outcome(Message("q", b""), verdict, "id", results)


def test_queue_urls_list_comma_form_env_and_region(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    config = SqsConfig.model_validate({"queue_urls": f"{Q}, {Q}-2.fifo"})
    assert config.queue_urls == (Q, f"{Q}-2.fifo")
    assert config.client_region == "eu-west-1"  # from the AWS queue URL
    monkeypatch.setenv("queue_url", Q)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    from_env = SqsConfig.model_validate({})
    assert from_env.queue_urls == (Q,)
    assert from_env.client_region == "us-west-2"
    assert (from_env.max_messages, from_env.wait_time, from_env.visibility_timeout) == (10, 20.0, 30.0)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "queue_urls: required"),
        ({"queue_urls": ["orders"]}, "expected a queue URL"),
        ({"queue_urls": ["http://localhost:4566/"]}, "must end with the queue name"),
        ({"queue_urls": [Q, Q]}, "listed twice"),
        ({"queue_urls": [Q, Q.replace("eu-west-1", "us-east-1")]}, "share a name"),
        ({"queue_urls": [Q], "max_messages": 11}, "less than or equal to 10"),
        ({"queue_urls": [Q], "max_messages": 0}, "greater than or equal to 1"),
        ({"queue_urls": [Q], "wait_time": "21s"}, "less than or equal to 20"),
        ({"queue_urls": [Q], "visibility_timeout": "13h"}, "less than or equal to 43200"),
        ({"queue_urls": [Q], "dead_letter_queue_url": Q}, "must not be one of queue_urls"),
        ({"queue_urls": [Q], "dead_letter_queue_url": Q + "-dlq.fifo"}, "FIFO dead-letter queue"),
        ({"queue_urls": [Q], "endpoint_url": "localhost:4566"}, "not an http(s) URL"),
        ({"queue_urls": [Q], "message_attribute_names": ["a b"]}, "not an attribute name"),
        ({"queue_urls": [Q], "decode": "xml"}, "'none' or 's3'"),
        ({"queue_urls": [Q], "retry_delay": "10s", "backoff_max": "1s"}, "backoff_max must be >="),
        ({"queue_urls": [Q], "queue_url": Q}, "Extra inputs are not permitted"),
        ({"queue_urls": ["http://127.0.0.1:5000/123/q"]}, "region: required"),
    ],
)
def test_bad_config_names_the_problem(
    table: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("queue_url", raising=False)
    with pytest.raises(ValidationError) as caught:
        SqsConfig.model_validate(table)
    assert message in str(caught.value)


def test_attribute_headers_cannot_spoof_the_source() -> None:
    headers = attribute_headers(
        {
            "tenant": {"DataType": "String", "StringValue": "acme"},
            "n": {"DataType": "Number", "StringValue": "3"},
            "raw": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
            "bad": {"DataType": "String", "StringValue": "a\nb"},
        }
    )
    assert headers == [("X-Sqs-Attr-tenant", "acme"), ("X-Sqs-Attr-n", "3"), ("X-Sqs-Attr-raw", "AAE=")]


def test_decisions() -> None:
    common = {"max_deliver": 3, "initial": 1.0, "maximum": 8.0}
    assert decide(None, attempts=1, dead_letters=True, **common) == Delete()
    assert decide(outcome(Verdict.OK), attempts=1, dead_letters=True, **common) == Delete()
    assert decide(outcome(Verdict.UNROUTED), attempts=1, dead_letters=False, **common) == Delete()
    assert [
        decide(outcome(Verdict.RETRY), attempts=a, dead_letters=False, **common) for a in (1, 2, 3, 9)
    ] == [
        Delay(1.0),
        Delay(2.0),
        Delay(4.0),
        Delay(8.0),
    ]
    assert decide(outcome(Verdict.RETRY, retry_after=5.0), attempts=1, dead_letters=False, **common) == Delay(
        5.0
    )
    assert decide(
        outcome(Verdict.RETRY, retry_after=50.0), attempts=1, dead_letters=False, **common
    ) == Delay(8.0)
    assert decide(outcome(Verdict.RETRY), attempts=3, dead_letters=True, **common) == DeadLetter(
        "max_deliver (3) reached"
    )
    assert decide(outcome(Verdict.FAILED), attempts=1, dead_letters=True, **common) == DeadLetter(
        "non-retryable failure"
    )
    assert decide(outcome(Verdict.FAILED), attempts=1, dead_letters=False, **common) == Redrive(
        "non-retryable failure"
    )


def test_the_worst_part_decides() -> None:
    ok, retry, failed = outcome(Verdict.OK), outcome(Verdict.RETRY), outcome(Verdict.FAILED)
    assert worse(worse(worse(None, ok), failed), retry) is failed
    assert worse(worse(None, retry), ok) is retry
    later_retry = outcome(Verdict.RETRY)
    assert worse(retry, later_retry) is retry  # the first of a rank


def test_dead_letter_attributes_fit_sqs_limit() -> None:
    original = {f"a{i}": {"DataType": "String", "StringValue": str(i)} for i in range(6)}
    original["fastconn-dlt-reason"] = {"DataType": "String", "StringValue": "stale"}
    attributes = dead_letter_attributes(
        outcome(Verdict.FAILED, body=b"boom"),
        queue_url=Q,
        message_id="m-1",
        deliveries=2,
        reason="non-retryable failure",
        original=original,
    )
    assert len(attributes) == MAX_ATTRIBUTES
    values = {k: v["StringValue"] for k, v in attributes.items()}
    assert values[DLT_QUEUE_URL] == Q
    assert values["fastconn-dlt-reason"] == "non-retryable failure"  # not the stale one
    assert values["fastconn-dlt-status"] == "400"
    assert values["fastconn-dlt-headers-dropped"] == "5"
    context = json.loads(values[DLT_CONTEXT])
    assert context["fastconn-dlt-response"] == "boom"
    assert context["fastconn-dlt-deliveries"] == "2"
    assert values["a0"] == "0"


def test_dead_letter_attributes_of_an_undecodable_message() -> None:
    attributes = dead_letter_attributes(
        None, queue_url=Q, message_id="m-2", deliveries=1, reason="cannot decode: not JSON", original={}
    )
    values = {k: v["StringValue"] for k, v in attributes.items()}
    assert values["fastconn-dlt-reason"] == "cannot decode: not JSON"
    assert values["fastconn-dlt-message-id"] == "m-2"
