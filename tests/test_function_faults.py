"""Functions that misbehave at the HTTP level (issue 10): each fault costs only its own call, gets
the verdict its kind deserves, and the dispatcher keeps working for everyone else.

The function is a raw TCP server, so it can do what no HTTP framework lets it: close mid-response,
answer something that is not HTTP, or send a body of 50 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Verdict
from fastconn.message import ErrorKind

HUGE = 50 * 1024 * 1024


async def _read_request(reader: asyncio.StreamReader) -> str | None:
    """Reads one request head and body; returns its path (None when the peer closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0
    )
    await reader.readexactly(length)
    return lines[0].split(" ")[1]


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while True:
            path = await _read_request(reader)
            if path == "/cut":
                # Half a response, then gone.
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
                await writer.drain()
                break
            if path == "/garbage":
                writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
                await writer.drain()
                break
            if path == "/huge":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % HUGE)
                chunk = b"z" * (1024 * 1024)
                for _ in range(HUGE // len(chunk)):
                    writer.write(chunk)
                    await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
    writer.close()


@pytest.fixture
async def misbehaving() -> AsyncIterator[str]:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_each_fault_costs_only_its_call(misbehaving: str) -> None:
    options = DispatchOptions(max_attempts=2, backoff_initial=0.01, backoff_max=0.02, timeout=10.0)
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions(
            [
                FunctionTarget(name, (name,), f"{misbehaving}/{name}")
                for name in ("cut", "garbage", "huge", "ok")
            ]
        )
        cut, garbage, huge, ok = await dispatcher.call(
            [Message("cut", b"1"), Message("garbage", b"2"), Message("huge", b"3"), Message("ok", b"4")]
        )
        # A response cut short may succeed next time: retried, then RETRY for the source.
        assert cut.verdict is Verdict.RETRY
        assert (cut.results[0].error, cut.results[0].attempts) == (ErrorKind.IO, 2)
        # Not HTTP at all: the same server will answer the same way. Final, said why.
        assert garbage.verdict is Verdict.FAILED
        assert (garbage.results[0].error, garbage.results[0].attempts) == (ErrorKind.PROTOCOL, 1)
        assert garbage.results[0].body
        # 50 MB is read (so the connection stays usable) but not kept.
        assert huge.verdict is Verdict.OK
        assert ok.verdict is Verdict.OK
        # And the dispatcher is as good as new.
        [again] = await dispatcher.call([Message("ok", b"5")])
        assert again.verdict is Verdict.OK
        assert dispatcher.queued == 0 and dispatcher.inflight == 0
