"""The blocking vSphere side: one pyvmomi session and its event collectors.

Everything here blocks (pyvmomi is synchronous): the source runs it on one worker thread of its
own, never on the event loop, and never two calls at once (a pyvmomi stub is not thread-safe).

Reading new events, so that the real vCenter and govmomi's simulator behave the same:

* the **tail**: each poll reads the newest matching event (a second collector with a one-event
  page); only when it is above the cursor key is the ``latestPage`` of the tail collector (the
  newest ``page_size`` matching events) read; events above the cursor key are new;
* a **gap** is possible when nothing on that page is at or below the cursor: more than a page
  arrived between two polls. Then (and after every login) a **catch-up** reads the events
  created since the cursor's time: one ``QueryEvents``, or, when that comes back full, a
  collector read forward to its end (``ReadNextEvents``) and destroyed.

Event keys grow on one vCenter; they restart when the server's event store does (a restored
vCenter, a simulator restart). :func:`keys_restarted` spots it, so the source does not skip
the new server's events as "already seen".
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from fastconn.sources.vcenter.config import VcenterConfig
from fastconn.sources.vcenter.events import created_time

__all__ = [
    "BadCertificate",
    "BadLogin",
    "Disconnected",
    "ServerInfo",
    "VcenterSession",
    "keys_restarted",
]

log = logging.getLogger("fastconn.source.vcenter")

T = TypeVar("T")

CLOCK_SLACK: Final = timedelta(seconds=2)
"""Catch-up reads start this long before the cursor's time: events are stamped by vCenter, and
one created in the same second as the cursor's must not fall outside the window (the keys drop
what was already seen)."""


class BadLogin(Exception):
    """vCenter refused the username/password (``InvalidLogin``)."""


class BadCertificate(Exception):
    """vCenter's TLS certificate is not trusted (``tls_ca`` or ``insecure`` needed)."""


class Disconnected(Exception):
    """The server is unreachable or the session is gone: log in again."""


@dataclass(frozen=True, slots=True)
class ServerInfo:
    instance: str
    """``about.instanceUuid``: part of every ``X-Message-Id``."""
    name: str
    """``about.fullName``, for the log."""
    newest_key: int
    """The newest event's key (any type), 0 when the server has none."""
    newest_time: datetime | None


def keys_restarted(page: Sequence[Any], cursor_key: int, cursor_time: datetime | None) -> bool:
    """Whether an event at or below the cursor key is newer than the cursor's time: the key was
    used again, so the server's event keys restarted."""
    if cursor_time is None:
        return False
    limit = cursor_time + CLOCK_SLACK
    return any(e.key <= cursor_key and created_time(e) > limit for e in page)


def _connection_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | http.client.HTTPException | socket.timeout | ssl.SSLError)


