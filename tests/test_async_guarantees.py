"""Async invocations under concurrency (issue 9): every (message, function) settles exactly once,
keys stay ordered and never deadlock, and a message's headers cannot take over its callback."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from callback_harness import Harness, harness_factory  # noqa: F401 (fixture)
from fastconn import Message, Outcome, Verdict
from fastconn.testing import DaemonProcess, wait_for
from gateway_double import FunctionSpec, GatewayDouble
from nats_fixtures import NatsServer, connected, nats_server, unique  # noqa: F401 (fixture)

LARGE = 900 * 1024


async def _slow_body(size: int, pieces: int, pause: float) -> AsyncIterator[bytes]:
    """A request body sent in pieces, so concurrent requests interleave while being read."""
    piece = b"r" * (size // pieces)
    for _ in range(pieces):
        yield piece
        await asyncio.sleep(pause)


async def _post_callback(
    http: aiohttp.ClientSession, url: str, call_id: str, *, pieces: int = 8, pause: float = 0.02
) -> int:
    headers = {"X-Call-Id": call_id, "X-Function-Status": "200", "X-Function-Name": "f"}
    async with http.post(url, data=_slow_body(LARGE, pieces, pause), headers=headers) as response:
        await response.read()
        return response.status


async def test_concurrent_duplicate_callbacks_settle_once_and_wait_for_the_sync_function(
    harness_factory: Callable[..., object],
) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("later", statuses=[200], callback_copies=0)  # the test is the gateway here
    h.gateway.script("slowsync", statuses=[200], delay=1.0)
    h.dispatcher.set_functions([h.target("later", "jobs"), h.target("slowsync", "jobs", asynchronous=False)])
    submitted = time.monotonic()
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.gateway.calls("later") == 1, what="the async call")
    [request] = h.gateway.requests_for("later")
    url, call_id = request.headers["X-Callback-Url"], request.headers["X-Call-Id"]
    async with aiohttp.ClientSession() as http:
        statuses = await asyncio.gather(*(_post_callback(http, url, call_id) for _ in range(4)))
    assert sorted(statuses) == [200, 409, 409, 409], "one copy settles, the others are duplicates"
    assert h.outcomes == [], "settled before the sync function answered"
    await wait_for(lambda: h.outcomes, what="the outcome")
    assert time.monotonic() - submitted >= 1.0
    await asyncio.sleep(0.2)
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    assert sorted(r.function for r in outcome.results) == ["later", "slowsync"]
    assert h.callbacks.pending == 0


async def test_a_callback_still_arriving_at_its_deadline_is_not_also_timed_out(
    harness_factory: Callable[..., object],
) -> None:
    h: Harness = await harness_factory(timeout=0.4)  # type: ignore[misc]
    h.gateway.script("late", statuses=[200], callback_copies=0)
    h.dispatcher.set_functions([h.target("late", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.gateway.calls("late") == 1, what="the async call")
    [request] = h.gateway.requests_for("late")
    async with aiohttp.ClientSession() as http:
        # The body takes ~1 s to arrive: the deadline passes while it is being read.
        status = await _post_callback(
            http, request.headers["X-Callback-Url"], request.headers["X-Call-Id"], pieces=10, pause=0.1
        )
    assert status == 200
    await wait_for(lambda: h.outcomes, what="the outcome")
    await asyncio.sleep(0.5)
    assert [o.verdict for o in h.outcomes] == [Verdict.OK]
    assert h.gateway.calls("late") == 1, "the claimed call was not timed out and re-invoked"


async def test_async_calls_hold_their_key_until_the_callback(harness_factory: Callable[..., object]) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.gateway.script("ordered", statuses=[200], callback_delay=0.3)
    h.dispatcher.set_functions([h.target("ordered", "jobs")])
    messages = [Message("jobs", b"%d" % i, message_id=f"m{i}", key=b"k") for i in range(3)]
    settled_at: dict[str, float] = {}

    def collect(batch: list[Outcome]) -> None:
        now = time.monotonic()
        for outcome in batch:
            settled_at[outcome.message_id] = now
        h.collect(batch)

    await h.dispatcher.submit(messages, collect)
    await wait_for(lambda: len(h.outcomes) == 3, what="three outcomes")
    requests = h.gateway.requests_for("ordered")
    assert [r.headers["X-Message-Id"] for r in requests] == ["m0", "m1", "m2"]
    for earlier, later in itertools.pairwise(requests):
        assert later.received >= settled_at[earlier.headers["X-Message-Id"]], (
            "the next message of the key was invoked before the previous one's callback"
        )
    assert all(o.verdict is Verdict.OK and not o.key_held for o in h.outcomes)
    assert h.dispatcher.busy_keys == 0 and h.dispatcher.queued == 0


async def test_an_async_gateway_blip_on_a_keyed_message_neither_deadlocks_nor_reorders(
    harness_factory: Callable[..., object],
) -> None:
    """The gateway's /async-function/ answers 503 for a while: the first message runs out of
    attempts (RETRY, its key held for the source), the source resubmits it with ``resume`` and
    the key's next messages follow in order — within seconds, with nothing leaked."""
    h: Harness = await harness_factory(max_attempts=2)  # type: ignore[misc]
    # An async call is invoked at most max_attempts (2) times: 2 refusals exhaust the first
    # message.
    h.gateway.script("blip", statuses=[200], accept_statuses=[503] * 2 + [202])
    h.dispatcher.set_functions([h.target("blip", "jobs")])

    def keyed(i: int, **flags: bool) -> Message:
        return Message(
            "jobs",
            b"%d" % i,
            message_id=f"m{i}",
            key=b"k",
            hold_key_on_retry=True,
            hold_key_on_failure=True,
            **flags,
        )

    await h.dispatcher.submit([keyed(0), keyed(1), keyed(2)], h.collect)
    await wait_for(lambda: h.outcomes, timeout=10, what="the first outcome")
    [first] = h.outcomes
    assert (first.message_id, first.verdict, first.key_held) == ("m0", Verdict.RETRY, True)
    await asyncio.sleep(0.3)
    assert len(h.outcomes) == 1, "the key's later messages wait while the key is held"
    assert {r.headers["X-Message-Id"] for r in h.gateway.requests_for("blip")} == {"m0"}
    await h.dispatcher.submit([keyed(0, resume=True)], h.collect)
    await wait_for(lambda: len(h.outcomes) == 4, timeout=10, what="every outcome")
    assert [(o.message_id, o.verdict) for o in h.outcomes[1:]] == [
        ("m0", Verdict.OK),
        ("m1", Verdict.OK),
        ("m2", Verdict.OK),
    ]
    accepted = h.gateway.requests_for("blip")[2:]
    assert [r.headers["X-Message-Id"] for r in accepted] == ["m0", "m1", "m2"]
    assert not any(o.key_held for o in h.outcomes[1:])
    assert h.dispatcher.busy_keys == 0
    assert h.dispatcher.queued == 0, "no leaked queue count"
    assert h.callbacks.pending == 0


