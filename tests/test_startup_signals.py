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


def unreachable_source(kind: str) -> tuple[dict[str, Any], str]:
    """A source of ``kind`` whose broker port is closed (start-up retries for a minute), and
    the log fragment of a failed attempt."""
    port = free_port()  # nothing listens there
    nats = {"servers": [f"nats://127.0.0.1:{port}"], "connect_wait": "60s", "reconnect_wait": "200ms"}
    sources = {
        "nats": ({"type": "nats", "subjects": ["orders"], **nats}, "connecting to NATS failed"),
        "jetstream": (
            {"type": "jetstream", "stream": "ORDERS", "subjects": ["orders"], **nats},
            "connecting to NATS failed",
        ),
        "kafka": (
            {
                "type": "kafka",
                "brokers": [f"127.0.0.1:{port}"],
                "topics": ["orders"],
                "startup_timeout": "60s",
            },
            "cannot connect yet",
        ),
    }
    return sources[kind]


@pytest.mark.parametrize("kind", ["nats", "jetstream", "kafka"])
async def test_sigterm_while_the_broker_is_unreachable_exits_promptly(
    kind: str, daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    source, failed_attempt = unreachable_source(kind)
    config = {
        "dispatch": {"shutdown_timeout": "5s"},
        "functions": [{"name": "f", "url": function_double.url("/f"), "topics": ["orders"]}],
        "sources": [source],
    }
    daemon = await daemon_factory(config, wait="health")
    # Start-up is under way: the source has tried (and failed) to connect at least once.
    await wait_for(lambda: failed_attempt in daemon.output(), 10, what="a failed connect")
    async with http.get(daemon.url + "/readyz") as r:
        assert r.status == 503, "not ready while a source is still starting"
    started = time.monotonic()
    assert await daemon.stop(signal.SIGTERM, timeout=10) == 0, daemon.output()
    assert time.monotonic() - started < 3, f"SIGTERM took {time.monotonic() - started:.1f}s"
    log = daemon.output()
    assert "Traceback" not in log, log
    # aiokafka's own ERROR line for the refused connection is expected (once: throttled).
    assert not [line for line in log.splitlines() if " ERROR " in line and " aiokafka:" not in line], log
    assert "fastconn stopped" in log
