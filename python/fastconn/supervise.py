"""Supervised background tasks: none stops silently.

A task that dies with an exception is logged once with its traceback, counted in
``fastconn_task_restarts_total{task=...}`` and started again after a backoff doubling per
death in a row. After ``failing_after`` deaths in a row the task is *failing*: the daemon's
``/readyz`` answers 503 naming it, until a run of it lasts ``healthy_after`` seconds. A task
that returns has finished its work (e.g. a loop that ends at shutdown) and is not restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastconn.backoff import doubling

__all__ = ["Job", "Supervisor"]

log = logging.getLogger("fastconn.supervise")

Job = Callable[[], Coroutine[Any, Any, None]]
"""What a supervised task runs: called again for each restart."""


class Supervisor:
    def __init__(
        self,
        restarts: Any = None,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        failing_after: int = 5,
        healthy_after: float = 60.0,
    ) -> None:
        """``restarts``: a counter labelled ``task`` (``Metrics.task_restarts``), or None."""
        self._restarts = restarts
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._failing_after = failing_after
        self._healthy_after = healthy_after
        self._failing: dict[str, str] = {}

    @property
    def failing(self) -> dict[str, str]:
        """Tasks that keep dying: name → their last error."""
        return dict(self._failing)

    def spawn(self, name: str, job: Job) -> asyncio.Task[None]:
        """Runs ``job()`` under supervision as task ``name`` (e.g. ``"kafka.intake"``).
        Cancelling the returned task stops it for good."""
        return asyncio.get_running_loop().create_task(self._supervise(name, job), name=f"fastconn-{name}")

    async def _supervise(self, name: str, job: Job) -> None:
        loop = asyncio.get_running_loop()
        deaths = 0
        while True:
            started = time.monotonic()
            healthy = loop.call_later(self._healthy_after, self._recovered, name)
            try:
                await job()
            except Exception as exc:
                if time.monotonic() - started >= self._healthy_after:
                    deaths = 0
                deaths += 1
                self._died(name, exc, deaths)
            else:
                log.debug("task %s finished", name)
                return
            finally:
                healthy.cancel()
            await asyncio.sleep(doubling(deaths, self._backoff_initial, self._backoff_max))

    def _died(self, name: str, exc: Exception, deaths: int) -> None:
        if self._restarts is not None:
            self._restarts.labels(task=name).inc()
        delay = doubling(deaths, self._backoff_initial, self._backoff_max)
        log.error("task %s died (%d in a row); restarting it in %.1fs", name, deaths, delay, exc_info=exc)
        if deaths >= self._failing_after and name not in self._failing:
            self._failing[name] = f"{type(exc).__name__}: {exc}"
            log.error(
                "task %s keeps dying: the daemon reports not ready until it runs for %.0fs",
                name,
                self._healthy_after,
            )

    def _recovered(self, name: str) -> None:
        if self._failing.pop(name, None) is not None:
            log.info("task %s runs again: ready as far as it is concerned", name)
