"""The core's CloudEvents decoders and signature checks against independent implementations:
events made by the ``cloudevents`` SDK in all three modes must decode to the same attributes and
data, what a function receives must decode with the SDK, and signatures made with Python's
``hmac`` must verify (and forged, tampered or replayed ones must not)."""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event, to_binary_event, to_structured_event
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from fastconn import _core
from fastconn.signatures import SignatureKeys, signature_problem
from fastconn.sources.cloudevents import CloudEventsConfig

BATCH = "application/cloudevents-batch+json"


def sdk_event(data: Any = None, **attributes: Any) -> CloudEvent:
    base: dict[str, Any] = {
        "id": "evt-1",
        "source": "https://github.com/org/repo",
        "type": "com.github.push",
        "subject": 'Grüße 100% "fertig"',
        "time": datetime(2026, 12, 3, 10, 43, 30, tzinfo=UTC),
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "partitionkey": "user 42",
        "datacontenttype": "application/json",
    }
    base.update(attributes)
    return CloudEvent(attributes={k: v for k, v in base.items() if v is not None}, data=data)


def calls(message: HTTPMessage, **options: Any) -> list[tuple[str, str, list[tuple[str, str]], bytes]]:
    return _core.cloudevents_calls(list(message.headers.items()), message.body, **options)


def received(headers: list[tuple[str, str]], body: bytes) -> CloudEvent:
    """The event a function sees, decoded by the SDK."""
    event = from_http_event(HTTPMessage(dict(headers), body))
    assert isinstance(event, CloudEvent)
    return event


def assert_same_event(got: CloudEvent, sent: CloudEvent) -> None:
    for getter in ("get_id", "get_source", "get_type", "get_subject", "get_time", "get_datacontenttype"):
        assert getattr(got, getter)() == getattr(sent, getter)(), getter
    for name in ("traceparent", "partitionkey"):
        assert got.get_extension(name) == sent.get_extension(name), name
    assert got.get_data() == sent.get_data()


@pytest.mark.parametrize("encode", [to_binary_event, to_structured_event], ids=["binary", "structured"])
@pytest.mark.parametrize("delivery", ["binary", "structured"])
def test_sdk_events_reach_functions_intact(encode: Any, delivery: str) -> None:
    sent = sdk_event({"ref": "refs/heads/main", "commits": [1, 2]})
    [(topic, message_id, headers, body)] = calls(encode(sent), delivery=delivery)
    assert topic == "com.github.push"
    assert message_id == "evt-1"
    names = {name for name, _ in headers}
    assert not names & {"x-message-id", "x-callback-url", "content-length"}
    if delivery == "binary":
        assert {"ce-id", "ce-source", "ce-type", "ce-specversion", "traceparent"} <= names
        assert dict(headers)["content-type"] == "application/json"
    else:
        assert dict(headers)["content-type"].startswith("application/cloudevents+json")
        assert dict(headers)["traceparent"] == sent.get_extension("traceparent")
    assert_same_event(received(headers, body), sent)


def test_binary_data_and_text_survive_both_modes() -> None:
    for data, content_type in (
        (bytes(range(256)), "application/octet-stream"),
        ("plain text €", "text/plain"),
    ):
        sent = sdk_event(data, datacontenttype=content_type)
        for encode in (to_binary_event, to_structured_event):
            for delivery in ("binary", "structured"):
                [(_, _, headers, body)] = calls(encode(sent), delivery=delivery)
                assert received(headers, body).get_data() == data, (content_type, encode, delivery)


