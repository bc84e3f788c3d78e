"""End to end: ``python -m fastconn run`` as a subprocess, the OpenFaaS gateway double, real HTTP.

Messages go in through the webhook source (``POST /webhook/<topic>`` on the admin server); what
reaches the functions is read from the gateway double's recorded requests, and what the daemon
thinks happened from its ``/metrics``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import itertools
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from fastconn import __version__
from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from gateway_double import FunctionSpec, GatewayDouble, RecordedRequest

if TYPE_CHECKING:
    from conftest import DaemonFactory

NS = "openfaas-fn"
"""Functions listed from the gateway are named ``<fn>.<namespace>``; the double's default namespace."""


# ---------------------------------------------------------------------------- helpers


def gw_config(
    gateway: GatewayDouble,
    fast_dispatch: Mapping[str, Any],
    *,
    dispatch: Mapping[str, Any] | None = None,
    gateway_section: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A daemon config against the double: fast timings, one webhook source."""
    return {
        "gateway": {
            "url": gateway.url,
            "rebuild_interval": "200ms",
            "listing_timeout": "1s",
            "upstream_timeout": "5s",
            "startup_wait": "5s",
            **(gateway_section or {}),
        },
        "dispatch": {"max_attempts": 3, **fast_dispatch, **(dispatch or {})},
        "sources": [{"type": "webhook", **(source or {})}],
        **top,
    }


class Reply:
    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:200]!r})"


async def post(
    http: aiohttp.ClientSession,
    daemon: DaemonProcess,
    topic: str,
    body: bytes = b"payload",
    *,
    wait: bool = False,
    headers: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Reply:
    url = f"{daemon.url}/webhook/{topic}" + ("?wait=true" if wait else "")
    async with http.post(url, data=body, headers=headers, **kwargs) as r:
        return Reply(r.status, r.headers, await r.read())


async def accepted(http: aiohttp.ClientSession, daemon: DaemonProcess, topic: str, body: bytes = b"x") -> str:
    """Posts one message that must be accepted; returns its message id."""
    reply = await post(http, daemon, topic, body)
    assert reply.status == 202, reply
    return reply.headers["X-Message-Id"]


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """One sample, 0 when absent (a counter that never moved may not be exported)."""
    if labels:
        name += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return samples.get(name, 0.0)


async def settled(
    daemon: DaemonProcess,
    count: int,
    source: str = "webhook",
    timeout: float = 10.0,
) -> dict[str, float]:
    """Waits until ``count`` messages of ``source`` were acked or failed; returns the metrics then."""
    samples: dict[str, float] = {}

    async def done() -> bool:
        nonlocal samples
        samples = await daemon.metrics()
        total = metric(samples, "fastconn_messages_acked_total", source=source) + metric(
            samples, "fastconn_messages_failed_total", source=source
        )
        assert total <= count, f"more messages settled than sent: {total} > {count}"
        return total == count

    await wait_for(done, timeout, 0.05, f"{count} settled message(s)")
    return samples


def names(requests: list[RecordedRequest]) -> list[str]:
    return sorted(r.function or "" for r in requests if r.kind == "sync")


async def exited(daemon: DaemonProcess, timeout: float) -> int:
    """Waits (without signalling it) for the daemon to exit; returns its exit code."""
    process = daemon.process
    assert process is not None
    await wait_for(lambda: process.poll() is not None, timeout, what="the daemon to exit")
    return int(process.returncode)


async def readyz(http: aiohttp.ClientSession, daemon: DaemonProcess) -> tuple[int, str]:
    async with http.get(daemon.url + "/readyz") as r:
        return r.status, await r.text()


# ---------------------------------------------------------------------------- routing


async def test_routing_exact_wildcards_fan_out_and_namespaces(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions(
        [
            FunctionSpec("exact", topic="orders.created"),
            FunctionSpec("star", topic="orders.*"),
            FunctionSpec("rest", topic="orders.>"),
            FunctionSpec("mqtt", topic="sensors/+/temp"),
            FunctionSpec("hash", topic="logs/#"),
            FunctionSpec("fan1", topic="events"),
            FunctionSpec("fan2", topic="events, audit"),
            FunctionSpec("billing", namespace="dev", topic="invoices"),
            FunctionSpec("quiet"),  # no topic annotation: never subscribed
            FunctionSpec("pinned", namespace="dev"),  # subscribed by a static [[functions]] entry
        ]
    )
    static = [{"name": "pinned", "namespace": "dev", "topics": ["invoices", "pinned.only"]}]
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, functions=static))
    expected = {
        "orders.created": ["exact", "rest", "star"],
        "orders.updated": ["rest", "star"],
        "orders.eu.created": ["rest"],
        "sensors/kitchen/temp": ["mqtt"],
        "sensors/kitchen/humidity": [],
        "logs/app/error": ["hash"],
        "events": ["fan1", "fan2"],
        "audit": ["fan2"],
        "invoices": ["billing.dev", "pinned.dev"],
        "pinned.only": ["pinned.dev"],
        "nobody.listens": [],
    }
    payload = bytes(range(256))  # delivered untouched
    for topic, subscribers in expected.items():
        gateway.reset_requests()
        reply = await post(http, daemon, topic, payload, wait=True)
        targets = [n if "." in n else f"{n}.{NS}" for n in subscribers]
        if not targets:
            assert reply.status == 404, (topic, reply)
        else:
            assert reply.status == 200, (topic, reply)
            assert reply.body == payload
            assert reply.headers["X-Function-Name"] in targets
        # ?wait=true answers once every target is done, so the recorded calls are complete.
        assert names(gateway.requests) == sorted(targets), topic
        for request in (r for r in gateway.requests if r.kind == "sync"):
            assert request.path == f"/function/{request.function}"
            assert request.body == payload
            assert request.headers["X-Topic"] == topic
            assert request.namespace == ("dev" if topic in ("invoices", "pinned.only") else NS)
    samples = await daemon.metrics()
    assert metric(samples, "fastconn_topic_map_functions") == 9
    assert metric(samples, "fastconn_invocations_total", function="billing.dev", status="200") == 1


async def test_topic_map_is_rebuilt_when_functions_change(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("a", topic="t1")])
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch))
    assert (await post(http, daemon, "t1", wait=True)).headers["X-Function-Name"] == f"a.{NS}"
    assert (await post(http, daemon, "t2", wait=True)).status == 404

    # a moves to t2, b takes t1 and a new topic in another namespace appears.
    gateway.set_functions(
        [FunctionSpec("a", topic="t2"), FunctionSpec("b", topic="t1"), FunctionSpec("c", "x", "t3")]
    )

    async def rebuilt() -> bool:
        return metric(await daemon.metrics(), "fastconn_topic_map_functions") == 3

    await wait_for(rebuilt, 5, what="the rebuilt topic map")
    gateway.reset_requests()
    for topic, function in (("t1", f"b.{NS}"), ("t2", f"a.{NS}"), ("t3", "c.x")):
        reply = await post(http, daemon, topic, wait=True)
        assert (reply.status, reply.headers.get("X-Function-Name")) == (200, function), topic
    assert names(gateway.requests) == ["a." + NS, "b." + NS, "c.x"]

    # Every function gone: an empty table is a valid table (messages are unrouted, not queued).
    gateway.set_functions([])

    async def emptied() -> bool:
        return metric(await daemon.metrics(), "fastconn_topic_map_functions") == 0

    await wait_for(emptied, 5, what="the emptied topic map")
    assert (await post(http, daemon, "t1", wait=True)).status == 404
    assert (await readyz(http, daemon))[0] == 200


# ---------------------------------------------------------------------------- gateway outages


async def test_gateway_down_at_start_webhook_gets_503_at_once_then_flows(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("early", topic="boot")])
    gateway.set_down()  # /system/* answers 500
    daemon = await daemon_factory(
        gw_config(gateway, fast_dispatch, gateway_section={"startup_wait": "20s"}), wait="health"
    )
    status, text = await readyz(http, daemon)
    assert status == 503 and "topic map not loaded" in text, text

    # A webhook request arriving now is answered at once (the sender retries), not held for
    # startup_wait: no connection waits on a table that may be minutes away.
    await wait_for(lambda: len([r for r in gateway.requests if r.kind == "system"]) >= 2, 5, what="relisting")
    started = time.monotonic()
    reply = await post(http, daemon, "boot", b"early bird", wait=True)
    assert time.monotonic() - started < 1.0
    assert (reply.status, reply.headers["Retry-After"]) == (503, "1"), reply
    assert b"topic map not loaded" in reply.body
    assert gateway.calls("early") == 0
    assert daemon.process is not None and daemon.process.poll() is None, "the daemon must not exit"

    gateway.set_down(False)

    async def ready() -> bool:
        return (await readyz(http, daemon))[0] == 200

    await wait_for(ready, 10, what="/readyz after the gateway recovered")
    reply = await post(http, daemon, "boot", b"early bird", wait=True)
    assert (reply.status, reply.body) == (200, b"early bird")
    assert gateway.calls("early") == 1
    samples = await daemon.metrics()
    assert metric(samples, "fastconn_topic_map_failures_total") >= 1


async def test_gateway_unreachable_at_start_503_at_once_then_recovery(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("late", topic="boot")])
    port = gateway.port
    await gateway.stop()  # nothing listens: connection refused
    daemon = await daemon_factory(
        gw_config(gateway, fast_dispatch, gateway_section={"startup_wait": "20s"}), wait="health"
    )
    assert (await readyz(http, daemon))[0] == 503

    started = time.monotonic()
    reply = await post(http, daemon, "boot")
    waited = time.monotonic() - started
    assert reply.status == 503, reply
    assert reply.headers["Retry-After"] == "1"
    assert b"topic map not loaded" in reply.body
    assert waited < 1.0, f"no topic map: a webhook request is answered at once, waited {waited:.2f}s"

    await gateway.start(port)  # the gateway comes up on the same address

    async def ready() -> bool:
        return (await readyz(http, daemon))[0] == 200

    await wait_for(ready, 10, what="/readyz after the gateway came up")
    reply = await post(http, daemon, "boot", b"now", wait=True)
    assert (reply.status, reply.body) == (200, b"now")
    assert gateway.calls("late") == 1
    assert daemon.process is not None and daemon.process.poll() is None


async def test_gateway_down_during_run_keeps_the_last_table(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("keep", topic="t")])
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch))
    await accepted(http, daemon, "t")
    await settled(daemon, 1)

    gateway.set_down()
    # While listings fail the function list changes: the daemon cannot see it and keeps its table.
    gateway.set_functions([FunctionSpec("keep", topic="t"), FunctionSpec("new", topic="t")])

    async def failing() -> bool:
        return metric(await daemon.metrics(), "fastconn_topic_map_failures_total") >= 2

    await wait_for(failing, 5, what="failed listings to be counted")
    reply = await post(http, daemon, "t", b"during outage", wait=True)
    assert (reply.status, reply.body) == (200, b"during outage")
    assert (await readyz(http, daemon))[0] == 200, "a failed relisting does not make the daemon unready"
    assert gateway.calls("keep") == 2 and gateway.calls("new") == 0
    assert metric(await daemon.metrics(), "fastconn_topic_map_functions") == 1

    gateway.set_down(False)

    async def recovered() -> bool:
        return metric(await daemon.metrics(), "fastconn_topic_map_functions") == 2

    await wait_for(recovered, 5, what="the table after recovery")
    await accepted(http, daemon, "t")
    await settled(daemon, 3)
    assert gateway.calls("keep") == 3 and gateway.calls("new") == 1
    assert daemon.process is not None and daemon.process.poll() is None


# ---------------------------------------------------------------------------- retries and timeouts

RETRYABLE = (408, 429, 500, 502, 503, 504)
FINAL = (400, 404)


async def test_retries_on_each_retryable_status_and_none_on_400_404(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions(
        [FunctionSpec(f"f{code}", topic=f"s{code}") for code in RETRYABLE + FINAL]
        + [FunctionSpec("always503", topic="exhaust")]
    )
    for code in RETRYABLE:
        gateway.script(f"f{code}", statuses=[code, code, 200])  # fails twice, then succeeds
    for code in FINAL:
        gateway.script(f"f{code}", statuses=[code, 200], body="nope")  # would succeed if retried
    gateway.script("always503", statuses=503)
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, dispatch={"max_attempts": 3}))

    replies = await asyncio.gather(
        *(post(http, daemon, f"s{code}", str(code).encode(), wait=True) for code in RETRYABLE + FINAL),
        post(http, daemon, "exhaust", wait=True),
    )
    by_code = dict(zip(RETRYABLE + FINAL + (0,), replies, strict=True))
    for code in RETRYABLE:
        reply = by_code[code]
        assert (reply.status, reply.body) == (200, str(code).encode()), code
        requests = gateway.requests_for(f"f{code}")
        assert len(requests) == 3, f"{code}: {len(requests)} attempts"
        assert [r.headers["X-Delivery-Attempt"] for r in requests] == ["1", "2", "3"]
        assert len({r.headers["X-Message-Id"] for r in requests}) == 1
        assert requests[0].headers["X-Message-Id"] == reply.headers["X-Message-Id"]
    for code in FINAL:
        assert by_code[code].status == code
        assert by_code[code].body == b"nope"
        assert len(gateway.requests_for(f"f{code}")) == 1, f"{code} must not be retried"
    assert by_code[0].status == 503
    assert len(gateway.requests_for("always503")) == 3, "max_attempts bounds the retries"

    samples = await settled(daemon, len(replies))
    for code in RETRYABLE:
        fn = f"f{code}.{NS}"
        assert metric(samples, "fastconn_retries_total", function=fn) == 2, code
        assert metric(samples, "fastconn_invocations_total", function=fn, status="200") == 1
        assert metric(samples, "fastconn_invocations_total", function=fn, status=str(code)) == 0
    for code in FINAL:
        fn = f"f{code}.{NS}"
        assert metric(samples, "fastconn_retries_total", function=fn) == 0
        assert metric(samples, "fastconn_invocations_total", function=fn, status=str(code)) == 1
    assert metric(samples, "fastconn_invocations_total", function=f"always503.{NS}", status="503") == 1
    assert metric(samples, "fastconn_retries_total", function=f"always503.{NS}") == 2
    assert metric(samples, "fastconn_messages_acked_total", source="webhook") == len(RETRYABLE)
    assert metric(samples, "fastconn_messages_failed_total", source="webhook") == len(FINAL) + 1


async def test_retry_after_is_honoured_and_capped_by_backoff_max(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions(
        [
            FunctionSpec("busy", topic="a"),
            FunctionSpec("limited", topic="b"),
            FunctionSpec("greedy", topic="c"),
            FunctionSpec("plain", topic="d"),
            FunctionSpec("dated", topic="e"),
            FunctionSpec("other", topic="f"),
        ]
    )
    gateway.script("busy", statuses=[503, 200], headers=[{"Retry-After": "1"}, {}])
    gateway.script("limited", statuses=[429, 200], headers=[{"Retry-After": "1"}, {}])
    gateway.script("greedy", statuses=[503, 200], headers=[{"Retry-After": "120"}, {}])
    gateway.script("plain", statuses=[503, 503, 200])  # no Retry-After: 10ms backoff
    # Retry-After counts on 429 and 503 only.
    gateway.script("other", statuses=[500, 200], headers=[{"Retry-After": "1"}, {}])
    daemon = await daemon_factory(
        gw_config(gateway, fast_dispatch, dispatch={"backoff_initial": "10ms", "backoff_max": "2s"})
    )
    # The HTTP-date form, 2 s ahead (whole seconds: the wait is about 1 to 2 s).
    gateway.script(
        "dated",
        statuses=[503, 200],
        headers=[{"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)}, {}],
    )
    replies = await asyncio.gather(*(post(http, daemon, t, wait=True) for t in "abcdef"))
    assert [r.status for r in replies] == [200] * 6

    def gaps(name: str) -> list[float]:
        times = [r.received for r in gateway.requests_for(name)]
        return [b - a for a, b in itertools.pairwise(times)]

    for name in ("busy", "limited"):
        [gap] = gaps(name)
        assert 0.95 <= gap < 1.9, f"{name}: Retry-After 1 but retried after {gap:.3f}s"
    [gap] = gaps("greedy")
    assert 1.95 <= gap < 3.0, f"Retry-After 120 must be capped at backoff_max 2s, waited {gap:.3f}s"
    assert all(g < 0.5 for g in gaps("plain")), gaps("plain")
    assert all(g < 0.5 for g in gaps("other")), gaps("other")
    [gap] = gaps("dated")
    assert 0.5 <= gap < 2.6, f"Retry-After as an HTTP date 2s ahead, waited {gap:.3f}s"


async def test_timeouts_are_retried_and_reported(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions(
        [
            FunctionSpec("slow", topic="slow"),
            # Its own (longer) timeout, from the fastconn.timeout annotation.
            FunctionSpec("patient", topic="patient", annotations={"fastconn.timeout": "3s"}),
        ]
    )
    gateway.script("slow", delay=2.0)
    gateway.script("patient", delay=0.6)
    daemon = await daemon_factory(
        gw_config(
            gateway,
            fast_dispatch,
            gateway_section={"upstream_timeout": "300ms"},
            dispatch={"max_attempts": 2},
        )
    )
    started = time.monotonic()
    slow, patient = await asyncio.gather(
        post(http, daemon, "slow", wait=True), post(http, daemon, "patient", wait=True)
    )
    assert slow.status == 502 and slow.headers["X-Function-Status"] == "timeout", slow
    assert time.monotonic() - started < 2.0, "the timeout cut the 2s calls short"
    assert (patient.status, patient.headers["X-Function-Status"]) == (200, "200")
    assert len(gateway.requests_for("slow")) == 2, "a timeout is retried up to max_attempts"
    assert len(gateway.requests_for("patient")) == 1
    samples = await settled(daemon, 2)
    assert metric(samples, "fastconn_invocations_total", function=f"slow.{NS}", status="timeout") == 1
    assert metric(samples, "fastconn_retries_total", function=f"slow.{NS}") == 1
    assert metric(samples, "fastconn_invocations_total", function=f"patient.{NS}", status="200") == 1
    assert metric(samples, "fastconn_messages_failed_total", source="webhook") == 1


# ---------------------------------------------------------------------------- auth and headers


async def test_basic_auth_on_listings_and_invocations(
    gateway: GatewayDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
    fast_dispatch: dict,
    function_double: FunctionDouble,
    secrets_dir: Callable[[str, str], Path],
) -> None:
    gateway.credentials = ("admin", "s3cr3t")
    gateway.set_functions([FunctionSpec("secure", topic="t")])
    config = gw_config(
        gateway,
        fast_dispatch,
        gateway_section={"basic_auth": True, "secret_mount_path": str(secrets_dir("admin", "s3cr3t"))},
        functions=[{"name": "outside", "url": function_double.url("/outside"), "topics": ["t"]}],
    )
    daemon = await daemon_factory(config)  # ready means the authenticated listing worked
    reply = await post(http, daemon, "t", b"hello", wait=True)
    assert reply.status == 200
    await settled(daemon, 1)

    expected = "Basic " + base64.b64encode(b"admin:s3cr3t").decode()
    system = [r for r in gateway.requests if r.kind == "system"]
    assert system and all(r.headers.get("Authorization") == expected for r in system)
    [call] = gateway.requests_for("secure")
    assert call.headers["Authorization"] == expected, "calls through the gateway carry the credentials"
    [outside] = function_double.calls_to("/outside")
    assert "Authorization" not in outside.headers, "gateway credentials never go to static URLs"
    assert outside.body == b"hello"


async def test_wrong_basic_auth_credentials_keep_the_daemon_unready(
    gateway: GatewayDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
    fast_dispatch: dict,
    secrets_dir: Callable[[str, str], Path],
) -> None:
    gateway.credentials = ("admin", "s3cr3t")
    gateway.set_functions([FunctionSpec("secure", topic="t")])
    config = gw_config(
        gateway,
        fast_dispatch,
        gateway_section={"basic_auth": True, "secret_mount_path": str(secrets_dir("admin", "wrong"))},
    )
    daemon = await daemon_factory(config, wait="health")

    async def refused() -> bool:
        status, text = await readyz(http, daemon)
        return status == 503 and "401" in text

    await wait_for(refused, 5, what="/readyz to report the 401")
    assert gateway.calls("secure") == 0


async def test_headers_sent_to_functions(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("h", topic="orders.created")])
    gateway.script("h", statuses=[500, 200])
    daemon = await daemon_factory(
        gw_config(gateway, fast_dispatch, dispatch={"content_type": "application/json"})
    )

    body = b'{"id": 1}'
    reply = await post(
        http,
        daemon,
        "orders.created",
        body,
        headers={"X-Custom": "kept", "X-GitHub-Event": "push", "Authorization": "Bearer sender-secret"},
        skip_auto_headers=["Content-Type"],
    )
    assert reply.status == 202
    message_id = reply.headers["X-Message-Id"]
    samples = await settled(daemon, 1)
    assert metric(samples, "fastconn_retries_total", function=f"h.{NS}") == 1

    first, second = gateway.requests_for("h")
    for attempt, request in enumerate((first, second), start=1):
        h = request.headers
        assert request.method == "POST" and request.path == f"/function/h.{NS}"
        assert request.body == body
        assert h["X-Topic"] == "orders.created"
        assert h["X-Connector"] == "fastconn"
        assert h["User-Agent"] == f"fastconn/{__version__}"
        assert h["X-Delivery-Attempt"] == str(attempt)
        assert h["X-Message-Id"] == message_id, "the idempotency key stays the same across retries"
        assert h["Content-Type"] == "application/json", "content_type from [dispatch]"
        assert h["X-Custom"] == "kept" and h["X-GitHub-Event"] == "push", "message headers pass through"
        assert "Authorization" not in h, "the sender's credentials are not forwarded"
        assert h["Host"] == f"127.0.0.1:{gateway.port}"

    # A sender's own Content-Type is the message's, and wins over the configured default.
    gateway.reset_requests()
    reply = await post(http, daemon, "orders.created", b"a,b", headers={"Content-Type": "text/csv"})
    assert reply.status == 202
    await settled(daemon, 2)
    assert [r.headers["Content-Type"] for r in gateway.requests_for("h")] == ["text/csv"]
    assert gateway.requests_for("h")[0].headers["X-Delivery-Attempt"] == "1"


# ---------------------------------------------------------------------------- the webhook source


async def test_webhook_bearer_token(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("hook", topic="gh")])
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source={"auth_token": "t0ken"}))

    missing = await post(http, daemon, "gh")
    assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    for wrong in ("Bearer nope", "t0ken", "Basic dDBrZW4=", "Bearer t0ken2"):
        assert (await post(http, daemon, "gh", headers={"Authorization": wrong})).status == 401, wrong
    ok = await post(http, daemon, "gh", b"authorised", headers={"Authorization": "Bearer t0ken"})
    assert ok.status == 202
    await settled(daemon, 1)
    [call] = gateway.requests_for("hook")
    assert call.body == b"authorised" and "Authorization" not in call.headers
    assert (
        metric(await daemon.metrics(), "fastconn_messages_received_total", source="webhook", topic="gh") == 1
    )


async def test_webhook_bodies_up_to_max_body_bytes_beyond_aiohttps_default(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("big", topic="blobs")])
    limit = 3 * 1024 * 1024
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source={"max_body_bytes": limit}))
    body = b"b" * (2 * 1024 * 1024)  # over aiohttp's 1 MiB client_max_size
    assert (await post(http, daemon, "blobs", body)).status == 202
    await settled(daemon, 1)
    assert gateway.requests_for("big")[0].body == body
    too_big = await post(http, daemon, "blobs", b"b" * (limit + 1))
    assert too_big.status == 413 and b"max_body_bytes" in too_big.body


async def test_webhook_hmac_signature(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("hook", topic="gh")])
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source={"hmac_secret": "shh"}))
    body = b'{"action": "opened"}'
    good = "sha256=" + hmac.new(b"shh", body, hashlib.sha256).hexdigest()
    other = "sha256=" + hmac.new(b"other", body, hashlib.sha256).hexdigest()
    tampered = "sha256=" + hmac.new(b"shh", body + b" ", hashlib.sha256).hexdigest()

    assert (await post(http, daemon, "gh", body)).status == 401
    for wrong in (other, tampered, good.removeprefix("sha256="), good.upper()):
        reply = await post(http, daemon, "gh", body, headers={"X-Hub-Signature-256": wrong})
        assert reply.status == 401, wrong
        assert b"X-Hub-Signature-256" in reply.body
    reply = await post(http, daemon, "gh", body, headers={"X-Hub-Signature-256": good})
    assert reply.status == 202, reply
    await settled(daemon, 1)
    [call] = gateway.requests_for("hook")
    assert call.body == body
    assert "X-Hub-Signature-256" not in call.headers


async def test_webhook_stripe_and_gitlab_signatures(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    """The configurable schemes on the live daemon: Stripe's timestamped ``v1=`` (a replay an
    hour old is refused even with a valid HMAC) and GitLab's plain token; neither header reaches
    the function."""
    gateway.set_functions([FunctionSpec("pay", topic="stripe")])
    stripe = {
        "hmac_secret": "whsec_x",
        "signature_header": "Stripe-Signature",
        "signature_scheme": "stripe",
        "signature_prefix": "v1=",
    }
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source=stripe))
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'

    def signed(at: int) -> dict[str, str]:
        digest = hmac.new(b"whsec_x", f"{at}.".encode() + body, hashlib.sha256).hexdigest()
        return {"Stripe-Signature": f"t={at},v1={digest}"}

    replay = await post(http, daemon, "stripe", body, headers=signed(int(time.time()) - 3600))
    assert replay.status == 401 and b"tolerance" in replay.body, replay
    tampered = await post(http, daemon, "stripe", body + b" ", headers=signed(int(time.time())))
    assert tampered.status == 401, tampered
    assert (await post(http, daemon, "stripe", body, headers=signed(int(time.time())))).status == 202
    await settled(daemon, 1)
    [call] = gateway.requests_for("pay")
    assert call.body == body and "Stripe-Signature" not in call.headers
    await daemon.stop()

    gateway.set_functions([FunctionSpec("ci", topic="gitlab")])
    gitlab = {"hmac_secret": "tok", "signature_header": "X-Gitlab-Token", "signature_scheme": "token"}
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source=gitlab))
    assert (await post(http, daemon, "gitlab", b"{}", headers={"X-Gitlab-Token": "nope"})).status == 401
    assert (await post(http, daemon, "gitlab", b"{}", headers={"X-Gitlab-Token": "tok"})).status == 202
    await settled(daemon, 1)
    [call] = gateway.requests_for("ci")
    assert "X-Gitlab-Token" not in call.headers


def _stripe_header(secret: bytes, body: bytes, at: int, *extra_v1: str) -> dict[str, str]:
    digest = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    entries = [f"t={at}", *(f"v1={v}" for v in extra_v1), f"v1={digest}", "v0=ignored"]
    return {"Stripe-Signature": ",".join(entries)}


def _python_requests(samples: Mapping[str, float], route: str = "webhook") -> float:
    return metric(samples, "fastconn_ingress_python_requests_total", route=route)


async def test_every_signature_scheme_is_checked_by_the_core_without_python(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    """GitHub (``sha256=<hex>``), GitLab (token) and Stripe (timestamped ``v1=``: valid, several
    ``v1`` values, expired, wrong secret) on the live daemon: each answered as the scheme says,
    and no request of the webhook route reaches a Python handler (the ingress counts every one
    it hands to Python, by route; /metrics itself shows the counter counts)."""
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'
    now = int(time.time())
    github_good = "sha256=" + hmac.new(b"gh", body, hashlib.sha256).hexdigest()
    github_other = "sha256=" + hmac.new(b"nope", body, hashlib.sha256).hexdigest()
    cases: list[tuple[dict[str, Any], list[tuple[dict[str, str], int, bytes]]]] = [
        (
            {"hmac_secret": "gh"},
            [
                ({"X-Hub-Signature-256": github_good}, 202, b""),
                ({"X-Hub-Signature-256": github_other}, 401, b"wrong X-Hub-Signature-256"),
                ({}, 401, b"missing X-Hub-Signature-256"),
            ],
        ),
        (
            {"hmac_secret": "glpat", "signature_header": "X-Gitlab-Token", "signature_scheme": "token"},
            [
                ({"X-Gitlab-Token": "glpat"}, 202, b""),
                ({"X-Gitlab-Token": "glpa"}, 401, b"wrong X-Gitlab-Token"),
            ],
        ),
        (
            {
                "hmac_secret": "whsec_x",
                "signature_header": "Stripe-Signature",
                "signature_scheme": "stripe",
                "signature_prefix": "v1=",
                "signature_tolerance": 300,
            },
            [
                (_stripe_header(b"whsec_x", body, now), 202, b""),
                # A secret rotation: one v1 per secret, any may match.
                (_stripe_header(b"whsec_x", body, now, "00" * 32, "ab" * 32), 202, b""),
                (_stripe_header(b"whsec_x", body, now - 3600), 401, b"tolerance of 300 s"),
                (_stripe_header(b"whsec_other", body, now), 401, b"wrong Stripe-Signature"),
                ({"Stripe-Signature": f"v1={'00' * 32}"}, 401, b"no t=<unix seconds> timestamp"),
            ],
        ),
    ]
    gateway.set_functions([FunctionSpec("signed", topic="signed")])
    for source, requests in cases:
        daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source=source))
        header = str(source.get("signature_header", "X-Hub-Signature-256"))
        for headers, status, says in requests:
            reply = await post(http, daemon, "signed", body, headers=headers)
            assert reply.status == status and says in reply.body, (source, headers, reply)
        accepted_count = sum(1 for _, status, _ in requests if status == 202)
        samples = await settled(daemon, accepted_count)
        assert _python_requests(samples) == 0, (source, samples)
        assert _python_requests(samples, "metrics") >= 1, "the counter counts Python routes"
        calls = gateway.requests_for("signed")
        assert len(calls) == accepted_count
        assert all(c.body == body and header not in c.headers for c in calls)
        gateway.reset_requests()
        await daemon.stop()


async def test_a_webhook_that_needs_python_is_counted_and_checks_the_same_signatures(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    """``decode = "s3"`` still takes the Python handler: the counter sees its requests (so the
    test above would see a fallback), and Stripe signatures are refused there alike."""
    stripe = {
        "hmac_secret": "whsec_x",
        "signature_header": "Stripe-Signature",
        "signature_scheme": "stripe",
        "signature_prefix": "v1=",
        "decode": "s3",
    }
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source=stripe))
    body = b'{"Records": []}'
    hour_ago = _stripe_header(b"whsec_x", body, int(time.time()) - 3600)
    stale = await post(http, daemon, "s3", body, headers=hour_ago)
    assert stale.status == 401 and b"tolerance" in stale.body, stale
    fresh = await post(http, daemon, "s3", body, headers=_stripe_header(b"whsec_x", body, int(time.time())))
    assert fresh.status == 202, fresh
    assert _python_requests(await daemon.metrics()) == 2


async def test_webhook_413_over_max_body_bytes(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("sink", topic="big")])
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, source={"max_body_bytes": 1024}))
    assert (await post(http, daemon, "big", b"x" * 1025)).status == 413

    async def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(5):
            yield b"y" * 300

    assert (await post(http, daemon, "big", chunks())).status == 413  # type: ignore[arg-type]

    async def small_chunks() -> Any:
        for _ in range(4):
            yield b"c" * 256

    chunked = await post(http, daemon, "big", small_chunks(), wait=True)  # type: ignore[arg-type]
    assert (chunked.status, chunked.body) == (200, b"c" * 1024)
    assert (await post(http, daemon, "big", b"z" * 1024, wait=True)).status == 200
    assert [r.body for r in gateway.requests_for("sink")] == [b"c" * 1024, b"z" * 1024]
    assert "Transfer-Encoding" not in gateway.requests_for("sink")[0].headers
    samples = await daemon.metrics()
    assert metric(samples, "fastconn_messages_received_total", source="webhook", topic="big") == 2


async def test_webhook_503_under_backpressure(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("stuck", topic="t")])
    gateway.script("stuck", hang=True)
    # One call on the wire, at most max(2 * max_inflight, 2 * batch_size) = 2 messages accepted.
    daemon = await daemon_factory(
        gw_config(
            gateway,
            fast_dispatch,
            dispatch={"max_inflight": 1, "max_inflight_per_function": 1, "batch_size": 1},
        )
    )
    statuses = []
    for i in range(4):
        reply = await post(http, daemon, "t", f"m{i}".encode())
        statuses.append(reply.status)
        if reply.status == 503:
            assert reply.headers["Retry-After"] == "1"
            assert b"capacity" in reply.body
    assert statuses == [202, 202, 503, 503]
    await wait_for(lambda: gateway.calls("stuck") == 1, 5, what="the first call")
    samples = await daemon.metrics()
    assert metric(samples, "fastconn_inflight") == 1
    assert metric(samples, "fastconn_queued") == 2
    assert metric(samples, "fastconn_messages_received_total", source="webhook", topic="t") == 2
    await asyncio.sleep(0.2)
    assert len(gateway.requests_for("stuck")) == 1, "max_inflight 1: the second call waits"

    gateway.release_hangs()
    await wait_for(lambda: len(gateway.requests_for("stuck")) == 2, 5, what="the second call")
    gateway.release_hangs()
    await settled(daemon, 2)
    gateway.script("stuck")
    assert (await post(http, daemon, "t", b"after", wait=True)).status == 200, "capacity is back"
    assert [r.body for r in gateway.requests_for("stuck")] == [b"m0", b"m1", b"after"]


# ---------------------------------------------------------------------------- metrics


async def test_metrics_after_a_known_run(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions(
        [
            FunctionSpec("ok", topic="m.ok"),
            FunctionSpec("flaky", topic="m.flaky"),
            FunctionSpec("bad", topic="m.bad"),
            FunctionSpec("fan_a", topic="m.fan"),
            FunctionSpec("fan_b", topic="m.*"),  # also m.ok, m.flaky, m.bad
        ]
    )
    gateway.script("flaky", statuses=[500, 200])
    gateway.script("bad", statuses=400)
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch))
    sent = {"m.ok": 3, "m.flaky": 1, "m.bad": 2, "m.fan": 1, "none": 1}
    for topic, n in sent.items():
        for _ in range(n):
            await accepted(http, daemon, topic)
    s = await settled(daemon, sum(sent.values()))

    for topic, n in sent.items():
        # A topic no function subscribes to is counted under one shared label (bounded series).
        label = "(unrouted)" if topic == "none" else topic
        assert metric(s, "fastconn_messages_received_total", source="webhook", topic=label) == n, topic
    assert metric(s, "fastconn_messages_received_total", source="webhook", topic="none") == 0
    # Acknowledged: delivered everywhere, or unrouted; a message fanned out is acked once.
    assert metric(s, "fastconn_messages_acked_total", source="webhook") == 3 + 1 + 1 + 1
    assert metric(s, "fastconn_messages_failed_total", source="webhook") == 2
    calls = {
        ("ok", "200"): 3,
        ("flaky", "200"): 1,
        ("bad", "400"): 2,
        ("fan_a", "200"): 1,
        ("fan_b", "200"): 3 + 1 + 2 + 1,
    }
    for (fn, status), n in calls.items():
        assert metric(s, "fastconn_invocations_total", function=f"{fn}.{NS}", status=status) == n, fn
    invocations = {k: v for k, v in s.items() if k.startswith("fastconn_invocations_total{")}
    assert sum(invocations.values()) == sum(calls.values()), invocations
    for fn in ("ok", "flaky", "bad", "fan_a", "fan_b"):
        expected = sum(n for (f, _), n in calls.items() if f == fn)
        assert metric(s, "fastconn_invocation_duration_seconds_count", function=f"{fn}.{NS}") == expected
        assert (
            metric(s, "fastconn_invocation_duration_seconds_bucket", function=f"{fn}.{NS}", le="+Inf")
            == expected
        )
        assert metric(s, "fastconn_retries_total", function=f"{fn}.{NS}") == (1 if fn == "flaky" else 0)
    assert metric(s, "fastconn_topic_map_functions") == 5
    assert metric(s, "fastconn_inflight") == 0
    assert metric(s, "fastconn_queued") == 0
    assert gateway.calls("flaky") == 2 and gateway.calls("fan_b") == 7


# ---------------------------------------------------------------------------- shutdown


async def test_graceful_shutdown_finishes_in_flight_work(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("long", topic="t")])
    gateway.script("long", delay=1.0)
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch))
    waiting = asyncio.create_task(post(http, daemon, "t", b"finish me", wait=True))
    await wait_for(lambda: len(gateway.requests_for("long")) == 1, 5, what="the call to start")
    assert daemon.process is not None
    signalled = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)

    await asyncio.sleep(0.2)
    late = await post(http, daemon, "t", b"too late")
    assert late.status == 503, "intake stops on SIGTERM"
    assert (await readyz(http, daemon))[0] == 503

    reply = await asyncio.wait_for(waiting, 10)
    assert (reply.status, reply.body) == (200, b"finish me"), "the in-flight call completes"
    assert await exited(daemon, 10) == 0
    assert time.monotonic() - signalled >= 0.7, "the daemon waited for the call"
    assert [r.body for r in gateway.requests_for("long")] == [b"finish me"]
    assert "fastconn stopped (0 message(s) unfinished)" in daemon.output()


async def test_shutdown_timeout_bounds_the_drain(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("stuck", topic="t")])
    gateway.script("stuck", hang=True)
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, dispatch={"shutdown_timeout": "500ms"}))
    await accepted(http, daemon, "t")
    # A sender waiting for the function's answer must not hold the shutdown up either.
    waiting = asyncio.create_task(post(http, daemon, "t", b"waiting", wait=True))
    await wait_for(lambda: len(gateway.requests_for("stuck")) == 2, 5, what="the calls to start")
    started = time.monotonic()
    assert await daemon.stop(timeout=10) == 0
    assert 0.4 <= time.monotonic() - started < 4
    assert "2 message(s) unfinished" in daemon.output()
    reply = await asyncio.wait_for(waiting, 5)
    assert reply.status == 503 and reply.headers["Retry-After"] == "1", reply
    assert len(reply.headers["X-Message-Id"]) == 32


async def test_second_signal_exits_at_once(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession, fast_dispatch: dict
) -> None:
    gateway.set_functions([FunctionSpec("stuck", topic="t")])
    gateway.script("stuck", hang=True)
    daemon = await daemon_factory(gw_config(gateway, fast_dispatch, dispatch={"shutdown_timeout": "30s"}))
    await accepted(http, daemon, "t")
    await wait_for(lambda: len(gateway.requests_for("stuck")) == 1, 5, what="the call to start")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    assert daemon.process.poll() is None, "still draining after the first signal"
    started = time.monotonic()
    assert await daemon.stop(signal.SIGINT, timeout=5) == 1
    assert time.monotonic() - started < 2
