"""The admin HTTP server (aiohttp) on ``[server] admin_listen``: ``/metrics`` (and health and
readiness) on a listener of its own, so operators can expose ``[server] listen`` — the ingress
server in the core, :mod:`fastconn.ingress` — without exposing metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from fastconn.conn_guard import ConnectionGuard, ServerLimits
from fastconn.metrics import Metrics
from fastconn.ratelimit import RateLimitedLog

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# A request line or header field longer than this is refused with 431/400 (aiohttp's 8 KiB
# default is kept explicit: it bounds what a slow client can make the server buffer).
_MAX_LINE_BYTES = 8190


class _MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (a line too long, a bad chunk size) at ERROR
    with a traceback: a client's mistake, repeatable at will. Those become one rate-limited
    line; every other error (a bug in a handler) keeps its traceback."""

    def __init__(self, log: logging.Logger) -> None:
        super().__init__()
        self._lines = RateLimitedLog(log, interval=10.0)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        self._lines.warning("malformed HTTP request from %s: %s", remote, exc.message or type(exc).__name__)
        return False


def _server_logger() -> logging.Logger:
    """The logger aiohttp's request handlers use, with the filter above (installed once)."""
    logger = logging.getLogger("fastconn.admin.http")
    if not any(isinstance(f, _MalformedRequests) for f in logger.filters):
        logger.addFilter(_MalformedRequests(logging.getLogger("fastconn.admin")))
    return logger


class AdminServer:
    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        is_ready: Callable[[], tuple[bool, str]],
        *,
        limits: ServerLimits | None = None,
    ) -> None:
        self.host, self.port = split_listen(listen)
        self.metrics = metrics
        self._is_ready = is_ready
        self.limits = limits or ServerLimits()
        self.guard = ConnectionGuard(self.limits)
        self.app = web.Application(middlewares=[self.guard.middleware])
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.limits.idle_timeout,
            max_line_size=_MAX_LINE_BYTES,
            max_field_size=_MAX_LINE_BYTES,
            logger=_server_logger(),
        )
        await self._runner.setup()
        handler_factory = self._runner.server
        if handler_factory is None:  # setup() creates it; checked for the type checker
            raise RuntimeError("aiohttp runner has no server after setup()")
        # Served by our own asyncio server rather than a site so every connection passes the
        # guard (header deadline, connection cap) before aiohttp sees it. Bound here so the
        # port picked for port 0 is known through the socket.
        sock = bind_listener(self.host, self.port)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self.guard.wrap(handler_factory), sock=sock)
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()  # stop accepting; open connections are shut down by the runner
            self._server = None
            self.guard.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, why = self._is_ready()
        return web.Response(status=200 if ready else 503, text=("ready" if ready else why) + "\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, resolved), with SO_REUSEADDR so a
    restart does not wait for TIME_WAIT connections to expire."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
