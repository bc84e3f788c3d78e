"""A stop signal while sources are still connecting: the daemon exits at once and cleanly,
not after the connect retries give up (Kubernetes kills a pod that ignores SIGTERM for 30 s)."""

from __future__ import annotations

import signal
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from fastconn.testing import FunctionDouble, free_port, wait_for

if TYPE_CHECKING:
    from conftest import DaemonFactory

NATS_SOURCES: dict[str, dict[str, Any]] = {
    "nats": {"type": "nats", "subjects": ["orders"]},
    "jetstream": {"type": "jetstream", "stream": "ORDERS", "subjects": ["orders"]},
}


@pytest.mark.parametrize("kind", list(NATS_SOURCES))
async def test_sigterm_while_the_broker_is_unreachable_exits_promptly(
    kind: str, daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    closed = f"nats://127.0.0.1:{free_port()}"  # nothing listens: connect retries for connect_wait
    source = {**NATS_SOURCES[kind], "servers": [closed], "connect_wait": "60s", "reconnect_wait": "200ms"}
    config = {
        "dispatch": {"shutdown_timeout": "5s"},
        "functions": [{"name": "f", "url": function_double.url("/f"), "topics": ["orders"]}],
        "sources": [source],
    }
    daemon = await daemon_factory(config, wait="health")
    # Start-up is under way: the source has tried (and failed) to connect at least once.
    await wait_for(lambda: "connecting to NATS failed" in daemon.output(), 10, what="a failed connect")
    async with http.get(daemon.url + "/readyz") as r:
        assert r.status == 503, "not ready while a source is still starting"
    started = time.monotonic()
    assert await daemon.stop(signal.SIGTERM, timeout=10) == 0, daemon.output()
    assert time.monotonic() - started < 3, f"SIGTERM took {time.monotonic() - started:.1f}s"
    log = daemon.output()
    assert "Traceback" not in log and " ERROR " not in log, log
    assert "fastconn stopped" in log