def test_batched_mode_delivers_every_event_in_order_or_none() -> None:
    events = [sdk_event({"n": i}, id=f"e{i}", type=f"com.example.{i % 2}") for i in range(5)]
    body = b"[" + b",".join(JSONFormat().write(e) for e in events) + b"]"
    headers = [("Content-Type", BATCH)]
    result = _core.cloudevents_calls(headers, body)
    assert [(topic, mid) for topic, mid, _, _ in result] == [
        (f"com.example.{i % 2}", f"e{i}") for i in range(5)
    ]
    for sent, (_, _, h, b) in zip(events, result, strict=True):
        assert_same_event(received(h, b), sent)
    with pytest.raises(ValueError) as too_many:
        _core.cloudevents_calls(headers, body, max_batch=4)
    assert too_many.value.args[0] == 413 and "max_batch (4)" in too_many.value.args[1]
    broken = body.replace(b'"type": "com.example.1"', b'"type": ""', 1)
    with pytest.raises(ValueError) as invalid:
        _core.cloudevents_calls(headers, broken)
    assert invalid.value.args[0] == 400 and "event #1 of the batch" in invalid.value.args[1]


@pytest.mark.parametrize("missing", ["id", "source", "type", "specversion"])
def test_a_missing_required_attribute_is_a_400_naming_it(missing: str) -> None:
    binary = to_binary_event(sdk_event({"a": 1}))
    headers = [(k, v) for k, v in binary.headers.items() if k != f"ce-{missing}"]
    with pytest.raises(ValueError) as refused:
        _core.cloudevents_calls(headers, binary.body)
    assert refused.value.args[0] == 400
    assert f"ce-{missing}" in refused.value.args[1]

    structured = to_structured_event(sdk_event({"a": 1}))
    body = structured.body.replace(f'"{missing}":'.encode(), b'"x' + missing.encode() + b'":', 1)
    with pytest.raises(ValueError) as refused:
        _core.cloudevents_calls(list(structured.headers.items()), body)
    assert refused.value.args[0] == 400
    assert f'"{missing}"' in refused.value.args[1]


def test_other_formats_and_plain_requests_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError) as xml:
        _core.cloudevents_calls([("Content-Type", "application/cloudevents+xml")], b"<e/>")
    assert xml.value.args[0] == 415
    with pytest.raises(ValueError) as plain:
        _core.cloudevents_calls([("Content-Type", "application/json")], b"{}")
    assert plain.value.args[0] == 400 and "binary mode" in plain.value.args[1]
    with pytest.raises(ValueError) as big:
        _core.cloudevents_calls(
            list(to_binary_event(sdk_event("x" * 100)).headers.items()), b"x" * 100, max_body_bytes=99
        )
    assert big.value.args[0] == 413


def test_routing_by_source_and_subject_and_wildcard_refusal() -> None:
    message = to_binary_event(sdk_event({"a": 1}, subject="sensors/tn-1"))
    assert calls(message, route_by="source")[0][0] == "https://github.com/org/repo"
    assert calls(message, route_by="subject")[0][0] == "sensors/tn-1"
    with pytest.raises(ValueError) as wild:
        calls(to_binary_event(sdk_event({"a": 1}, type="com.*.push")))
    assert wild.value.args[0] == 400 and "wildcard" in wild.value.args[1]
    with pytest.raises(ValueError, match="route_by"):
        calls(message, route_by="id")


def test_reply_events_from_functions_go_back_in_the_senders_mode() -> None:
    reply = sdk_event({"status": "done"}, id="reply-1", type="com.example.done")
    function_answer = to_binary_event(reply)
    for mode in ("binary", "structured"):
        answer = _core.cloudevents_reply(
            200, list(function_answer.headers.items()), function_answer.body, mode=mode
        )
        assert answer is not None
        status, headers, body = answer
        assert status == 200
        assert_same_event(received(headers, body), reply)
    structured = to_structured_event(reply)
    answer = _core.cloudevents_reply(200, list(structured.headers.items()), structured.body)
    assert answer is not None and received(answer[1], answer[2]).get_id() == "reply-1"
    # 202, or a 200 that is no event, is no reply.
    assert _core.cloudevents_reply(202, list(function_answer.headers.items()), function_answer.body) is None
    assert _core.cloudevents_reply(200, [("Content-Type", "application/json")], b'{"ok": true}') is None
    with pytest.raises(ValueError) as bad:
        _core.cloudevents_reply(200, [("Content-Type", "application/cloudevents+json")], b'{"id": "x"}')
    assert bad.value.args[0] == 400


