"""Function failures are logged at the default level, aggregated per function (real calls to a
function double through the dispatcher and the daemon)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import aiohttp

from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Message, Outcome
from fastconn.failure_log import FunctionFailureLog
from fastconn.testing import FunctionDouble, wait_for

if TYPE_CHECKING:
    from conftest import DaemonFactory


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        assert record.levelno == logging.WARNING
        self.lines.append(record.getMessage())

    def about(self, function: str) -> list[str]:
        return [line for line in self.lines if line.startswith(f"function {function}")]


def counted(lines: list[str]) -> int:
    """Failures the lines account for: one per "failed" line, N per aggregated line."""
    total = 0
    for line in lines:
        match = re.search(r": (\d+) failure\(s\) in the last", line)
        total += int(match.group(1)) if match else 1
    return total


async def test_failures_are_logged_once_then_aggregated_per_function(function_double: FunctionDouble) -> None:
    logger = logging.getLogger("test.failure_log")
    logger.propagate = False
    handler = Lines()
    logger.addHandler(handler)
    function_double.script("/bad", [500])
    function_double.script("/slow", [200], delay=2.0)
    failure_log = FunctionFailureLog(logger, interval=0.5)
    try:
        async with Dispatcher(DispatchOptions(max_attempts=1, max_inflight=64)) as dispatcher:
            dispatcher.set_functions(
                [
                    FunctionTarget("bad", ("b",), function_double.url("/bad")),
                    FunctionTarget("slow", ("s",), function_double.url("/slow"), timeout=0.1),
                    FunctionTarget("good", ("g",), function_double.url("/good")),
                ]
            )
            dispatcher.add_observer(failure_log)
            outcomes: list[Outcome] = []
            messages = [Message("b", b"%d" % i) for i in range(30)] + [Message("s", b"x") for _ in range(6)]
            await dispatcher.submit(messages + [Message("g", b"ok") for _ in range(10)], outcomes.extend)
            await wait_for(lambda: len(outcomes) == 46, 10, what="every outcome")
            await wait_for(
                lambda: counted(handler.about("bad")) == 30 and counted(handler.about("slow")) == 6,
                5,
                what="every failure accounted for in the log",
            )
    finally:
        failure_log.flush()
        logger.removeHandler(handler)
    bad, slow = handler.about("bad"), handler.about("slow")
    assert handler.about("good") == []
    assert len(bad) <= 3 and len(slow) <= 3, handler.lines
    assert bad[0].startswith("function bad failed: message ") and "500 after 1 attempt(s)" in bad[0]
    assert any("failure(s) in the last 0.5s (500: " in line for line in bad), bad
    assert all("timeout" in line for line in slow), slow


async def test_the_daemon_logs_function_failures_at_the_default_level(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    function_double.script("/echo", [500])
    config = {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t"]}],
        "dispatch": {"max_attempts": 1},
        "sources": [{"type": "webhook"}],
    }
    daemon = await daemon_factory(config)
    for _ in range(20):
        async with http.post(f"{daemon.url}/webhook/t", data=b"x") as r:
            assert r.status == 202

    async def all_failed() -> bool:
        return (await daemon.metrics()).get('fastconn_messages_failed_total{source="webhook"}', 0) == 20

    await wait_for(all_failed, 10, what="20 failed messages")
    assert await daemon.stop() == 0
    lines = [line for line in daemon.output().splitlines() if "function echo" in line]
    assert len(lines) == 2, lines
    assert "WARNING" in lines[0] and "function echo failed: message" in lines[0]
    assert "function echo: 19 failure(s) in the last 10s (500: 19); last: message" in lines[1]


async def test_every_attempt_is_counted_by_status(
    daemon_factory: DaemonFactory, http: aiohttp.ClientSession, function_double: FunctionDouble
) -> None:
    """fastconn_invocations_total counts final results only: a 503 retried into a 200 shows in
    fastconn_attempts_total."""
    function_double.script("/echo", [503, 503, 200])
    config = {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t"]}],
        "dispatch": {"max_attempts": 5, "backoff_initial": "10ms", "backoff_max": "20ms"},
        "sources": [{"type": "webhook"}],
    }
    daemon = await daemon_factory(config)
    async with http.post(f"{daemon.url}/webhook/t?wait=true", data=b"x") as r:
        assert r.status == 200
    samples = await daemon.metrics()
    assert samples['fastconn_invocations_total{function="echo",status="200"}'] == 1
    assert 'fastconn_invocations_total{function="echo",status="503"}' not in samples
    assert samples['fastconn_attempts_total{function="echo",status="503"}'] == 2
    assert samples['fastconn_attempts_total{function="echo",status="200"}'] == 1
