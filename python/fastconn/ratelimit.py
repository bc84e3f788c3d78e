"""Log lines for events that can come in storms (slow consumers, malformed requests, failing
functions): counted, and written at most once per interval."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """Counts occurrences and logs at most once per ``interval`` with the count since the
    last line (slow-consumer storms must not flood the log)."""

    def __init__(self, log: logging.Logger, interval: float = 5.0) -> None:
        self._log = log
        self._interval = interval
        self._last = -interval
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last = now
        if suppressed:
            self._log.warning(message + " (and %d more since the last report)", *args, suppressed)
        else:
            self._log.warning(message, *args)
