"""``mqtt``: MQTT → function at QoS 1, acknowledged after the function answered. A mosquitto of
the scenario's own (own config, free port) receives a burst from a raw-protocol publisher (QoS 1
PUBLISH packets written in large chunks, PUBACKs counted: it is faster than any consumer here,
so the consumer is what is measured); fastconn's daemon against a paho-mqtt (manual
acknowledgement, network thread bridged into asyncio) + aiohttp pipeline with the same
in-flight bound. Both subscribe at QoS 1 with a clean session of a client id per round."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from _common import stamped_payload
from fastconn.testing import ServerProcess, free_port, mosquitto_command
from scenarios._base import (
    Context,
    ScenarioResult,
    System,
    Target,
    alternate,
)
from scenarios._brokers import watched
from scenarios._process import (
    ProcessSystem,
    PublisherFeed,
    Running,
    daemon_config,
    start_daemon,
    start_pipeline,
)

TOPIC = "bench/events"


@contextlib.contextmanager
def mosquitto_broker(workdir: Path, watch: dict[str, int] | None = None) -> Iterator[tuple[str, int]]:
    """mosquitto on a free port with a config of its own; yields its URL and port."""
    port = free_port()
    home = workdir / "mosquitto"
    home.mkdir(parents=True, exist_ok=True)
    broker = ServerProcess("mosquitto", mosquitto_command(port, home), port, home / "mosquitto.log")
    with watched(broker, watch):
        yield f"tcp://127.0.0.1:{port}", port


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawMqttPublisher:
    """MQTT 3.1.1 QoS 1 publishes on a plain socket: a chunk of PUBLISH packets is built and
    written in one call, then the PUBACKs are awaited (the flow control; packet ids cycle)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._acked = 0
        self._sent = 0
        self._progress = asyncio.Event()
        self._read_task: asyncio.Task[None] | None = None
        self._mid = 0

    async def __aenter__(self) -> RawMqttPublisher:
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        client_id = b"bench-publisher"
        variable = b"\x00\x04MQTT\x04\x02\x00\x00"  # 3.1.1, clean session, no keep-alive
        body = variable + struct.pack("!H", len(client_id)) + client_id
        self._writer.write(b"\x10" + _remaining_length(len(body)) + body)
        connack = await self._reader.readexactly(4)
        if connack[3] != 0:
            raise RuntimeError(f"mosquitto refused the publisher: {connack!r}")
        self._read_task = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError):
                await self._read_task
        if self._writer is not None:
            self._writer.write(b"\xe0\x00")  # DISCONNECT
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            header = await self._reader.readexactly(2)
            length, shift, byte = header[1] & 0x7F, 7, header[1]
            while byte & 0x80:
                byte = (await self._reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
            await self._reader.readexactly(length)
            if header[0] & 0xF0 == 0x40:  # PUBACK
                self._acked += 1
                self._progress.set()

    def _chunk(self, topic: str, count: int, size: int) -> bytes:
        name = topic.encode()
        head = struct.pack("!H", len(name)) + name
        packets = []
        for _ in range(count):
            self._mid = self._mid % 65535 + 1
            body = head + struct.pack("!H", self._mid) + stamped_payload(size)
            packets.append(b"\x32" + _remaining_length(len(body)) + body)
        return b"".join(packets)

    async def _confirmed(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self._acked < self._sent:
            self._progress.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"mosquitto confirmed {self._acked:,} of {self._sent:,} publishes")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), left)

    async def burst(self, topic: str, n: int, size: int, chunk: int = 2000) -> None:
        """``n`` messages as fast as the broker confirms them."""
        assert self._writer is not None
        sent = 0
        while sent < n:
            count = min(chunk, n - sent)
            self._writer.write(self._chunk(topic, count, size))
            self._sent += count
            sent += count
            await self._writer.drain()
            await self._confirmed()

    async def paced(self, topic: str, n: int, size: int, rate: float) -> None:
        """``n`` messages at ``rate`` per second, in 5 ms steps (for latency at a set load)."""
        assert self._writer is not None
        started = time.perf_counter()
        sent = 0
        while sent < n:
            due = min(n, int((time.perf_counter() - started) * rate) + 1)
            if due > sent:
                self._writer.write(self._chunk(topic, due - sent, size))
                self._sent += due - sent
                sent = due
            await asyncio.sleep(0.005)
        await self._confirmed()


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "mqtt",
        "MQTT QoS 1 → function (ack after success)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        targets=[Target("≥ 5x paho-mqtt + aiohttp (issue 13)", "ratio_baseline", 5.0)],
    )
    with mosquitto_broker(o.workdir, ctx.watch) as (url, port):
        async with RawMqttPublisher(port) as publisher:
            feed = PublisherFeed(publisher, TOPIC, o.payload, o.messages)

            async def fastconn(ctx: Context, round_id: int) -> Running:
                source = {
                    "type": "mqtt",
                    "broker": url,
                    "topics": [TOPIC],
                    "client_id": f"fastconn{round_id}",
                    "clean_start": True,
                    "session_expiry": 0,
                }
                return await start_daemon(ctx, daemon_config(ctx, [TOPIC], [source]))

            async def baseline(ctx: Context, round_id: int) -> Running:
                args = ["--server", url, "--subject", TOPIC, "--group", f"base{round_id}"]
                return await start_pipeline(ctx, "mqtt", args)

            systems: list[System] = [
                ProcessSystem("fastconn", "fastconn daemon (mqtt source)", feed, fastconn),
                ProcessSystem(
                    "baseline", f"paho-mqtt (manual ack) + aiohttp ({o.inflight} in flight)", feed, baseline
                ),
            ]
            return [await alternate(ctx, result, systems)]
