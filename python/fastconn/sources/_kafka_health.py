"""Broker connection health for a Kafka source (a private helper module, not a source type).

aiokafka reports no connection events a source could follow (it logs, and retries inside),
so the state is probed: a cluster-metadata request every ``interval`` seconds, answered by
any broker of the cluster, tells whether the cluster is reachable. The result feeds a
:class:`~fastconn.health.ConnectionHealth`, which logs an outage once when it starts and
once when it ends, and which the source's ``health()`` returns for ``/readyz``.

Wiring, in the Kafka source::

    self._health = ConnectionHealth(self.name, ", ".join(config.brokers), log)   # __init__
    self._probe = MetadataProbe(self._health, consumer.topics)                  # start(), once started
    self._probe.start()
    await self._probe.stop()                                                     # close()

    def health(self) -> SourceHealth:
        return self._health.health()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from fastconn.health import ConnectionHealth, describe_error

__all__ = ["MetadataProbe"]


class MetadataProbe:
    """Asks for cluster metadata every ``interval`` seconds (each ask bounded by ``timeout``)
    and reports the outcome to ``health``."""

    def __init__(
        self,
        health: ConnectionHealth,
        fetch_metadata: Callable[[], Awaitable[object]],
        *,
        interval: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        self._health = health
        self._fetch_metadata = fetch_metadata
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="fastconn-kafka-health")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def probe_once(self) -> None:
        try:
            await asyncio.wait_for(self._fetch_metadata(), self._timeout)
        except TimeoutError:
            self._health.failing(f"no metadata within {self._timeout:g}s")
        except Exception as exc:
            # Any failure of the request means "not reachable now"; the reason goes in the log.
            self._health.failing(describe_error(exc))
        else:
            self._health.restored()

    async def _run(self) -> None:
        while True:
            await self.probe_once()
            await asyncio.sleep(self._interval)
