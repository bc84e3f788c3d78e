"""A huge function listing from the gateway (double, real HTTP): decoded without stalling the
event loop, and refused past ``max_listing_bytes`` with the last good table kept."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import AsyncIterator

import aiohttp

from fastconn.functions import FunctionTarget
from fastconn.json_list import decode_json_list, utf8_text
from fastconn.registry import GatewayRegistry, TopicMapSync
from fastconn.testing import wait_for
from gateway_double import FunctionSpec, GatewayDouble


def _listing(functions: int) -> bytes:
    """A ``/system/functions`` body; one function in a hundred subscribes to a topic."""
    specs = [
        FunctionSpec(
            f"fn{i}",
            topic=f"topic{i}" if i % 100 == 0 else None,
            annotations={"com.example/owner": f"team-{i % 37}", "com.example/purpose": "x" * 60},
            labels={"faas_function": f"fn{i}"},
        )
        for i in range(functions)
    ]
    return json.dumps([spec.to_status() for spec in specs]).encode()


class LoopLag:
    """The longest the event loop went without running a 2 ms ticker (its stall)."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.002)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.002)
            last = now


@contextlib.asynccontextmanager
async def measured_lag() -> AsyncIterator[LoopLag]:
    lag = LoopLag()
    # The test run's own heap (hundreds of tests' objects) is frozen out of the collector while
    # measuring: a full collection then scans what the measured work allocated, as it would in
    # a daemon, not everything earlier tests left behind.
    gc.freeze()
    task = asyncio.create_task(lag._tick())
    await asyncio.sleep(0.01)
    try:
        yield lag
    finally:
        # One more tick, so a stall at the very end of the measured work is recorded too.
        await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gc.unfreeze()


async def test_a_big_listing_does_not_stall_the_event_loop(
    gateway: GatewayDouble, http: aiohttp.ClientSession
) -> None:
    body = _listing(80_000)
    assert len(body) > 25_000_000
    gateway.functions_body = body
    registry = GatewayRegistry(gateway.url, session=http, listing_timeout=30.0)
    async with measured_lag() as lag:
        started = time.monotonic()
        targets = await registry.fetch()
        took = time.monotonic() - started
    assert len(targets) == 800
    stall = lag.worst * 1e3
    print(f"\nlisting of {len(body) / 1e6:.1f} MB: fetched in {took:.2f}s, worst loop stall {stall:.0f} ms")
    # Decoded in one go on the loop, this listing stalls it for ~700 ms (measured on this machine);
    # the bound leaves room for a loaded CI host.
    assert lag.worst < 0.15, f"the event loop stalled for {lag.worst * 1e3:.0f} ms"


async def test_a_listing_over_the_cap_keeps_the_last_table_and_says_why(
    gateway: GatewayDouble, http: aiohttp.ClientSession
) -> None:
    gateway.set_functions([FunctionSpec("small", topic="t")])
    registry = GatewayRegistry(gateway.url, session=http, listing_timeout=5.0, max_listing_bytes=1 << 20)
    applied: list[list[FunctionTarget]] = []
    sync = TopicMapSync(registry, [], 0.05, applied.append)
    await sync.start()
    try:
        assert await sync.wait_ready(5)
        assert [t.name for t in sync.targets] == ["small.openfaas-fn"]
        big = _listing(5_000)
        assert len(big) > 1 << 20
        gateway.functions_body = big
        await wait_for(lambda: sync.consecutive_failures > 0, 5, what="the refused listing")
        assert sync.last_error is not None
        assert f"({len(big)} bytes) exceeds [gateway] max_listing_bytes (1048576)" in sync.last_error
        assert [t.name for t in sync.targets] == ["small.openfaas-fn"], "the last good table stays"
        assert [[t.name for t in table] for table in applied] == [["small.openfaas-fn"]]
    finally:
        await sync.stop()


async def test_a_chunked_listing_over_the_cap_is_refused_before_it_is_all_read(
    gateway: GatewayDouble, http: aiohttp.ClientSession
) -> None:
    """Without a Content-Length the cap applies while reading."""
    from aiohttp import web

    sent = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(b"[")
            while sent < 50 << 20:
                await response.write(b'{"name": "f"},' * 4096)
                sent += 14 * 4096
        return response

    app = web.Application()
    app.router.add_get("/system/functions", endless)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        registry = GatewayRegistry(
            f"http://127.0.0.1:{port}", session=http, namespaces=[""], max_listing_bytes=1 << 20
        )
        try:
            await registry.fetch()
        except Exception as exc:
            assert "more than 1048576 bytes" in str(exc) and "max_listing_bytes" in str(exc), exc
        else:
            raise AssertionError("an endless listing was accepted")
        assert sent < 10 << 20, f"{sent} bytes were produced before the refusal"
    finally:
        await runner.cleanup()


def test_decode_json_list_agrees_with_json_loads() -> None:
    for text in ["[]", " [ ] ", "[1, 2 ,3]", '[{"a": [1, {"b": null}]}, "x"]\n', "null", '{"a": 1}', "3"]:
        assert decode_json_list(text) == json.loads(text), text
    for bad in ["[", "[1,]", "[1 2]", "[1] x", "", "[1,"]:
        try:
            decode_json_list(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


def test_utf8_text_decodes_characters_split_across_pieces() -> None:
    text = "aé€😀" * 1000
    data = text.encode()
    for piece in (1, 2, 3, 7, 1 << 20):
        assert utf8_text(data, piece) == text
        assert utf8_text(bytearray(data), piece) == text
    try:
        utf8_text(b"ok \xff", 2)
    except UnicodeDecodeError:
        return
    raise AssertionError("invalid UTF-8 was accepted")
