"""The admin/ingress server under a slowloris: slow-header connections are closed by the server
within ``[server] header_timeout``, the connection cap evicts them first, ``/healthz`` keeps
answering, and the daemon runs with its soft open-files limit raised to the hard limit."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from fastconn.conn_guard import FORWARDED_CALLBACKS
from fastconn.testing import DaemonProcess, FunctionDouble, wait_for

if TYPE_CHECKING:
    from conftest import DaemonFactory

_PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: fastconn\r\nX-Slow: "


def _config(function_url: str, **server: Any) -> dict[str, Any]:
    return {"functions": [{"name": "echo", "url": function_url, "topics": ["t"]}], "server": server}


async def _open_slow(
    daemon: DaemonProcess, n: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, _, port = daemon.listen.rpartition(":")
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_PARTIAL_HEAD)
        conns.append((reader, writer))
    for _, writer in conns:
        await writer.drain()
    return conns


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closed (EOF or reset) within ``timeout`` without answering."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


async def _healthz_latency(http: aiohttp.ClientSession, daemon: DaemonProcess) -> float:
    started = time.monotonic()
    async with http.get(daemon.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
    return time.monotonic() - started


def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()


async def test_slow_header_connections_are_closed_within_header_timeout(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(
        _config(function_double.url("/echo"), header_timeout="1s", idle_timeout="30s")
    )
    started = time.monotonic()
    conns = await _open_slow(daemon, 500)
    try:
        assert await _healthz_latency(http, daemon) < 2.0
        # header_timeout (1 s) + margin, counted from when the first slow connection opened.
        deadline = started + 1.0 + 4.0
        closed = await asyncio.gather(
            *(_closed_by_server(r, max(0.1, deadline - time.monotonic())) for r, _ in conns)
        )
        assert sum(closed) == len(conns), f"{len(conns) - sum(closed)} slow connection(s) still open"
        assert await _healthz_latency(http, daemon) < 2.0
    finally:
        _close_all(conns)


async def test_at_the_connection_cap_slow_connections_make_room(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    # A header deadline far away: only the cap can close them within this test.
    config = _config(function_double.url("/echo"), header_timeout="60s", max_connections=100)
    daemon = await daemon_factory(config)
    conns = await _open_slow(daemon, 300)
    try:
        # Each new connection evicted the oldest slow one: 200 are gone already.
        closed = await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in conns[:200]))
        assert all(closed)
        for _ in range(5):
            assert await _healthz_latency(http, daemon) < 2.0
    finally:
        _close_all(conns)


async def test_at_the_connection_cap_idle_keepalive_connections_make_room(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    """Connections that sent one request and then sit idle (or trickle the next head) cannot
    hold the server's connections until idle_timeout."""
    config = _config(function_double.url("/echo"), idle_timeout="60s", max_connections=50)
    daemon = await daemon_factory(config)
    host, _, port = daemon.listen.rpartition(":")
    conns = []
    for _ in range(60):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: fastconn\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(3) == b"ok\n"
        writer.write(_PARTIAL_HEAD)  # the next request trickles
        conns.append((reader, writer))
    try:
        closed = await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in conns[:10]))
        assert all(closed), "the ten oldest idle connections made room for the newer ones"
        assert await _healthz_latency(http, daemon) < 2.0
    finally:
        _close_all(conns)


async def test_a_complete_request_is_not_cut_by_the_header_timeout(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    """Keep-alive connections that delivered a request stay open until idle_timeout."""
    daemon = await daemon_factory(
        _config(function_double.url("/echo"), header_timeout="500ms", idle_timeout="30s")
    )
    host, _, port = daemon.listen.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: fastconn\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(3) == b"ok\n"
        assert not await _closed_by_server(reader, 1.5)  # three header timeouts later: still open
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: fastconn\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


@contextlib.contextmanager
def _soft_open_files_limit(soft: int) -> Iterator[int]:
    """Lowers this process's soft limit (inherited by children spawned meanwhile)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def _open_files_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no 'Max open files' in /proc/<pid>/limits")


async def test_daemon_raises_its_soft_open_files_limit_to_the_hard_limit(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    # Spawned with a soft limit of 256, below any hard limit a test machine has.
    with _soft_open_files_limit(256):
        daemon = await daemon_factory(_config(function_double.url("/echo")), wait=None)
    assert daemon.process is not None
    await wait_for(lambda: "open files limit" in daemon.output(), 20, 0.05, "the open files log line")
    soft, hard = _open_files_limits(daemon.process.pid)
    assert soft == hard, f"soft {soft}, hard {hard}"
    assert f"raised from 256 to {hard}" in daemon.output()


def test_every_protocol_callback_of_aiohttps_handler_is_forwarded() -> None:
    """The guard wraps aiohttp's RequestHandler; a protocol callback aiohttp adds (or a switch to
    BufferedProtocol) would be silently skipped by the wrapper: fail here instead."""
    assert not issubclass(web.RequestHandler, asyncio.BufferedProtocol)
    callbacks = {
        name
        for name, _ in inspect.getmembers(asyncio.BufferedProtocol, inspect.isfunction)
        if not name.startswith("_")
    } | {
        name
        for name, _ in inspect.getmembers(asyncio.Protocol, inspect.isfunction)
        if not name.startswith("_")
    }
    overridden = {
        name
        for name in callbacks
        if getattr(web.RequestHandler, name, None) is not getattr(asyncio.Protocol, name, None)
    }
    assert overridden <= FORWARDED_CALLBACKS, overridden - FORWARDED_CALLBACKS
