"""The admin HTTP server: health, readiness, metrics, and whatever routes sources add
(``/webhook/<topic>``, async callbacks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from fastconn.metrics import Metrics

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminServer:
    def __init__(self, listen: str, metrics: Metrics, is_ready: Callable[[], tuple[bool, str]]) -> None:
        self.host, self.port = split_listen(listen)
        self.metrics = metrics
        self._is_ready = is_ready
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            # The runner's public list of bound addresses: (host, port[, ...]) per socket.
            addresses: list[Any] = list(self._runner.addresses)
            if addresses:
                self.port = int(addresses[0][1])

    async def stop(self) -> None:
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


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)
