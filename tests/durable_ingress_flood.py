"""What the durable-ingress tests share, whatever the store (a JetStream stream, a Kafka topic):
the message ids a function was called with, and the kill -9 flood: a webhook daemon with a
store killed while eight senders flood it, restarted, and every event that got a 202 awaited."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from fastconn.testing import FunctionDouble, wait_for

if TYPE_CHECKING:
    from conftest import DaemonFactory

SENDERS = 8
EVENTS_PER_SENDER = 2000
KILL_AFTER = 1500
"""202s before the kill: most accepted events are then only in the store."""


def message_ids(fn: FunctionDouble, path: str) -> Counter[str]:
    """How many calls to ``path`` carried each ``X-Message-Id``."""
    return Counter(c.headers.get("X-Message-Id", "") for c in fn.calls_to(path))


@dataclass
class Flood:
    """What a kill -9 flood left: every accepted event was delivered after the restart."""

    accepted: set[str]
    """Ids of the events that got a 202."""
    refused: int
    seen_before: set[str]
    """Ids the function had been called with by the time of the kill."""
    delivered: Counter[str]

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.delivered.values())


async def kill_9_during_a_flood(
    store: str,
    config: dict[str, Any],
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
    *,
    delivery_timeout: float,
) -> Flood:
    """Floods ``POST /webhook/orders`` of a daemon whose webhook stores its events in ``store``
    (named in the failure and the summary line), kills it -9 mid-flood, starts a replica with
    the same ``config`` and waits up to ``delivery_timeout`` for every event that got a 202 to
    reach ``/orders``; a missing one fails the test. ``/orders`` should be slower than the flood,
    so that the kill catches accepted events that are only in the store."""
    daemon = await daemon_factory(config)
    accepted: set[str] = set()
    refused = 0

    async def sender(url: str, n: int) -> None:
        nonlocal refused
        for i in range(n):
            try:
                async with http.post(f"{url}/webhook/orders", data=f"{i}".encode()) as r:
                    if r.status == 202:
                        accepted.add(r.headers["X-Message-Id"])
                    else:
                        refused += 1
            except aiohttp.ClientError:
                return  # the daemon died under this connection

    senders = [asyncio.create_task(sender(daemon.url, EVENTS_PER_SENDER)) for _ in range(SENDERS)]
    await wait_for(lambda: len(accepted) >= KILL_AFTER, 60, what="the flood under way")
    daemon.kill()
    for task in senders:
        with contextlib.suppress(Exception):
            await task
    killed_with = len(accepted)
    seen_before = set(message_ids(function_double, "/orders"))
    await daemon_factory(config)  # the restarted replica dispatches what the store holds

    def missing() -> set[str]:
        return accepted - set(message_ids(function_double, "/orders"))

    try:
        await wait_for(lambda: not missing(), delivery_timeout, 0.1, f"all {killed_with} accepted events")
    except TimeoutError:
        pytest.fail(f"lost {len(missing())} of {killed_with} events that got a 202 ({store})")
    flood = Flood(accepted, refused, seen_before, message_ids(function_double, "/orders"))
    print(
        f"\ndurable ingress ({store}), kill -9 after {killed_with} 202s ({len(seen_before)} calls "
        f"started by then): lost 0, duplicates {flood.duplicates}, refused {refused}"
    )
    return flood
