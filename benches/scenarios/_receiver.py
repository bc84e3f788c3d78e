"""A function stand-in in the bench process that timestamps every call on arrival: for
scenarios whose latency reference is not the sink's body stamp (a cron fire's scheduled time,
a database change's commit time).

It is a keep-alive HTTP/1.1 server on a bare ``asyncio.Protocol``: an aiohttp handler costs a few
hundred microseconds, so a burst of 1,000 calls would queue in the receiver for a good part of
a second and its own delay would be measured instead of the sender's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fastconn.testing import free_port

__all__ = ["Reference", "TimingReceiver"]

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

Reference = Callable[[Mapping[str, str], bytes], float]
"""The time a call is late against (Unix seconds), from its headers (lower-case names) and body."""


class _TimingProtocol(asyncio.Protocol):
    def __init__(self, receiver: TimingReceiver) -> None:
        self.receiver = receiver
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            name = lines[0].split()[1].rsplit("/", 1)[-1]
            reference = self.receiver.reference(headers, body)
            self.receiver.calls.append((name, reference, arrived - reference))
            assert self.transport is not None
            self.transport.write(_RESPONSE)


@dataclass
class TimingReceiver:
    """Records ``(function, reference time, arrival - reference)`` per call."""

    reference: Reference
    calls: list[tuple[str, float, float]] = field(default_factory=list)
    server: asyncio.Server | None = None
    url: str = ""

    async def start(self) -> None:
        port = free_port()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _TimingProtocol(self), "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
