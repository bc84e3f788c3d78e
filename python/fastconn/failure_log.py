"""Function failures in the log, aggregated: an outcome observer (``Dispatcher.add_observer``).

A failing function (500s, timeouts, garbage answers) must show up at the default log level, but
a function failing 1,000 times a second must not write 1,000 lines. Per function, the first
failure after a quiet period is logged at once; the ones that follow are counted for
``interval`` seconds and reported as one line::

    function resize: 37 failures in the last 10s (500: 30, timeout: 7); last: message 5f2c… on
    images.new: 500 after 3 attempt(s): b'out of memory'

Successful outcomes cost one attribute check.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastconn.message import Outcome, TargetResult

__all__ = ["FunctionFailureLog"]

_BODY_EXCERPT = 200


@dataclass(slots=True)
class _Window:
    failures: Counter[str] = field(default_factory=Counter)
    last: str = ""
    timer: asyncio.TimerHandle | None = None


class FunctionFailureLog:
    """Call it with outcomes (it is an ``OutcomeCallback``) on the event loop."""

    def __init__(self, log: logging.Logger | None = None, interval: float = 10.0) -> None:
        self._log = log or logging.getLogger("fastconn.functions")
        self._interval = interval
        # One entry per function that failed recently: bounded by the function table.
        self._windows: dict[str, _Window] = {}

    def __call__(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.ok:
                continue
            for result in outcome.results:
                if not result.ok:
                    self._failed(outcome, result)

    def flush(self) -> None:
        """Reports what is counted and not yet logged (at shutdown)."""
        for function in list(self._windows):
            window = self._windows.pop(function)
            if window.timer is not None:
                window.timer.cancel()
            self._report(function, window)

    def _failed(self, outcome: Outcome, result: TargetResult) -> None:
        last = _describe(outcome, result)
        window = self._windows.get(result.function)
        if window is None:
            # The first failure after a quiet period: say so now, then count for a while.
            self._log.warning("function %s failed: %s", result.function, last)
            window = self._windows[result.function] = _Window()
            self._schedule(result.function, window)
            return
        window.failures[result.status_label] += 1
        window.last = last

    def _schedule(self, function: str, window: _Window) -> None:
        loop = asyncio.get_running_loop()
        window.timer = loop.call_later(self._interval, self._window_closed, function)

    def _window_closed(self, function: str) -> None:
        window = self._windows.get(function)
        if window is None:
            return
        if not window.failures:
            del self._windows[function]  # quiet: the next failure is logged at once again
            return
        self._report(function, window)
        self._windows[function] = fresh = _Window()
        self._schedule(function, fresh)

    def _report(self, function: str, window: _Window) -> None:
        total = sum(window.failures.values())
        if not total:
            return
        kinds = ", ".join(f"{label}: {n}" for label, n in window.failures.most_common())
        self._log.warning(
            "function %s: %d failure(s) in the last %gs (%s); last: %s",
            function,
            total,
            self._interval,
            kinds,
            window.last,
        )


def _describe(outcome: Outcome, result: TargetResult) -> str:
    text = (
        f"message {outcome.message_id} on {outcome.message.topic}: {result.status_label} "
        f"after {result.attempts} attempt(s)"
    )
    if result.body:
        text += f": {result.body[:_BODY_EXCERPT]!r}"
    return text
