"""Async callbacks answered by the ingress in the core (issue 11): token check, claim and body
limit in Rust, the claimed callbacks settled by Python in batches. Real HTTP against the core's
listener, the gateway double playing OpenFaaS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from callback_harness import Harness, core_harness  # noqa: F401 (fixture)
from fastconn import Message, Verdict
from fastconn.testing import wait_for


async def _post(
    http: aiohttp.ClientSession, url: str, call_id: str, status: str = "200", body: bytes = b"r"
) -> int:
    headers = {"X-Call-Id": call_id, "X-Function-Status": status}
    async with http.post(url, headers=headers, data=body) as r:
        await r.read()
        return r.status


async def test_the_core_answers_callbacks_and_python_settles_them(
    core_harness: Callable[..., object],
) -> None:
    h: Harness = await core_harness()  # type: ignore[misc]
    h.gateway.script("fn", statuses=[200], body=b"result", callback_delay=0.2)
    h.dispatcher.set_functions([h.target("fn", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"a")], h.collect, capture=True)
    await h.dispatcher.submit([Message("jobs", b"b")], h.collect)
    await wait_for(lambda: h.gateway.calls("fn") == 2, what="two async calls")
    assert h.outcomes == [], "the 202 does not settle the message"
    await wait_for(lambda: len(h.outcomes) == 2, what="both outcomes")
    assert all(o.verdict is Verdict.OK for o in h.outcomes)
    assert [o.results[0].body for o in h.outcomes] == [b"result", b"result"], "the body, captured or not"
    by_payload = {o.message.payload: o.results[0] for o in h.outcomes}
    headers = dict(by_payload[b"a"].headers or ())
    assert headers["x-function-status"] == "200", "the callback's headers reach a captured result"
    assert by_payload[b"b"].headers is None, "as for a sync call, headers only with capture"
    sent = await asyncio.wait_for(h.gateway.wait_callbacks(2), 5)
    assert [c.response_status for c in sent] == [200, 200]
    assert h.callbacks.pending == 0


async def test_fifty_concurrent_duplicates_settle_once(core_harness: Callable[..., object]) -> None:
    h: Harness = await core_harness()  # type: ignore[misc]
    h.gateway.script("dup", statuses=[200], callback_copies=0)  # we play the gateway's callbacks
    h.dispatcher.set_functions([h.target("dup", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.gateway.calls("dup") == 1, what="the call")
    call_id = h.gateway.requests_for("dup")[0].headers["X-Call-Id"]
    connector = aiohttp.TCPConnector(limit=50, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        statuses = await asyncio.gather(
            *(_post(http, h.url_for(call_id), call_id, body=b"copy %d" % i) for i in range(50))
        )
        assert sorted(statuses) == [200] + [409] * 49
        await wait_for(lambda: h.outcomes, what="the outcome")
        # A copy arriving after the settle is still a duplicate.
        assert await _post(http, h.url_for(call_id), call_id) == 409
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.OK
    assert outcome.results[0].body is not None and outcome.results[0].body.startswith(b"copy ")
    assert h.callbacks.pending == 0
    await wait_for(lambda: h.rejected().get("duplicate") == 50.0, what="the duplicates counted")


async def test_forged_unknown_and_malformed_callbacks_are_refused(
    core_harness: Callable[..., object],
) -> None:
    h: Harness = await core_harness()  # type: ignore[misc]
    h.gateway.script("held", statuses=[200], callback_copies=0)
    h.dispatcher.set_functions([h.target("held", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.gateway.calls("held") == 1, what="the call")
    call_id = h.gateway.requests_for("held")[0].headers["X-Call-Id"]
    async with aiohttp.ClientSession() as http:
        assert await _post(http, f"{h.public_url}/callback/{'0' * 40}", call_id) == 401, "forged token"
        other = h.url_for("f" * 32)
        assert await _post(http, other, call_id) == 401, "another call's token"
        async with http.post(f"{h.public_url}/callback/nothing", data=b"") as r:
            assert r.status == 401, "no call id"
            assert await r.json() == {"error": "bad callback token"}
        assert await _post(http, h.url_for(call_id), call_id, status="two hundred") == 400
        unknown = "0" * 32
        async with http.post(
            h.url_for(unknown), headers={"X-Call-Id": unknown, "X-Function-Status": "200"}
        ) as r:
            assert r.status == 404
            assert await r.json() == {"error": f"unknown call id {unknown}"}
        async with http.get(h.url_for(call_id)) as r:
            assert r.status == 405
    assert h.callbacks.pending == 1 and h.outcomes == [], "no refused callback changes anything"
    await wait_for(
        lambda: h.rejected() == {"bad_token": 3.0, "bad_request": 1.0, "unknown": 1.0},
        what="the refusals counted",
    )
    async with aiohttp.ClientSession() as http:
        assert await _post(http, h.url_for(call_id), call_id) == 200, "the real callback still settles"
    await wait_for(lambda: h.outcomes, what="the outcome")


async def test_a_callback_over_the_limit_fails_its_call_in_the_core(
    core_harness: Callable[..., object],
) -> None:
    limit = 64 * 1024
    h: Harness = await core_harness(timeout=30.0, max_body_bytes=limit)  # type: ignore[misc]
    h.gateway.script("huge", statuses=[200], body=b"z" * (limit + 1), callback_copies=2)
    h.dispatcher.set_functions([h.target("huge", "jobs")])
    started = time.monotonic()
    await h.dispatcher.submit([Message("jobs", b"x")], h.collect)
    await wait_for(lambda: h.outcomes, timeout=10, what="the outcome")
    assert time.monotonic() - started < 5, "settled at once, not after the 30 s callback timeout"
    [outcome] = h.outcomes
    assert outcome.verdict is Verdict.FAILED
    [result] = outcome.results
    assert result.status == 413
    assert result.body is not None and b"max_callback_bytes (65536 bytes)" in result.body
    sent = await asyncio.wait_for(h.gateway.wait_callbacks(2), 5)
    assert [c.response_status for c in sent] == [413, 409], "settled once; the copy is a duplicate"
    assert h.gateway.calls("huge") == 1


async def test_callbacks_racing_the_timeout_sweep_settle_each_call_once(
    core_harness: Callable[..., object],
) -> None:
    """Callbacks fired in a burst around each call's deadline: whichever of the callback and the
    sweep claims the call first settles it, the other finds it settled (409 / nothing)."""
    timeout = 0.4
    h: Harness = await core_harness(timeout=timeout, max_attempts=1)  # type: ignore[misc]
    h.gateway.script("late", statuses=[200], callback_copies=0)
    h.dispatcher.set_functions([h.target("late", "jobs")])
    n = 8
    await h.dispatcher.submit([Message("jobs", b"%d" % i, message_id=f"m{i}") for i in range(n)], h.collect)
    await wait_for(lambda: h.gateway.calls("late") == n, what="the calls")
    sent_at = time.monotonic()
    call_ids = [r.headers["X-Call-Id"] for r in h.gateway.requests_for("late")]
    answers: dict[str, list[int]] = {c: [] for c in call_ids}
    async with aiohttp.ClientSession() as http:

        async def hammer(call_id: str, start: float) -> None:
            await asyncio.sleep(max(0.0, sent_at + start - time.monotonic()))
            while len(h.outcomes) < n and time.monotonic() < sent_at + 10:
                answers[call_id].append(await _post(http, h.url_for(call_id), call_id))
                if answers[call_id][-1] != 409 and answers[call_id][-1] != 200:
                    return

        # Staggered starts across the deadline (the sweep runs every timeout / 4).
        await asyncio.gather(*(hammer(c, timeout * (0.6 + 0.15 * i)) for i, c in enumerate(call_ids)))
        await wait_for(lambda: len(h.outcomes) == n, what="every message settled")
        for call_id in call_ids:  # settled: every later callback is a duplicate
            assert await _post(http, h.url_for(call_id), call_id) == 409
    by_id = {o.message_id: o for o in h.outcomes}
    assert len(h.outcomes) == n and len(by_id) == n, "each message settled exactly once"
    timed_out = 0
    for call_id in call_ids:
        statuses = answers[call_id]
        assert set(statuses) <= {200, 409}, statuses
        assert statuses.count(200) <= 1, f"call {call_id} claimed twice: {statuses}"
        if statuses.count(200) == 0:
            timed_out += 1
        else:
            assert statuses[: statuses.index(200)] == [], "nothing before the claim refused it"
    verdicts = sorted(o.verdict.name for o in h.outcomes)
    assert verdicts.count("OK") == n - timed_out
    assert h.rejected().get("timeout", 0.0) == timed_out
    assert h.gateway.calls("late") == n, "max_attempts = 1: nothing re-invoked"
    assert h.callbacks.pending == 0


def _raw_callback(url: str, call_id: str, body: bytes) -> bytes:
    target = urlsplit(url)
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\nX-Call-Id: {call_id}\r\n"
        f"X-Function-Status: 200\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    body = await reader.readexactly(int(fields["content-length"]))
    return int(lines[0].split()[1]), body


async def test_pipelined_callbacks_and_other_requests_share_one_connection(
    core_harness: Callable[..., object],
) -> None:
    """Callbacks are served on the core's lean HTTP/1.1 lane; the first request of any other
    kind hands the connection to hyper with what was read of it, and hyper serves the rest,
    callbacks included, in order."""
    h: Harness = await core_harness()  # type: ignore[misc]
    h.gateway.script("piped", statuses=[200], callback_copies=0)  # we play the gateway's callbacks
    h.dispatcher.set_functions([h.target("piped", "jobs")])
    await h.dispatcher.submit([Message("jobs", b"%d" % i) for i in range(3)], h.collect)
    await wait_for(lambda: h.gateway.calls("piped") == 3, what="three async calls")
    ids = [r.headers["X-Call-Id"] for r in h.gateway.requests_for("piped")]
    requests = [
        _raw_callback(h.url_for(ids[0]), ids[0], b"one"),
        _raw_callback(h.url_for(ids[1]), ids[1], b"two"),
        b"GET /healthz HTTP/1.1\r\nHost: fastconn\r\n\r\n",
        _raw_callback(h.url_for(ids[2]), ids[2], b"three"),
        _raw_callback(h.url_for(ids[2]), ids[2], b"again"),
    ]
    address = urlsplit(h.public_url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(b"".join(requests))  # all in one write: pipelined
        await writer.drain()
        answers = [await _read_answer(reader) for _ in requests]
    finally:
        writer.close()
    assert [status for status, _ in answers] == [200, 200, 200, 200, 409]
    assert answers[2][1] == b"ok\n", "the probe, answered by hyper after the hand-over"
    assert answers[0][1] == b'{"status":"settled"}'
    await wait_for(lambda: len(h.outcomes) == 3, what="three outcomes")
    assert sorted(o.results[0].body or b"" for o in h.outcomes) == [b"one", b"three", b"two"]
    assert all(o.verdict is Verdict.OK for o in h.outcomes)
    assert h.callbacks.pending == 0
