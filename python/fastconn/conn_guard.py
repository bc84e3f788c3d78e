"""Connection limits of the aiohttp admin server (``[server] admin_listen``) that aiohttp does
not offer: a deadline for the first request head and a cap on open connections. (The ingress
server on ``[server] listen`` has the same limits in the core: ``rust/core/src/ingress/conns.rs``.)

aiohttp's public knobs cover the rest (``keepalive_timeout`` closes idle keep-alive connections,
``max_line_size`` / ``max_field_size`` bound the head's size), but its one timer is the keep-alive
timer: a client that connects and trickles a request line ("slowloris") holds a socket until it
fires, and nothing bounds how many such sockets pile up. Hence this guard, which sits between the
listening socket and aiohttp's per-connection protocol:

* every connection gets ``header_timeout`` to deliver its first request head (the app's
  middleware reports the head, see :meth:`ConnectionGuard.middleware`); late ones are closed;
* at ``max_connections`` a new connection evicts the oldest one still waiting for its first head
  (the kind an attacker opens by the thousand), else the oldest idle keep-alive connection, so
  health probes and real senders keep getting in; when every connection is busy with a request,
  the new one is closed at once instead.
  Closing (rather than not accepting) keeps the kernel's accept queue from filling with sockets
  nobody will serve, and frees the file descriptor immediately.

The wrapping of aiohttp's protocol (:class:`_GuardedProtocol`) is the one place that depends on
how aiohttp's ``RequestHandler`` talks to asyncio; tests/test_admin_limits.py fails if aiohttp
grows a protocol callback that is not forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

__all__ = ["FORWARDED_CALLBACKS", "ConnectionGuard", "ServerLimits"]

log = logging.getLogger("fastconn.admin")

FORWARDED_CALLBACKS: Final = frozenset(
    {"connection_made", "connection_lost", "data_received", "eof_received", "pause_writing", "resume_writing"}
)
"""The asyncio protocol callbacks :class:`_GuardedProtocol` passes on to aiohttp."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """``[server]`` limits of the admin/ingress server (see the README's ``[server]`` table)."""

    header_timeout: float = 10.0
    """Seconds a new connection has to deliver its first request head."""
    idle_timeout: float = 75.0
    """Seconds an idle keep-alive connection stays open (aiohttp's ``keepalive_timeout``)."""
    max_connections: int = 1024
    """Open connections; beyond it the oldest connection still waiting for its first head (else
    the oldest idle keep-alive one) is closed."""


class ConnectionGuard:
    """Tracks the server's connections; see the module docstring."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._open: set[asyncio.BaseTransport] = set()
        # Eviction candidates, oldest first: connections that have not delivered their first
        # request head yet (with their deadline), then idle keep-alive connections.
        self._waiting: OrderedDict[asyncio.BaseTransport, asyncio.TimerHandle] = OrderedDict()
        self._idle: OrderedDict[asyncio.BaseTransport, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` around aiohttp's (``runner.server``)."""
        return lambda: _GuardedProtocol(self, factory())

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Runs once aiohttp has parsed a request head: the connection is busy until the handler
        returns, then idle (evictable at the cap) until its next request."""
        transport = request.transport
        if transport is None:
            return await handler(request)
        self._busy(transport)
        try:
            return await handler(request)
        finally:
            if transport in self._open:
                self._idle[transport] = None

    def close(self) -> None:
        """Cancels the pending header deadlines (the server is shutting down)."""
        for timer in self._waiting.values():
            timer.cancel()
        self._waiting.clear()
        self._idle.clear()

    # -- bookkeeping, called by _GuardedProtocol ---------------------------------------------

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        if len(self._open) >= self.limits.max_connections:
            victim = self._eviction_candidate()
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            self._close(victim)
        self._open.add(transport)
        loop = asyncio.get_running_loop()
        self._waiting[transport] = loop.call_later(self.limits.header_timeout, self._expire, transport)
        return True

    def _eviction_candidate(self) -> asyncio.BaseTransport | None:
        if self._waiting:
            return next(iter(self._waiting))
        for transport in self._idle:
            # A response still being written is not idle yet.
            if not isinstance(transport, asyncio.WriteTransport) or not transport.get_write_buffer_size():
                return transport
        return None

    def _busy(self, transport: asyncio.BaseTransport) -> None:
        timer = self._waiting.pop(transport, None)
        if timer is not None:
            timer.cancel()
        self._idle.pop(transport, None)

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        if transport in self._waiting:
            self.timed_out += 1
            self._close(transport)

    def _close(self, transport: asyncio.BaseTransport) -> None:
        # abort, not close: a peer that does not read must not keep the socket in the close handshake.
        self._forget(transport)
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()

    def _forget(self, transport: asyncio.BaseTransport) -> None:
        self._busy(transport)
        self._open.discard(transport)


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, admitted (or not) by the guard. Every callback in
    :data:`FORWARDED_CALLBACKS` is passed on unchanged."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._guard._admit(transport):
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            return
        self._transport = transport
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return  # refused: aiohttp never saw it
        self._guard._forget(self._transport)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._transport is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._transport is not None else None

    def pause_writing(self) -> None:
        if self._transport is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._inner.resume_writing()