class VcenterSession:
    """One login and the tail collector. Every method blocks; :class:`Disconnected` means
    "log in again", :class:`BadLogin` "the credentials are wrong"."""

    def __init__(self, config: VcenterConfig, username: str, password: str) -> None:
        self.config = config
        self._username = username
        self._password = password
        self._si: Any = None
        self._content: Any = None
        self._tail: Any = None
        self._probe: Any = None

    # -- session ---------------------------------------------------------------------------

    def connect(self) -> ServerInfo:
        from pyVim import connect
        from pyVmomi import vim

        endpoint = self.config.endpoint
        extra: dict[str, Any] = {}
        if endpoint.protocol == "https":
            if self.config.insecure:
                extra["disableSslCertValidation"] = True
            else:
                extra["sslContext"] = ssl.create_default_context(cafile=self.config.tls_ca)
        try:
            self._si = connect.SmartConnect(
                protocol=endpoint.protocol,
                host=endpoint.host,
                port=endpoint.port,
                path=endpoint.path,
                user=self._username,
                pwd=self._password,
                httpConnectionTimeout=self.config.timeout,
                connectionPoolTimeout=-1,
                **extra,
            )
            self._content = self._si.RetrieveContent()
            self._tail = self._collector(self._filter(), self.config.page_size)
            self._probe = self._collector(self._filter(), 1)
            newest = self._newest()
        except vim.fault.InvalidLogin:
            self.close()
            raise BadLogin() from None
        except BaseException as exc:
            self.close()
            raise self._translate(exc) from exc
        return ServerInfo(
            str(self._content.about.instanceUuid),
            str(self._content.about.fullName),
            newest.key if newest is not None else 0,
            created_time(newest) if newest is not None else None,
        )

    def close(self) -> None:
        """Destroys the collector and logs out (best effort: the server may be gone)."""
        si, self._si, collectors = self._si, None, (self._tail, self._probe)
        self._tail = self._probe = None
        if si is None:
            return
        from pyVim import connect

        try:
            for collector in collectors:
                if collector is not None:
                    collector.DestroyCollector()
            connect.Disconnect(si)
        except Exception as exc:  # a dead server or session: nothing left to clean up
            log.debug("vcenter logout failed: %r", exc)

    # -- reading ---------------------------------------------------------------------------

    def newest_key(self) -> int:
        """The newest matching event's key (0: none): a one-event page, cheap to read (a page of
        ``page_size`` events costs pyvmomi about 0.4 ms per event to parse), so an idle poll
        reads one event, not a page."""

        def read() -> int:
            page = self._probe.latestPage or []
            return max((int(e.key) for e in page), default=0)

        return self._call(read)

    def latest_page(self) -> list[Any]:
        """The tail collector's page (newest ``page_size`` matching events), by key."""

        def read() -> list[Any]:
            return sorted(self._tail.latestPage or [], key=lambda e: e.key)

        return self._call(read)

    def read_since(self, since: datetime | None, after_key: int, window: int, limit: int) -> list[Any]:
        """The retained matching events above ``after_key`` created from ``since`` (minus the
        clock slack) on, oldest first, about ``limit`` at most (the rest on a later call).

        First one ``QueryEvents`` (the newest ``window`` matching events in one answer). When it
        comes back full there may be more than it holds: its answer is dropped and a collector
        is read forward from the oldest (``ReadNextEvents``) until its end or ``limit``, then
        destroyed, so what is returned has no hole. Not a collector first: govmomi's simulator
        evicts the oldest event of a fresh collector's page on every new event, so a burst
        arriving during the read would cost the very events being caught up."""
        from pyVmomi import vim

        def spec() -> Any:
            spec = self._filter()
            spec.maxCount = window
            if since is not None:
                spec.time = vim.event.EventFilterSpec.ByTime(beginTime=since - CLOCK_SLACK)
            return spec

        def read() -> list[Any]:
            answer = list(self._content.eventManager.QueryEvents(filter=spec()) or [])
            if len(answer) >= window:
                answer = []
                collector = self._collector(spec(), window)
                try:
                    while len(answer) < limit:
                        page = collector.ReadNextEvents(window)
                        if not page:
                            break
                        answer.extend(page)
                finally:
                    collector.DestroyCollector()
            found = {event.key: event for event in answer if event.key > after_key}
            return [found[k] for k in sorted(found)]

        return self._call(read)

    # -- internals -------------------------------------------------------------------------

    def _filter(self) -> Any:
        from pyVmomi import vim

        spec = vim.event.EventFilterSpec()
        if self.config.event_types:
            spec.eventTypeId = list(self.config.event_types)
        return spec

    def _collector(self, spec: Any, page_size: int) -> Any:
        # The page size goes in the filter as well: govmomi's simulator sizes the page from it
        # at creation (its SetCollectorPageSize re-slices the page wrongly when it shrinks);
        # vCenter takes SetCollectorPageSize, which with the same size changes nothing there.
        spec.maxCount = page_size
        collector = self._content.eventManager.CreateCollectorForEvents(filter=spec)
        collector.SetCollectorPageSize(page_size)
        return collector

    def _newest(self) -> Any:
        """The newest event of any type (a one-event page of an unfiltered collector)."""
        from pyVmomi import vim

        collector = self._collector(vim.event.EventFilterSpec(), 1)
        try:
            page = collector.latestPage or []
        finally:
            collector.DestroyCollector()
        return max(page, key=lambda e: e.key) if page else None

    def _call(self, job: Callable[[], T]) -> T:
        if self._si is None:
            raise Disconnected("not logged in")
        try:
            return job()
        except BaseException as exc:
            raise self._translate(exc) from exc

    @staticmethod
    def _translate(exc: BaseException) -> BaseException:
        """vSphere faults and socket errors → :class:`Disconnected` (log in again); anything
        else is a bug or an unexpected answer and stays what it is."""
        from pyVmomi import vim, vmodl

        if isinstance(exc, Disconnected | BadLogin | BadCertificate):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            return BadCertificate(exc.verify_message or str(exc))
        if isinstance(exc, vim.fault.NotAuthenticated):
            return Disconnected("session expired or vCenter restarted (NotAuthenticated)")
        if _connection_error(exc):
            return Disconnected(_describe(exc))
        if isinstance(exc, vmodl.MethodFault):
            return Disconnected(f"vCenter fault {exc._wsdlName}: {getattr(exc, 'msg', '') or ''}".strip())
        return exc


def _describe(exc: BaseException) -> str:
    from fastconn.health import describe_error

    return describe_error(exc)