# -- signatures ---------------------------------------------------------------------------------


def test_github_signature_made_with_python_hmac_verifies() -> None:
    keys = SignatureKeys(hmac_secret="shh")
    body = b'{"action": "opened"}'
    good = "sha256=" + hmac.new(b"shh", body, hashlib.sha256).hexdigest()
    assert signature_problem(keys, [("X-Hub-Signature-256", good)], body) is None
    problem = signature_problem(keys, [("X-Hub-Signature-256", good)], body + b" ")
    assert problem is not None and "X-Hub-Signature-256" in problem
    assert "missing" in (signature_problem(keys, [], body) or "")
    # Not UTF-8 (aiohttp's surrogateescape): refused, not an exception.
    assert signature_problem(keys, [("X-Hub-Signature-256", "sha256=\udcff")], body) is not None
    sha1 = SignatureKeys(
        hmac_secret="shh",
        signature_header="X-Hub-Signature",
        signature_prefix="sha1=",
        signature_algorithm="sha1",
    )
    legacy = "sha1=" + hmac.new(b"shh", body, hashlib.sha1).hexdigest()
    assert signature_problem(sha1, [("X-Hub-Signature", legacy)], body) is None


def test_stripe_signature_with_timestamp_tolerance() -> None:
    keys = SignatureKeys(
        hmac_secret="whsec_x",
        signature_header="Stripe-Signature",
        signature_scheme="stripe",
        signature_prefix="v1=",
    )
    body = b'{"id": "evt_1"}'

    def header(at: int, secret: bytes = b"whsec_x") -> list[tuple[str, str]]:
        digest = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
        return [("Stripe-Signature", f"t={at},v1={digest}")]

    now = int(time.time())
    assert signature_problem(keys, header(now), body) is None
    stale = signature_problem(keys, header(now - 3600), body)
    assert stale is not None and "tolerance of 300 s" in stale
    assert signature_problem(keys, header(now, b"other"), body) is not None


def test_gitlab_token() -> None:
    keys = SignatureKeys(hmac_secret="tok", signature_header="X-Gitlab-Token", signature_scheme="token")
    assert signature_problem(keys, [("X-Gitlab-Token", "tok")], b"{}") is None
    assert signature_problem(keys, [("X-Gitlab-Token", "tok2")], b"{}") is not None


def test_signature_keys_give_the_one_rule_both_routes_take() -> None:
    assert SignatureKeys().signature_rule() is None
    stripe = SignatureKeys(
        hmac_secret="whsec_x",
        signature_header="Stripe-Signature",
        signature_scheme="stripe",
        signature_prefix="v1=",
    )
    assert stripe.signature_rule() == ("Stripe-Signature", "stripe", "whsec_x", "v1=", "sha256", "hex", 300)
    with pytest.raises(ValidationError, match="signature_header 'X Sig' is not an HTTP header name"):
        SignatureKeys(hmac_secret="k", signature_header="X Sig")


# -- config -------------------------------------------------------------------------------------


def test_cloudevents_config_defaults_and_refusals() -> None:
    config = CloudEventsConfig()
    assert (config.path, config.route_by, config.delivery, config.reply, config.max_batch) == (
        "/cloudevents",
        "type",
        "binary",
        False,
        100,
    )
    for bad, needle in (
        ({"path": "cloudevents"}, "must start with '/'"),
        ({"path": "/ce?x=1"}, "without query"),
        ({"path": "/webhook/x"}, "taken by fastconn"),
        ({"route_by": "id"}, "route_by"),
        ({"max_batch": 0}, "max_batch"),
        ({"bogus": 1}, "bogus"),
        ({"signature_scheme": "rsa"}, "signature_scheme"),
    ):
        with pytest.raises(ValidationError, match=needle):
            CloudEventsConfig(**bad)
