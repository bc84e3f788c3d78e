"""The SNS source's pure parts: which hosts and URLs may be fetched, the config's refusals, the
signed string, and what a notification turns into."""

from __future__ import annotations

import json

import pytest

from fastconn.config import validate_config
from fastconn.errors import ConfigError
from fastconn.sources.sns import Notification, SnsConfig, notification_messages
from fastconn.sources.sns.config import DEFAULT_SIGNING_CERT_HOSTS
from fastconn.sources.sns.envelope import EnvelopeError, parse_envelope
from fastconn.sources.sns.hosts import parse_host_pattern, url_problem
from fastconn.sources.sns.subscribe import subscription_endpoint

TOPIC = "arn:aws:sns:us-east-1:123456789012:orders"
DEFAULTS = tuple(parse_host_pattern(h) for h in DEFAULT_SIGNING_CERT_HOSTS)
PEM = "/SimpleNotificationService-0123.pem"


@pytest.mark.parametrize(
    "host",
    [
        "sns.us-east-1.amazonaws.com",
        "sns.eu-central-1.amazonaws.com",
        "sns.us-gov-west-1.amazonaws.com",
        "sns.cn-north-1.amazonaws.com.cn",
        "SNS.US-EAST-1.AMAZONAWS.COM",
        "sns.us-east-1.amazonaws.com:443",
    ],
)
def test_aws_sns_hosts_are_allowed_by_default(host: str) -> None:
    assert url_problem(f"https://{host}{PEM}", DEFAULTS, suffix=".pem") is None


@pytest.mark.parametrize(
    "url",
    [
        f"http://sns.us-east-1.amazonaws.com{PEM}",  # not https
        f"https://sns.us-east-1.amazonaws.com.evil.example{PEM}",  # the AWS name as a prefix
        f"https://evil-sns.us-east-1.amazonaws.com{PEM}",
        f"https://sns.us-east-1.evil.amazonaws.com{PEM}",  # '*' is one label, not several
        f"https://sns..amazonaws.com{PEM}",
        f"https://sns.us-east-1.amazonaws.com.{PEM}",  # trailing dot: another name
        f"https://mybucket.s3.amazonaws.com{PEM}",  # anyone can host a .pem on S3
        f"https://sns.us-east-1.amazonaws.com:8443{PEM}",
        f"https://attacker@sns.us-east-1.amazonaws.com{PEM}",
        f"https://sns.us-east-1.amazonaws.com@evil.example{PEM}",
        "https://sns.us-east-1.amazonaws.com/cert.txt",
        f"https://sns.us-east-1.amazonaws.com:99999{PEM}",
        f"https://sns.us_east_1.amazonaws.com{PEM}",
        f"//sns.us-east-1.amazonaws.com{PEM}",
    ],
)
def test_other_certificate_urls_are_refused_with_a_reason(url: str) -> None:
    problem = url_problem(url, DEFAULTS, suffix=".pem")
    assert problem is not None and problem


