"""The broker dies mid-stream (``kill -9``) and comes back on the same port with the same
store: the daemon survives, ``/readyz`` turns 503 while the broker is away and 200 after, and

* core NATS (at-most-once) resumes delivering once reconnected: every message published after
  both sides reconnected arrives;
* JetStream (at-least-once) delivers every message published: lost = 0; redeliveries of
  messages whose acks died with the server are duplicates, counted and printed.

Slow (a broker restart with real timings each): ``make test-slow`` or ``pytest -m slow``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import nats.errors
import pytest

from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from nats_fixtures import NatsServer, connected, start_nats_server, unique

if TYPE_CHECKING:
    from conftest import DaemonFactory

pytestmark = pytest.mark.slow

GRACE = 0.5
"""``readiness_grace`` of these daemons: short, so the outage shows in ``/readyz`` quickly."""


def kill_9(server: NatsServer) -> None:
    server.process.kill()
    server.process.wait()


async def ready_status(http: aiohttp.ClientSession, daemon: DaemonProcess) -> int:
    async with http.get(daemon.url + "/readyz") as r:
        return r.status


async def wait_ready_status(
    http: aiohttp.ClientSession, daemon: DaemonProcess, status: int, timeout: float = 20
) -> None:
    async def reached() -> bool:
        return await ready_status(http, daemon) == status

    await wait_for(reached, timeout, 0.05, f"/readyz {status}")


def config(function_double: FunctionDouble, subject: str, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"readiness_grace": f"{GRACE}s"},
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "100ms", "shutdown_timeout": "5s"},
        "functions": [{"name": "fn", "url": function_double.url("/fn"), "topics": [subject]}],
        "sources": [{**source, "reconnect_wait": "100ms"}],
    }


def bodies(function_double: FunctionDouble) -> Counter[str]:
    return Counter(c.body.decode() for c in function_double.calls_to("/fn"))


async def test_core_nats_resumes_after_kill_9_and_restart(
    tmp_path: Path,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    workdir = tmp_path / "nats"
    server = start_nats_server(workdir)
    subject = unique("restart.core.")
    try:
        daemon = await daemon_factory(
            config(function_double, subject, {"type": "nats", "servers": [server.url], "subjects": [subject]})
        )
        async with connected(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1) as nc:
            for i in range(200):
                await nc.publish(subject, f"before-{i}".encode())
            await nc.flush()
            await wait_for(lambda: len(bodies(function_double)) == 200, 10, what="200 messages before")

            # A publisher keeps going while the server dies and comes back.
            published_during = 0

            async def publish_during() -> None:
                nonlocal published_during
                while True:
                    with contextlib.suppress(nats.errors.Error):
                        await nc.publish(subject, f"during-{published_during}".encode())
                        published_during += 1
                    await asyncio.sleep(0.002)

            publisher = asyncio.create_task(publish_during())
            await wait_for(lambda: published_during >= 100, 10, what="publishing under way")
            kill_9(server)
            await wait_ready_status(http, daemon, 503)
            server = start_nats_server(workdir, port=server.port)
            await wait_ready_status(http, daemon, 200)
            await wait_for(lambda: nc.is_connected, 10, what="the publisher to reconnect")
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)

            # Both sides are back: core NATS delivers again, every message.
            for i in range(200):
                await nc.publish(subject, f"after-{i}".encode())
            await nc.flush()

            def after_count() -> int:
                return sum(1 for body in bodies(function_double) if body.startswith("after-"))

            await wait_for(lambda: after_count() == 200, 15, what="200 messages after the restart")
        seen = bodies(function_double)
        during_seen = sum(1 for body in seen if body.startswith("during-"))
        duplicates = sum(n - 1 for n in seen.values())
        print(
            f"\ncore NATS kill -9: during the outage {published_during} published, {during_seen} delivered "
            f"(at-most-once); after: 200/200 delivered; duplicates: {duplicates}"
        )
        assert all(f"after-{i}" in seen for i in range(200)), "lost after the reconnection"
        assert duplicates == 0, "core NATS never redelivers"
        log = daemon.output()
        assert log.count("unreachable since") == 1 and log.count("reachable again") == 1, log
        assert "Traceback" not in log, log
    finally:
        server.stop()


async def test_jetstream_loses_nothing_across_kill_9_and_restart(
    tmp_path: Path,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
) -> None:
    workdir = tmp_path / "nats"
    server = start_nats_server(workdir)
    stream, subject = unique("RESTART"), unique("restart.js.")
    total = 3000
    # Slow enough that calls are in flight and acks are pending when the server dies.
    function_double.script("/fn", delay=0.002)
    source = {
        "type": "jetstream",
        "servers": [server.url],
        "stream": stream,
        "subjects": [subject],
        "create_stream": True,
        "ack_wait": "2s",
        "nak_delay": "100ms",
        "nak_delay_max": "500ms",
    }
    try:
        daemon = await daemon_factory(config(function_double, subject, source))
        async with connected(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1) as nc:
            js = nc.jetstream(timeout=1)
            acked = 0

            async def publish_all() -> None:
                """Publishes 0..total-1, each until the stream acknowledges it. Nats-Msg-Id lets
                the stream drop a retried publish whose first ack was lost."""
                nonlocal acked
                for i in range(total):
                    while True:
                        try:
                            await js.publish(subject, str(i).encode(), headers={"Nats-Msg-Id": str(i)})
                            break
                        except (nats.errors.Error, OSError):
                            await asyncio.sleep(0.05)
                    acked += 1

            publisher = asyncio.create_task(publish_all())
            await wait_for(lambda: len(bodies(function_double)) >= 500, 20, what="delivery under way")
            kill_9(server)  # mid-stream: publishing, calls in flight, acks on the way
            await wait_ready_status(http, daemon, 503)
            killed_at = acked
            server = start_nats_server(workdir, port=server.port)
            await wait_ready_status(http, daemon, 200)
            await asyncio.wait_for(publisher, 60)

            def missing() -> set[str]:
                return {str(i) for i in range(total)} - set(bodies(function_double))

            try:
                await wait_for(lambda: not missing(), 30, 0.1, f"all {total} messages")
            except TimeoutError:
                lost = sorted(missing(), key=int)
                pytest.fail(f"lost {len(lost)} message(s): {lost[:20]}...\n{daemon.output()[-4000:]}")
        seen = bodies(function_double)
        duplicates = sum(n - 1 for n in seen.values())
        print(
            f"\nJetStream kill -9 after {killed_at}/{total} published: lost 0, duplicates {duplicates} "
            f"(redeliveries of messages whose acks died with the server)"
        )
        log = daemon.output()
        assert "Traceback" not in log, log
        assert log.count("unreachable since") == 1 and log.count("reachable again") == 1, log
    finally:
        server.stop()
