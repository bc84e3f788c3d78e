"""The SNS source against real HTTP: an aiohttp client posts envelopes signed the documented way
(our own key and certificate) to the daemon, which fetches the certificate over HTTPS from a
local "SNS host" (private CA) and dispatches to a recording function; and end to end against
moto's SNS (``Subscribe`` by the daemon, ``Publish`` → moto posts to the daemon)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from multidict import CIMultiDict

from aws_fixtures import REGION, MotoServer, aws_env, moto_server  # noqa: F401
from fastconn.functions import FunctionTarget
from fastconn.http_routes import HttpRequest, HttpResponse
from fastconn.message import Message
from fastconn.sources.sns import Notification, SnsConfig, SnsSource
from fastconn.testing import DaemonProcess, FunctionDouble, free_port, running_source, wait_for
from gateway_double import FunctionSpec, GatewayDouble, async_daemon_config
from sns_fixtures import (  # noqa: F401
    FOREIGN_TOPIC,
    OTHER_TOPIC,
    TOPIC,
    MotoFront,
    SigningKey,
    SnsHost,
    ca,
    ca_file,
    confirmation,
    notification,
    resign,
    sns_headers,
    sns_host,
)

if TYPE_CHECKING:
    import trustme

    from conftest import DaemonFactory

TOKEN = "raw-token-0123456789abcdef"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey()


@pytest.fixture
def cert_url(sns_host: SnsHost, key: SigningKey) -> str:
    sns_host.pems["/SimpleNotificationService-test.pem"] = key.pem
    return sns_host.url("/SimpleNotificationService-test.pem")


def sns_config(
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: Mapping[str, Any],
    **source: Any,
) -> dict[str, Any]:
    return {
        "dispatch": dict(fast_dispatch),
        "functions": [
            {"name": "orders", "url": function_double.url("/orders"), "topics": [TOPIC, OTHER_TOPIC]}
        ],
        "sources": [
            {
                "type": "sns",
                "topic_arns": [TOPIC, OTHER_TOPIC],
                "signing_cert_hosts": [sns_host.host_pattern],
                "cert_ca_file": ca_file,
                **source,
            }
        ],
    }


async def post(
    daemon: DaemonProcess,
    body: Mapping[str, Any] | bytes,
    headers: Mapping[str, str] | None = None,
    *,
    query: str = "",
) -> tuple[int, str, Mapping[str, str]]:
    if not isinstance(body, bytes):
        headers = {**sns_headers(body), **(headers or {})}
        body = json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{daemon.url}/sns{query}", data=body, headers=headers) as r,
    ):
        return r.status, await r.text(), CIMultiDict(r.headers)  # hyper sends lower-case names


async def errors(daemon: DaemonProcess, kind: str) -> float:
    return (await daemon.metrics()).get(f'fastconn_source_errors_total{{kind="{kind}",source="sns"}}', 0.0)


# -- valid signatures ------------------------------------------------------------------------------


async def test_valid_v1_and_v2_notifications_are_dispatched_with_their_headers(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    v1 = notification(key, cert_url, message='{"order": 1}', version="1", subject="New order")
    v2 = notification(key, cert_url, message="zweite Bestellung ✓", attributes={"color": ("String", "blue")})
    for envelope in (v1, v2):
        status, text, headers = await post(daemon, envelope)
        assert (status, headers["X-Message-Id"]) == (200, envelope["MessageId"]), text
    await wait_for(lambda: len(function_double.calls_to("/orders")) == 2, what="both notifications delivered")
    calls = {c.headers["X-Message-Id"]: c for c in function_double.calls_to("/orders")}
    assert set(calls) == {v1["MessageId"], v2["MessageId"]}
    first, second = calls[v1["MessageId"]], calls[v2["MessageId"]]
    assert first.body == b'{"order": 1}'
    assert first.headers["X-Topic"] == TOPIC
    assert first.headers["X-Sns-Message-Id"] == v1["MessageId"]
    assert first.headers["X-Sns-Arn"] == TOPIC
    assert first.headers["X-Sns-Subject"] == "New order"
    assert first.headers["X-Sns-Subscription-Arn"] == TOPIC + ":0d1e2f"
    assert "X-Sns-Attr-color" not in first.headers
    assert second.body == "zweite Bestellung ✓".encode()
    assert "X-Sns-Subject" not in second.headers
    assert second.headers["X-Sns-Attr-color"] == "blue"
    assert second.headers["X-Sns-Attr-color-Type"] == "String"
    # Both messages, one certificate fetch: the certificate is cached.
    assert sns_host.fetches("/SimpleNotificationService-test.pem") == 1
    # A burst naming a certificate not cached yet shares one fetch.
    sns_host.pems["/SimpleNotificationService-burst.pem"] = key.pem
    burst_url = sns_host.url("/SimpleNotificationService-burst.pem")
    answers = await asyncio.gather(*(post(daemon, notification(key, burst_url)) for _ in range(8)))
    assert [status for status, _, _ in answers] == [200] * 8
    assert sns_host.fetches("/SimpleNotificationService-burst.pem") == 1
    assert await errors(daemon, "signature") == 0


async def test_async_invocation_settles_on_the_callback_and_reinvokes_a_failed_one(
    daemon_factory: DaemonFactory,
    gateway: GatewayDouble,
    sns_host: SnsHost,
    ca_file: str,
    key: SigningKey,
    cert_url: str,
) -> None:
    """SNS has its 200 on acceptance; the message settles when the callback arrives, and a
    failed callback (503) is re-invoked through /async-function/ like a failed call."""
    gateway.set_functions([FunctionSpec("orders", topic=TOPIC)])
    gateway.script("orders", statuses=[503, 200], callback_delay=1.0)
    source = {"type": "sns", "topic_arns": [TOPIC], "signing_cert_hosts": [sns_host.host_pattern]}
    daemon = await daemon_factory(async_daemon_config(gateway, {**source, "cert_ca_file": ca_file}))
    envelope = notification(key, cert_url, message="async order")
    status, text, _ = await post(daemon, envelope)
    assert status == 200, text
    await wait_for(lambda: gateway.calls("orders") == 1, what="the first async call")
    acked = 'fastconn_messages_acked_total{source="sns"}'
    assert (await daemon.metrics()).get(acked, 0.0) == 0, "settled before its callback"
    await wait_for(lambda: len(gateway.callbacks) == 2, 20, what="the failed callback, then the good one")

    async def settled() -> bool:
        return (await daemon.metrics()).get(acked, 0.0) == 1

    await wait_for(settled, 10, what="the message settled by the second callback")
    requests = gateway.requests_for("orders")
    assert [r.path for r in requests] == ["/async-function/orders.openfaas-fn"] * 2
    assert {r.headers["X-Message-Id"] for r in requests} == {envelope["MessageId"]}
    assert [c.function_status for c in gateway.callbacks] == [503, 200]
    assert all(c.response_status == 200 for c in gateway.callbacks)


# -- forgeries -------------------------------------------------------------------------------------


def tampered(key: SigningKey, cert_url: str) -> list[tuple[str, dict[str, Any]]]:
    """A genuine notification changed in one signed field each, the signature kept."""
    genuine = notification(key, cert_url, subject="s", message="pay 10")
    cases: list[tuple[str, dict[str, Any]]] = [
        ("Message", {**genuine, "Message": "pay 1000"}),
        ("MessageId", {**genuine, "MessageId": "00000000-0000-0000-0000-000000000000"}),
        ("Subject", {**genuine, "Subject": "t"}),
        ("Subject removed", {k: v for k, v in genuine.items() if k != "Subject"}),
        ("Timestamp", {**genuine, "Timestamp": "2026-12-03T10:00:01.000Z"}),
        ("TopicArn (another allowed topic)", {**genuine, "TopicArn": OTHER_TOPIC}),
        ("Type", {**genuine, "Type": "UnsubscribeConfirmation", "Token": "x", "SubscribeURL": cert_url}),
        ("SignatureVersion 2 -> 1", {**genuine, "SignatureVersion": "1"}),
        ("Signature", {**genuine, "Signature": _flip(genuine["Signature"])}),
    ]
    unsigned = notification(key, cert_url)
    cases.append(("Subject added", {**unsigned, "Subject": "added"}))
    return cases


def _flip(signature: str) -> str:
    raw = bytearray(base64.b64decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


async def test_every_tampered_field_is_refused_403_and_counted(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    cases = tampered(key, cert_url)
    for what, envelope in cases:
        status, text, _ = await post(daemon, envelope)
        assert status == 403, f"tampered {what}: {status} {text}"
    # A confirmation whose SubscribeURL or Token was changed: refused, the link never fetched.
    genuine = confirmation(key, cert_url, sns_host.url("/?Action=ConfirmSubscription&Token=good"))
    for what, envelope in (
        (
            "SubscribeURL",
            {**genuine, "SubscribeURL": sns_host.url("/?Action=ConfirmSubscription&Token=evil")},
        ),
        ("Token", {**genuine, "Token": "evil"}),
    ):
        status, text, _ = await post(daemon, envelope)
        assert status == 403, f"tampered {what}: {status} {text}"
    assert sns_host.confirmations() == []
    # The header is unsigned but must not contradict the signed Type.
    status, _, _ = await post(daemon, notification(key, cert_url), {"x-amz-sns-message-type": "Bogus"})
    assert status == 403
    assert await errors(daemon, "signature") == len(cases) + 2
    assert await errors(daemon, "forged") == 1
    # The genuine one still passes, and only it reaches the function.
    assert (await post(daemon, notification(key, cert_url, message="genuine")))[0] == 200
    await wait_for(lambda: function_double.calls_to("/orders"), what="the genuine message")
    assert [c.body for c in function_double.calls_to("/orders")] == [b"genuine"]
    assert "refused a delivery" in daemon.output() and "Traceback" not in daemon.output()


async def test_a_wrong_certificate_is_refused(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    other = SigningKey()
    sns_host.pems["/SimpleNotificationService-other.pem"] = other.pem
    sns_host.pems["/SimpleNotificationService-junk.pem"] = b"-----BEGIN CERTIFICATE-----\nnot one\n"
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    # Signed by our key, pointing at another (genuine, served) certificate.
    status, text, _ = await post(
        daemon, notification(key, sns_host.url("/SimpleNotificationService-other.pem"))
    )
    assert status == 403 and "does not match" in text
    # Signed by the other key, pointing at ours.
    assert (await post(daemon, notification(other, cert_url)))[0] == 403
    status, text, _ = await post(
        daemon, notification(key, sns_host.url("/SimpleNotificationService-junk.pem"))
    )
    assert status == 403 and "not a PEM certificate" in text
    assert await errors(daemon, "signature") == 2
    assert await errors(daemon, "cert") == 1
    assert function_double.calls == []


async def test_certificate_urls_off_the_allowed_hosts_or_over_http_are_never_fetched(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    path = "/SimpleNotificationService-test.pem"
    refused = [
        sns_host.url(path, scheme="http"),  # plain http
        sns_host.url(path, host="127.0.0.1"),  # same server, a host not in the list
        f"https://localhost.{sns_host.port}.nip.io{path}",  # a longer name containing the host
        f"https://localhost:{sns_host.port + 1}{path}",  # another port
        f"https://user@localhost:{sns_host.port}{path}",  # user info
        sns_host.url("/SimpleNotificationService-test.txt"),  # not a .pem
        "https://sns.us-east-1.amazonaws.com" + path,  # AWS's host, not allowed by this config
    ]
    for url in refused:
        status, text, _ = await post(daemon, notification(key, url))
        assert status == 403, f"{url}: {status} {text}"
    assert await errors(daemon, "cert_url") == len(refused)
    assert sns_host.requests == []
    # A redirect from the allowed host is not followed: the certificate is unavailable (503).
    sns_host.status["/redirect.pem"] = 302
    status, _, headers = await post(daemon, notification(key, sns_host.url("/redirect.pem")))
    assert (status, headers["Retry-After"]) == (503, "1")
    assert sns_host.requests == ["/redirect.pem"]
    assert function_double.calls == []
    # The right URL works.
    assert (await post(daemon, notification(key, cert_url)))[0] == 200


async def test_a_certificate_fetch_failure_answers_503_so_sns_retries(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    path = "/SimpleNotificationService-test.pem"
    sns_host.status[path] = 500
    envelope = notification(key, cert_url)
    status, text, headers = await post(daemon, envelope)
    assert (status, headers["Retry-After"]) == (503, "1"), text
    assert await errors(daemon, "cert_fetch") == 1
    assert await errors(daemon, "signature") == 0
    del sns_host.status[path]

    async def redelivered() -> bool:  # as SNS does: the same envelope again until a 2xx
        return (await post(daemon, envelope))[0] == 200

    await wait_for(redelivered, timeout=15, interval=0.5, what="a 200 once the certificate is reachable")
    await wait_for(lambda: function_double.calls_to("/orders"), what="the delivery")
    assert function_double.calls_to("/orders")[0].headers["X-Message-Id"] == envelope["MessageId"]


# -- subscription confirmation ---------------------------------------------------------------------


async def test_confirmations_are_confirmed_only_for_allowed_topics_and_hosts(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    link = sns_host.url(f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=t1")
    status, text, _ = await post(daemon, confirmation(key, cert_url, link, token="t1"))
    assert status == 200 and "confirmed" in text
    assert sns_host.confirmations() == [f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=t1"]
    # Another account's topic, genuinely signed: refused, not confirmed.
    foreign = sns_host.url(f"/?Action=ConfirmSubscription&TopicArn={FOREIGN_TOPIC}&Token=t2")
    status, text, _ = await post(
        daemon, confirmation(key, cert_url, foreign, topic=FOREIGN_TOPIC, token="t2")
    )
    assert status == 403 and "not in topic_arns" in text
    # An allowed topic whose link points off the SNS hosts: refused, not fetched.
    off_host = sns_host.url("/?Action=ConfirmSubscription&Token=t3", host="127.0.0.1")
    assert (await post(daemon, confirmation(key, cert_url, off_host, token="t3")))[0] == 403
    assert len(sns_host.confirmations()) == 1
    assert await errors(daemon, "topic") == 1
    assert await errors(daemon, "subscribe_url") == 1
    # An unsubscribe confirmation is verified and acknowledged, not dispatched nor fetched.
    status, _, _ = await post(daemon, confirmation(key, cert_url, link, kind="UnsubscribeConfirmation"))
    assert status == 200
    assert len(sns_host.confirmations()) == 1
    # The link failing (SNS's host down): 503, so SNS sends the confirmation again.
    sns_host.status["/"] = 500
    status, _, headers = await post(daemon, confirmation(key, cert_url, link, token="t4"))
    assert (status, headers["Retry-After"]) == (503, "1")
    assert await errors(daemon, "confirm") == 1
    assert function_double.calls == []


async def test_auto_confirm_off_leaves_the_link_alone(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    config = sns_config(function_double, sns_host, ca_file, fast_dispatch, auto_confirm=False)
    daemon = await daemon_factory(config)
    link = sns_host.url("/?Action=ConfirmSubscription&Token=t1")
    status, text, _ = await post(daemon, confirmation(key, cert_url, link))
    assert status == 200 and "not confirmed" in text
    assert sns_host.confirmations() == []
    assert "auto_confirm is off" in daemon.output()


# -- backpressure, raw delivery, malformed bodies --------------------------------------------------


async def test_a_full_dispatcher_answers_503_and_loses_nothing_it_accepted(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    function_double.script("/orders", delay=1.5)
    dispatch = {**fast_dispatch, "max_inflight": 1, "max_inflight_per_function": 1, "batch_size": 1}
    config = sns_config(function_double, sns_host, ca_file, dispatch, accept_timeout=0.5)
    daemon = await daemon_factory(config)
    envelopes = [notification(key, cert_url, message=f"m{i}") for i in range(6)]
    answers = await asyncio.gather(*(post(daemon, e) for e in envelopes))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    assert set(statuses) == {200, 503}
    assert all(h["Retry-After"] == "1" for s, _, h in answers if s == 503)
    accepted = {e["MessageId"] for e, (s, _, _) in zip(envelopes, answers, strict=True) if s == 200}
    await wait_for(
        lambda: {c.headers["X-Message-Id"] for c in function_double.calls_to("/orders")} >= accepted,
        timeout=20,
        what="every accepted message delivered",
    )
    assert await errors(daemon, "busy") == statuses.count(503)
    # Redelivered (as SNS would) once there is room: accepted.
    refused = [e for e, (s, _, _) in zip(envelopes, answers, strict=True) if s == 503]

    async def accepted_again() -> bool:
        return (await post(daemon, refused[0]))[0] == 200

    await wait_for(accepted_again, timeout=20, interval=0.3, what="a refused message accepted later")


async def test_raw_deliveries_need_the_token(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
) -> None:
    raw_headers = {
        "x-amz-sns-message-type": "Notification",
        "x-amz-sns-rawdelivery": "true",
        "x-amz-sns-message-id": "m-raw-1",
        "x-amz-sns-topic-arn": TOPIC,
    }
    # Not enabled: refused whatever it carries.
    plain = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    status, text, _ = await post(plain, b"raw body", raw_headers, query=f"?token={TOKEN}")
    assert status == 403 and "raw_delivery_token" in text
    await plain.stop()

    config = sns_config(function_double, sns_host, ca_file, fast_dispatch, raw_delivery_token=TOKEN)
    daemon = await daemon_factory(config)
    status, _, headers = await post(daemon, b"raw body", raw_headers)
    assert (status, headers["WWW-Authenticate"]) == (401, 'Basic realm="fastconn"')
    assert (await post(daemon, b"raw body", raw_headers, query="?token=wrong-token-0000000"))[0] == 403
    foreign = {**raw_headers, "x-amz-sns-topic-arn": FOREIGN_TOPIC}
    assert (await post(daemon, b"raw body", foreign, query=f"?token={TOKEN}"))[0] == 403
    status, _, headers = await post(daemon, b"raw body", raw_headers, query=f"?token={TOKEN}")
    assert (status, headers["X-Message-Id"]) == (200, "m-raw-1")
    basic = "Basic " + base64.b64encode(f"sns:{TOKEN}".encode()).decode()
    by_basic = {**raw_headers, "x-amz-sns-message-id": "m-raw-2", "Authorization": basic}
    assert (await post(daemon, b"second", by_basic))[0] == 200
    await wait_for(lambda: len(function_double.calls_to("/orders")) == 2, what="both raw deliveries")
    calls = {c.headers["X-Message-Id"]: c for c in function_double.calls_to("/orders")}
    first, second = calls["m-raw-1"], calls["m-raw-2"]  # dispatched concurrently: any order
    assert (first.body, first.headers["X-Message-Id"], first.headers["X-Sns-Arn"]) == (
        b"raw body",
        "m-raw-1",
        TOPIC,
    )
    assert first.headers["X-Sns-Raw-Delivery"] == "true"
    assert second.body == b"second" and "Authorization" not in second.headers
    assert await errors(daemon, "raw_token") == 2
    assert await errors(daemon, "topic") == 1


async def test_bodies_that_are_not_envelopes_get_400_naming_the_problem(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
) -> None:
    daemon = await daemon_factory(sns_config(function_double, sns_host, ca_file, fast_dispatch))
    genuine = notification(key, cert_url)
    cases = [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"Type": "Other"}', "Type 'Other'"),
        (json.dumps({k: v for k, v in genuine.items() if k != "Signature"}).encode(), "Signature is missing"),
        (json.dumps({**genuine, "Message": 5}).encode(), "Message is a int"),
        (b'{"Type": "Notification", "Message": "\\ud800"}', "not valid Unicode"),
        (b"[" * 100000, "not JSON"),
    ]
    for body, reason in cases:
        status, text, _ = await post(daemon, body)
        assert (status, reason in text) == (400, True), (body[:40], text)
    assert await errors(daemon, "malformed") == len(cases)
    assert "Traceback" not in daemon.output()
    assert sns_host.requests == []


# -- moto end to end -------------------------------------------------------------------------------


async def test_moto_subscribe_publish_end_to_end(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    moto_server: MotoServer,
    ca: trustme.CA,
    ca_file: str,
    fast_dispatch: dict[str, Any],
) -> None:
    """The daemon subscribes itself with ``Subscribe`` against moto; moto posts each publish to
    it, signed by moto (SignatureVersion 2, moto's own key) with ``SigningCertURL`` on
    ``sns.us-east-1.amazonaws.com`` — the default ``signing_cert_hosts`` allow it. The daemon
    fetches that certificate through ``HTTPS_PROXY``, which lands on moto (see MotoFront).

    moto's signatures are only partly genuine: it signs Message, MessageId, Timestamp, TopicArn
    and Type but leaves out the Subject, which the documented canonical string includes. So a
    publish without a subject verifies and is dispatched, and a publish with one must be (and
    is) refused as forged — verification rejects moto's wrong signature with moto's host allowed.
    moto confirms HTTP subscriptions itself (no SubscriptionConfirmation is posted) and ignores
    RawMessageDelivery for HTTP endpoints; those paths are covered by the tests above.
    """
    session = get_session()
    async with session.create_client("sns", region_name=REGION, endpoint_url=moto_server.endpoint_url) as sns:
        topic_arn = (await sns.create_topic(Name="orders"))["TopicArn"]
        front = await MotoFront(ca, moto_server.endpoint_url).start()
        try:
            daemon_listen = f"127.0.0.1:{free_port()}"
            config = {
                "server": {"listen": daemon_listen},
                "dispatch": dict(fast_dispatch),
                "functions": [
                    {"name": "orders", "url": function_double.url("/orders"), "topics": [topic_arn]}
                ],
                "sources": [
                    {
                        "type": "sns",
                        "cert_ca_file": ca_file,
                        "subscribe": {
                            "topic_arn": topic_arn,
                            "endpoint": f"http://{daemon_listen}/sns",
                            "endpoint_url": moto_server.endpoint_url,
                        },
                    }
                ],
            }
            env = {"HTTPS_PROXY": front.proxy_url, "NO_PROXY": "127.0.0.1,localhost"}
            daemon = await daemon_factory(config, env=env)

            async def subscribed() -> bool:
                listed = await sns.list_subscriptions_by_topic(TopicArn=topic_arn)
                return any(s["Endpoint"] == f"http://{daemon_listen}/sns" for s in listed["Subscriptions"])

            await wait_for(subscribed, timeout=20, what="the daemon's Subscribe at moto")
            published = await sns.publish(TopicArn=topic_arn, Message='{"order": 7}')
            await wait_for(lambda: function_double.calls_to("/orders"), timeout=20, what="moto's delivery")
            [call] = function_double.calls_to("/orders")
            assert call.body == b'{"order": 7}'
            assert call.headers["X-Message-Id"] == published["MessageId"]
            assert call.headers["X-Topic"] == topic_arn
            assert front.tunnels == ["sns.us-east-1.amazonaws.com:443"]
            assert len(front.fetched) == 1 and front.fetched[0].endswith(".pem")

            await sns.publish(TopicArn=topic_arn, Message="with a subject", Subject="hello")
            await wait_for(
                lambda: errors(daemon, "signature"), timeout=20, what="moto's subject-less signature refused"
            )
            assert len(function_double.calls_to("/orders")) == 1
        finally:
            await front.stop()


async def test_moto_s3_uploads_through_sns_reach_the_function_one_call_per_record(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    moto_server: MotoServer,
    ca: trustme.CA,
    ca_file: str,
    fast_dispatch: dict[str, Any],
) -> None:
    """S3 → SNS → daemon: moto's bucket notifies an SNS topic (a TopicConfiguration) that the
    daemon subscribed itself to; moto publishes each upload's notification (and the
    ``s3:TestEvent`` of saving the configuration, which decodes to nothing) and posts it,
    signed, to the daemon. With ``decode = "s3"`` every upload is one call, routed by bucket
    and event, the key decoded. Certificates are fetched as in the test above (MotoFront)."""
    session = get_session()
    endpoint = moto_server.endpoint_url
    async with (
        session.create_client("sns", region_name=REGION, endpoint_url=endpoint) as sns,
        session.create_client("s3", region_name=REGION, endpoint_url=endpoint) as s3,
    ):
        topic_arn = (await sns.create_topic(Name="uploads"))["TopicArn"]
        bucket = "img.sns-fastconn-test"
        front = await MotoFront(ca, endpoint).start()
        try:
            daemon_listen = f"127.0.0.1:{free_port()}"
            sns_endpoint = f"http://{daemon_listen}/sns"
            config = {
                "server": {"listen": daemon_listen},
                "dispatch": dict(fast_dispatch),
                "functions": [
                    {"name": "images", "url": function_double.url("/images"), "topics": [f"s3/{bucket}/#"]}
                ],
                "sources": [
                    {
                        "type": "sns",
                        "decode": "s3",
                        "cert_ca_file": ca_file,
                        "subscribe": {
                            "topic_arn": topic_arn,
                            "endpoint": sns_endpoint,
                            "endpoint_url": endpoint,
                        },
                    }
                ],
            }
            env = {"HTTPS_PROXY": front.proxy_url, "NO_PROXY": "127.0.0.1,localhost"}
            daemon = await daemon_factory(config, env=env)

            async def subscribed() -> bool:
                listed = await sns.list_subscriptions_by_topic(TopicArn=topic_arn)
                return any(s["Endpoint"] == sns_endpoint for s in listed["Subscriptions"])

            await wait_for(subscribed, timeout=20, what="the daemon's Subscribe at moto")
            await s3.create_bucket(Bucket=bucket)
            await s3.put_bucket_notification_configuration(
                Bucket=bucket,
                NotificationConfiguration={
                    "TopicConfigurations": [{"TopicArn": topic_arn, "Events": ["s3:ObjectCreated:*"]}]
                },
            )
            keys = ["a.jpg", "with space/b c.png"]
            for key in keys:
                await s3.put_object(Bucket=bucket, Key=key, Body=b"x" * 5)
            await wait_for(lambda: len(function_double.calls) == 2, timeout=20, what="one call per upload")
            calls = sorted(function_double.calls, key=lambda c: c.headers["X-S3-Key"])
            assert [c.headers["X-S3-Key"] for c in calls] == keys
            for call in calls:
                assert call.headers["X-Topic"] == f"s3/{bucket}/ObjectCreated/Put"
                assert call.headers["X-S3-Event"] == "ObjectCreated:Put"
                assert call.headers["X-S3-Size"] == "5"
                assert call.headers["X-Sns-Arn"] == topic_arn
                assert json.loads(call.body)["s3"]["bucket"]["name"] == bucket
            assert len({c.headers["X-Message-Id"] for c in calls}) == 2
            # Nothing refused, the s3:TestEvent included (no records: answered, nothing to call).
            assert await errors(daemon, "signature") == 0
            assert await errors(daemon, "decode") == 0
        finally:
            await front.stop()


async def test_a_failing_subscribe_is_retried_while_the_endpoint_serves(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    sns_host: SnsHost,
    ca_file: str,
    fast_dispatch: dict[str, Any],
    key: SigningKey,
    cert_url: str,
    aws_env: dict[str, str],
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}"
    subscribe = {"topic_arn": TOPIC, "endpoint": "https://hooks.example/sns", "endpoint_url": unreachable}
    config = sns_config(function_double, sns_host, ca_file, fast_dispatch, subscribe=subscribe)
    daemon = await daemon_factory(config)
    await wait_for(
        lambda: errors(daemon, "subscribe"), timeout=30, interval=0.2, what="a failed Subscribe counted"
    )
    assert "Subscribe(" in daemon.output() and "retrying in" in daemon.output()
    assert (await post(daemon, notification(key, cert_url)))[0] == 200


# -- the decode hook, in process (the route's plain-data interface) --------------------------------


def _lines(notification: Notification) -> list[Message]:
    """A decoder standing in for ``decode = "s3"``: one message per line of the notification."""
    lines = notification.message.split(b"\n")
    if b"" in lines:
        raise ValueError("an empty line is not a record")
    return [
        Message(notification.topic_arn, line, message_id=f"{notification.message_id}:{i}")
        for i, line in enumerate(lines)
    ]


async def test_a_decoder_can_turn_one_notification_into_several_messages(
    function_double: FunctionDouble, sns_host: SnsHost, ca_file: str, key: SigningKey, cert_url: str
) -> None:
    config = SnsConfig(topic_arns=(TOPIC,), signing_cert_hosts=(sns_host.host_pattern,), cert_ca_file=ca_file)
    source = SnsSource(config, decode=_lines)
    functions = [FunctionTarget("orders", (TOPIC,), function_double.url("/orders"))]
    async with running_source(source, functions):

        async def deliver(envelope: dict[str, Any]) -> HttpResponse:
            headers = tuple(sns_headers(envelope).items())
            body = json.dumps(envelope).encode()
            return await source.handle(HttpRequest("POST", "/sns", (), headers, body, "127.0.0.1:1"))

        envelope = notification(key, cert_url, message="a\nb\nc")
        answer = await deliver(envelope)
        assert answer.status == 200, answer.body
        await wait_for(lambda: len(function_double.calls_to("/orders")) == 3, what="three records")
        ids = sorted(c.headers["X-Message-Id"] for c in function_double.calls_to("/orders"))
        assert ids == [f"{envelope['MessageId']}:{i}" for i in range(3)]
        # A notification the decoder cannot take: 400 (SNS would only send it again).
        answer = await deliver(notification(key, cert_url, message="a\n\nb"))
        assert answer.status == 400 and b"empty line" in answer.body
        assert len(function_double.calls_to("/orders")) == 3