def test_a_pattern_with_a_port_pins_it() -> None:
    pattern = parse_host_pattern("localhost:8443")
    assert url_problem(f"https://localhost:8443{PEM}", (pattern,)) is None
    assert url_problem(f"https://localhost{PEM}", (pattern,)) is not None
    assert url_problem(f"https://localhost:8444{PEM}", (pattern,)) is not None


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("*", "any host"),
        ("sns.*.*", "any domain"),
        ("sns.us-east-1.amazonaws.*", "any domain"),
        ("sns.us*.amazonaws.com", "whole label"),
        ("sns.amazonaws.com:0", "port"),
        ("sns.amazonaws.com:http", "port"),
        ("sns amazonaws.com", "DNS label"),
    ],
)
def test_host_patterns_that_would_match_too_much_are_config_errors(pattern: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_host_pattern(pattern)


def _config(**source: object) -> SnsConfig:
    config = validate_config(
        {
            "functions": [{"name": "f", "url": "http://127.0.0.1:1/f", "topics": [TOPIC]}],
            "sources": [{"type": "sns", **source}],
        }
    )
    source_config = config.sources[0]
    assert isinstance(source_config, SnsConfig)
    return source_config


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ({}, "topic_arns is empty"),
        ({"topic_arns": ["orders"]}, "not an SNS topic ARN"),
        ({"topic_arns": [TOPIC], "signing_cert_hosts": []}, "at least one host"),
        ({"topic_arns": [TOPIC], "signing_cert_hosts": ["*.com"]}, "any domain"),
        ({"topic_arns": [TOPIC], "raw_delivery_token": "short"}, "at least 16"),
        ({"topic_arns": [TOPIC], "path": "/metrics"}, "served by the daemon"),
        ({"topic_arns": [TOPIC], "path": "sns"}, "plain URL path"),
        ({"topic_arns": [TOPIC], "certs": "x"}, "certs: unknown key"),
        ({"topic_arns": [TOPIC], "cert_ca_file": "/nonexistent/ca.pem"}, "cannot load the CA bundle"),
        (
            {
                "topic_arns": ["arn:aws:sns:us-east-1:123456789012:other"],
                "subscribe": {"topic_arn": TOPIC, "endpoint": "https://hooks.example/sns"},
            },
            "not in topic_arns",
        ),
        (
            {
                "subscribe": {
                    "topic_arn": TOPIC,
                    "endpoint": "https://h.example/sns",
                    "raw_message_delivery": True,
                }
            },
            "needs raw_delivery_token",
        ),
        ({"subscribe": {"topic_arn": TOPIC, "endpoint": "ftp://h.example/sns"}}, "not an http"),
    ],
)
def test_config_errors_name_the_problem(source: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        _config(**source)


def test_two_sns_sources_cannot_share_a_path() -> None:
    sources = [
        {"type": "sns", "topic_arns": [TOPIC]},
        {"type": "sns", "name": "second", "topic_arns": [TOPIC]},
    ]
    with pytest.raises(ConfigError, match=r"sources\[1\]\.path: another sns source \(sources\[0\]\)"):
        validate_config(
            {
                "functions": [{"name": "f", "url": "http://127.0.0.1:1/f", "topics": [TOPIC]}],
                "sources": sources,
            }
        )


def test_subscribe_alone_allows_its_topic_and_raw_subscriptions_carry_the_token() -> None:
    config = _config(
        subscribe={"topic_arn": TOPIC, "endpoint": "https://h.example/sns?a=1", "raw_message_delivery": True},
        raw_delivery_token="0123456789abcdef-token",
    )
    assert config.topic_arns == (TOPIC,)
    assert config.subscribe is not None
    assert subscription_endpoint(config.subscribe, config.raw_delivery_token) == (
        "https://h.example/sns?a=1&token=0123456789abcdef-token"
    )


def _envelope(**fields: object) -> bytes:
    base: dict[str, object] = {
        "Type": "Notification",
        "MessageId": "m1",
        "TopicArn": TOPIC,
        "Message": "hello\nworld",
        "Timestamp": "2026-12-03T10:00:00.000Z",
        "SignatureVersion": "1",
        "Signature": "c2ln",
        "SigningCertURL": f"https://sns.us-east-1.amazonaws.com{PEM}",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def test_the_signed_string_is_the_documented_one() -> None:
    without = parse_envelope(_envelope())
    assert (
        without.signed_bytes()
        == (
            f"Message\nhello\nworld\nMessageId\nm1\nTimestamp\n2026-12-03T10:00:00.000Z\nTopicArn\n{TOPIC}\n"
            "Type\nNotification\n"
        ).encode()
    )
    with_subject = parse_envelope(_envelope(Subject="Hi"))
    assert b"MessageId\nm1\nSubject\nHi\nTimestamp\n" in with_subject.signed_bytes()
    confirmation = parse_envelope(
        _envelope(Type="SubscriptionConfirmation", Token="tok", SubscribeURL="https://x/", Subject="ignored")
    )
    assert (
        confirmation.signed_bytes()
        == (
            f"Message\nhello\nworld\nMessageId\nm1\nSubscribeURL\nhttps://x/\nTimestamp\n"
            f"2026-12-03T10:00:00.000Z\nToken\ntok\nTopicArn\n{TOPIC}\nType\nSubscriptionConfirmation\n"
        ).encode()
    )


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"Subject": 3}, "Subject is a int"),
        ({"Timestamp": None}, "Timestamp is missing"),
        ({"MessageAttributes": []}, "MessageAttributes is not an object"),
        ({"MessageAttributes": {"a": {"Value": "x"}}}, "MessageAttributes\\['a'\\]"),
        ({"MessageAttributes": {"a": {"Type": "String", "Value": None}}}, "not a string or number"),
    ],
)
def test_envelope_errors(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        parse_envelope(_envelope(**fields))


def test_a_notification_becomes_one_message_with_the_sns_headers() -> None:
    notification = Notification(
        topic_arn=TOPIC,
        message_id="m1",
        message=b"body",
        subject="Hi",
        timestamp="2026-12-03T10:00:00.000Z",
        attributes=(("color", "String", "blue"), ("bad name", "String", "x"), ("multi", "String", "a\nb")),
    )
    [message] = notification_messages(notification)
    assert (message.topic, message.payload, message.message_id) == (TOPIC, b"body", "m1")
    headers = dict(message.headers)
    assert headers == {
        "X-Sns-Message-Id": "m1",
        "X-Sns-Arn": TOPIC,
        "X-Sns-Subject": "Hi",
        "X-Sns-Timestamp": "2026-12-03T10:00:00.000Z",
        "X-Sns-Attr-color": "blue",
        "X-Sns-Attr-color-Type": "String",
        # "bad name" is no HTTP token and "a\nb" no header value: left out, not a broken call
        "X-Sns-Attr-multi-Type": "String",
    }