async def test_exhausted_async_key_released_by_the_source_lets_the_next_message_run(
    harness_factory: Callable[..., object],
) -> None:
    h: Harness = await harness_factory(max_attempts=1)  # type: ignore[misc]
    h.gateway.script("down", statuses=[503, 200])
    h.dispatcher.set_functions([h.target("down", "jobs")])
    first = Message("jobs", b"0", message_id="m0", key=b"k", hold_key_on_retry=True)
    second = Message("jobs", b"1", message_id="m1", key=b"k", hold_key_on_retry=True)
    await h.dispatcher.submit([first, second], h.collect)
    await wait_for(lambda: h.outcomes, what="the first outcome")
    assert (h.outcomes[0].verdict, h.outcomes[0].key_held) == (Verdict.RETRY, True)
    assert h.dispatcher.release_key(b"k") is True
    await wait_for(lambda: len(h.outcomes) == 2, what="the second outcome")
    assert (h.outcomes[1].message_id, h.outcomes[1].verdict) == ("m1", Verdict.OK)
    assert h.dispatcher.release_key(b"k") is False, "a key that is not held is never released"
    assert h.dispatcher.busy_keys == 0


# -- header spoofing -------------------------------------------------------------------------

SPOOF = {"X-Callback-Url": "http://attacker.invalid/steal", "X-Call-Id": "stolen"}


def _assert_not_spoofed(gateway: GatewayDouble, name: str, public_url: str) -> None:
    requests = gateway.requests_for(name)
    assert requests, "the function was called"
    for request in requests:
        urls = request.headers.getall("X-Callback-Url")
        assert len(urls) == 1 and urls[0].startswith(f"{public_url}/callback/"), urls
        assert request.headers.getall("X-Call-Id") != ["stolen"]
        assert len(request.headers.getall("X-Call-Id")) == 1


async def test_webhook_headers_cannot_take_over_the_callback(gateway: GatewayDouble, tmp_path: Path) -> None:
    gateway.set_functions([FunctionSpec("victim", topic="pages")])
    gateway.script("victim", statuses=[200])
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "sources": [{"type": "webhook", "asynchronous_invocation": True}],
    }
    async with DaemonProcess(config, tmp_path) as daemon, aiohttp.ClientSession() as http:
        async with http.post(f"{daemon.url}/webhook/pages?wait=true", data=b"p", headers=SPOOF) as r:
            assert r.status == 200
        _assert_not_spoofed(gateway, "victim", daemon.url)
    assert all(c.url.startswith(daemon.url) for c in gateway.callbacks)


async def test_nats_headers_cannot_take_over_the_callback(
    nats_server: NatsServer, gateway: GatewayDouble, tmp_path: Path
) -> None:
    subject = unique("spoof")
    gateway.set_functions([FunctionSpec("victim", topic=subject)])
    gateway.script("victim", statuses=[200])
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "dispatch": {"asynchronous_invocation": True},
        "sources": [{"type": "nats", "servers": [nats_server.url], "subjects": [subject]}],
    }
    async with DaemonProcess(config, tmp_path) as daemon, connected(nats_server.url) as nc:
        await nc.publish(subject, b"evil", headers=SPOOF)
        await nc.flush()
        await wait_for(lambda: gateway.callbacks, what="the callback")
        _assert_not_spoofed(gateway, "victim", daemon.url)
    assert [c.response_status for c in gateway.callbacks] == [200]


@pytest.mark.parametrize("header", ["X-Topic", "X-Message-Id", "Content-Length", "Host"])
async def test_reserved_and_framing_headers_of_a_message_never_reach_a_function(
    harness_factory: Callable[..., object], header: str
) -> None:
    h: Harness = await harness_factory()  # type: ignore[misc]
    h.dispatcher.set_functions([h.target("plain", "jobs", asynchronous=False)])
    await h.dispatcher.submit(
        [Message("jobs", b"body", message_id="real", headers=[(header, "spoofed")])], h.collect
    )
    await wait_for(lambda: h.outcomes, what="the outcome")
    assert h.outcomes[0].verdict is Verdict.OK
    [request] = h.gateway.requests_for("plain")
    assert "spoofed" not in request.headers.getall(header, []), request.headers
