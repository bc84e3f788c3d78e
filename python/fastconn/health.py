"""Connection health of a source: what ``/readyz`` reports and what the log says, once.

A source with a broker connection keeps a :class:`ConnectionHealth` and calls it from its
client's connection events:

* ``lost()`` when an established connection drops (the client starts reconnecting);
* ``failing(reason)`` on every failed (re)connection attempt: the first one logs
  ``source X: nats://host:4222 unreachable since 12:00:03 (connection refused)``, later ones
  only refresh the reason (a client retrying every second must not write a line per retry);
* ``restored()`` when connected again: one line saying so and for how long it was down.

``health()`` returns a :class:`SourceHealth` for the daemon's readiness, which turns not-ready
once a source has been down longer than ``[server] readiness_grace``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ConnectionHealth", "SourceHealth", "describe_error", "display_servers"]


class SourceHealth(NamedTuple):
    """A source's connection state: ``ok``; when not, ``reason`` says what is down (one line,
    no secrets) and ``since`` since when (``time.time()``)."""

    ok: bool
    reason: str = ""
    since: float = 0.0


HEALTHY = SourceHealth(True)


def clock_text(when: float) -> str:
    """``12:00:03``: the time of day (UTC, as the log's timestamps in a container)."""
    return time.strftime("%H:%M:%S", time.gmtime(when))


def describe_error(exc: BaseException) -> str:
    """A short, lower-case reason for a failed connection: ``connection refused``."""
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).strip().strip("'\"").lower()
    return text or type(exc).__name__


def display_servers(servers: Iterable[str]) -> str:
    """Server URLs for a log line, without credentials (``nats://user:pw@host`` -> ``nats://host``)."""
    shown = []
    for server in servers:
        parts = urlsplit(server)
        if parts.username is not None or parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            shown.append(urlunsplit(parts._replace(netloc=host)))
        else:
            shown.append(server)
    return ", ".join(shown)


class ConnectionHealth:
    """One source's connection, tracked from its client's events; see the module docstring."""

    def __init__(
        self, source: str, target: str, log: logging.Logger, clock: Callable[[], float] = time.time
    ) -> None:
        self._source = source
        self._target = target
        self._log = log
        self._clock = clock
        self._ok = True
        self._since = 0.0
        self._reason = ""
        self._reported = False

    def health(self) -> SourceHealth:
        if self._ok:
            return HEALTHY
        return SourceHealth(False, f"{self._target} unreachable ({self._reason})", self._since)

    def lost(self) -> None:
        """An established connection dropped; reported at the first failed reconnection (with
        its reason), or as a short interruption when ``restored`` comes first."""
        if self._ok:
            self._ok, self._since, self._reported = False, self._clock(), False
            self._reason = "connection lost"

    def failing(self, reason: str) -> None:
        """A (re)connection attempt failed because of ``reason``."""
        if self._ok:
            self._ok, self._since, self._reported = False, self._clock(), False
        self._reason = reason
        if not self._reported:
            self._reported = True
            self._log.warning(
                "source %s: %s unreachable since %s (%s)",
                self._source,
                self._target,
                clock_text(self._since),
                reason,
            )

    def restored(self) -> None:
        """Connected again."""
        if self._ok:
            return
        down_for = max(0.0, self._clock() - self._since)
        if self._reported:
            self._log.info(
                "source %s: %s reachable again (down for %.1fs)", self._source, self._target, down_for
            )
        else:
            self._log.info(
                "source %s: connection to %s lost at %s, restored after %.1fs",
                self._source,
                self._target,
                clock_text(self._since),
                down_for,
            )
        self._ok, self._reported = True, False
