"""Readiness reflects every source's broker connection, and an outage is logged once.

Unit tests of :mod:`fastconn.health` and :mod:`fastconn.log_throttle`, then a daemon whose
NATS / JetStream source loses its own nats-server (kill -9) and gets it back on the same port.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer

from fastconn.health import ConnectionHealth, SourceHealth, describe_error, display_servers
from fastconn.log_throttle import ThrottleFilter
from fastconn.logs import setup_logging
from fastconn.sources._kafka_health import MetadataProbe
from fastconn.testing import FunctionDouble, ServerProcess, free_port, tansu_command, wait_for
from nats_fixtures import start_nats_server

if TYPE_CHECKING:
    from conftest import DaemonFactory


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_connection_health_logs_an_outage_once_and_the_recovery_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(43203.0)  # 12:00:03 UTC on day 0
    health = ConnectionHealth("orders", "nats://broker:4222", logging.getLogger("t.health"), clock)
    assert health.health() == SourceHealth(True, "", 0.0)
    with caplog.at_level(logging.INFO, logger="t.health"):
        health.lost()
        assert health.health() == SourceHealth(
            False, "nats://broker:4222 unreachable (connection lost)", 43203.0
        )
        assert caplog.messages == [], "nothing said before the first failed reconnection"
        for _ in range(50):  # a client retrying every 200 ms for 10 s
            clock.now += 0.2
            health.failing("connection refused")
        assert caplog.messages == [
            "source orders: nats://broker:4222 unreachable since 12:00:03 (connection refused)"
        ]
        assert health.health().since == 43203.0, "down since the connection was lost"
        clock.now = 43213.0
        health.failing("timed out")
        assert health.health().reason == "nats://broker:4222 unreachable (timed out)"
        clock.now += 2
        health.restored()
        health.restored()
        assert caplog.messages[1:] == ["source orders: nats://broker:4222 reachable again (down for 12.0s)"]
        assert health.health().ok
        # A drop healed before any failed attempt: one line, no "unreachable".
        caplog.clear()
        health.lost()
        clock.now += 0.5
        health.restored()
        assert caplog.messages == [
            "source orders: connection to nats://broker:4222 lost at 12:00:15, restored after 0.5s"
        ]


def test_describe_error_and_display_servers() -> None:
    assert describe_error(ConnectionRefusedError(111, "Connection refused")) == "connection refused"
    assert describe_error(TimeoutError()) == "timed out"
    assert describe_error(OSError(113, "No route to host")) == "no route to host"
    assert describe_error(RuntimeError("nats: unexpected EOF")) == "nats: unexpected eof"
    shown = display_servers(["nats://user:secret@a:4222", "tls://b:4222", "nats://tok@c:4222"])
    assert shown == "nats://a:4222, tls://b:4222, nats://c:4222"


def test_throttle_filter_lets_one_line_per_interval_through_with_the_count() -> None:
    clock = FakeClock(0.0)
    throttle = ThrottleFilter("aiokafka", interval=30, clock=clock)

    def record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    first = record("aiokafka.conn", logging.ERROR, "Unable connect to %s", "node 1")
    assert throttle.filter(first) and first.getMessage() == "Unable connect to node 1"
    flood = [record("aiokafka.client", logging.ERROR, "Unable to update metadata") for _ in range(66 * 29)]
    assert not any(throttle.filter(r) for r in flood)
    # Not throttled: other loggers, and aiokafka's records below WARNING.
    assert throttle.filter(record("aiokafkaesque", logging.ERROR, "x"))
    assert throttle.filter(record("fastconn.source.kafka", logging.ERROR, "x"))
    assert throttle.filter(record("aiokafka.consumer", logging.INFO, "joined group"))
    clock.now = 30.0
    after = record("aiokafka.conn", logging.ERROR, "Unable connect to %s", "node 1")
    assert throttle.filter(after)
    assert (
        after.getMessage()
        == "Unable connect to node 1 (1914 more aiokafka line(s) held back in the last 30s)"
    )


def test_setup_logging_throttles_aiokafka(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("text", "info")
        for _ in range(200):
            logging.getLogger("aiokafka.conn").error("Unable connect to node with id 1")
        logging.getLogger("fastconn.x").error("our own line")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("Unable connect to node with id 1") == 1, err
    assert "our own line" in err


# ---------------------------------------------------------------------------- a daemon


SOURCES: dict[str, dict[str, Any]] = {
    "nats": {"type": "nats", "subjects": ["health.t"]},
    "jetstream": {"type": "jetstream", "stream": "HEALTH", "subjects": ["health.t"], "create_stream": True},
}


async def readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url + "/readyz") as r:
        return r.status, await r.text()


@pytest.mark.parametrize("kind", list(SOURCES))
async def test_readiness_follows_the_broker_with_a_grace_period(
    kind: str,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    http: aiohttp.ClientSession,
) -> None:
    server = start_nats_server(tmp_path / "nats")
    try:
        source = {**SOURCES[kind], "servers": [server.url], "reconnect_wait": "100ms"}
        daemon = await daemon_factory(
            {
                "server": {"readiness_grace": "1500ms"},
                "dispatch": {"shutdown_timeout": "5s"},
                "functions": [{"name": "f", "url": function_double.url("/f"), "topics": ["health.t"]}],
                "sources": [source],
            }
        )
        assert await readyz(http, daemon.url) == (200, "ready\n")
        server.process.kill()  # kill -9: no goodbye to the clients
        server.process.wait()
        killed = time.monotonic()
        await wait_for(lambda: "unreachable since" in daemon.output(), 10, what="the outage log line")
        status, _ = await readyz(http, daemon.url)
        if time.monotonic() - killed < 1.2:
            assert status == 200, "still ready within readiness_grace"

        async def not_ready() -> bool:
            return (await readyz(http, daemon.url))[0] == 503

        await wait_for(not_ready, 10, 0.05, "readyz 503")
        assert time.monotonic() - killed >= 1.4, "not ready before the grace period ended"
        _, why = await readyz(http, daemon.url)
        assert why.startswith(f"source {kind}: {server.url} unreachable (connection refused) since "), why
        # Many reconnection attempts (every 100 ms) have failed by now: still one line.
        log = daemon.output()
        assert log.count("unreachable since") == 1, log
        assert f"source {kind}: {server.url} unreachable since" in log and "(connection refused)" in log
        assert "NATS error" not in log, "no line per failed reconnection"

        server = start_nats_server(tmp_path / "nats", port=server.port)

        async def ready() -> bool:
            return (await readyz(http, daemon.url))[0] == 200

        await wait_for(ready, 15, 0.05, "readyz 200 after the broker came back")
        log = daemon.output()
        assert log.count("reachable again") == 1, log
        assert "Traceback" not in log, log
    finally:
        server.stop()


# ---------------------------------------------------------------------------- Kafka


async def test_kafka_metadata_probe_follows_a_tansu_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The probe the Kafka source wires (aiokafka has no connection events): down once, with
    one line, while the broker is away; back once, with one line."""
    port = free_port()
    tansu = ServerProcess("tansu", tansu_command(port), port, tmp_path / "tansu.log")
    consumer = AIOKafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=1000)
    logger = logging.getLogger("t.kafka-health")
    health = ConnectionHealth("kafka", f"127.0.0.1:{port}", logger)
    probe = MetadataProbe(health, consumer.topics, interval=0.1, timeout=2)

    def said() -> list[str]:  # the probe's lines only (aiokafka's own go to the capture too)
        return [r.getMessage() for r in caplog.records if r.name == logger.name]

    try:
        await consumer.start()
        with caplog.at_level(logging.INFO, logger="t.kafka-health"):
            await probe.probe_once()
            assert health.health().ok and said() == [], "reachable: nothing to say"
            probe.start()
            tansu.process.kill()
            tansu.process.wait()
            await wait_for(lambda: not health.health().ok, 10, what="the probe to see the broker gone")
            await wait_for(lambda: len(said()) == 1, 5, what="the outage line")
            [down] = said()
            assert down.startswith(f"source kafka: 127.0.0.1:{port} unreachable since "), down
            tansu = ServerProcess("tansu", tansu_command(port), port, tmp_path / "tansu.log")
            await wait_for(lambda: health.health().ok, 15, what="the probe to see the broker back")
            assert len(said()) == 2, said()  # many failed probes, one line
            assert said()[1].startswith(f"source kafka: 127.0.0.1:{port} reachable again"), said()
    finally:
        await probe.stop()
        await consumer.stop()
        tansu.stop()
