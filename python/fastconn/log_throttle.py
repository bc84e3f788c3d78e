"""Rate limits for chatty third-party loggers.

aiokafka logs an ERROR line for every failed connection attempt of every connection it keeps
(about 66 lines a second while a broker is down): the one line that matters, that the broker
is unreachable, drowns. :class:`ThrottleFilter` lets one warning-or-worse record of a logger
family through per interval and says on that line how many it held back. Records below WARNING
pass untouched (they are rare, and filtered by level anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["THROTTLED_LOGGERS", "ThrottleFilter"]

THROTTLED_LOGGERS: tuple[str, ...] = ("aiokafka",)
"""Logger families throttled by :func:`fastconn.logs.setup_logging`."""


class ThrottleFilter(logging.Filter):
    """A handler filter: at most one WARNING+ record of ``family`` (the logger and its children)
    per ``interval`` seconds."""

    def __init__(
        self, family: str, interval: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._family = family
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _in_family(record.name, self._family):
            return True
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._held_back += 1
            return False
        self._last = now
        held_back, self._held_back = self._held_back, 0
        if held_back:
            # Rewrite the message once (args merged) so every formatter shows the count.
            record.msg = (
                f"{record.getMessage()} ({held_back} more {self._family} line(s) held back "
                f"in the last {self._interval:g}s)"
            )
            record.args = None
        return True


def _in_family(name: str, family: str) -> bool:
    return name == family or name.startswith(family + ".")
