"""Pushbullet's realtime stream: one websocket, ``nop`` keep-alives, ``tickle`` and ephemeral
``push`` frames. The stream carries no stored pushes: a ``push`` tickle only says "sync now".

The socket counts as dead when no frame came for ``keepalive_timeout`` (nops stopped) or when
it closes; it is opened again with doubling backoff, and every (re)connection asks for a sync,
since tickles sent while disconnected are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from fastconn.backoff import doubling
from fastconn.health import ConnectionHealth, describe_error

__all__ = ["StreamFollower"]

log = logging.getLogger("fastconn.source.pushbullet")


class StreamFollower:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        health: ConnectionHealth,
        keepalive_timeout: float,
        reconnect_initial: float,
        reconnect_max: float,
        on_sync: Callable[[], None],
        on_ephemeral: Callable[[dict[str, Any]], None],
    ) -> None:
        self._url = url.rstrip("/") + "/" + token
        self._token = token
        self.display = urlsplit(url).netloc or url
        """Where the stream is, for logs (the token is in the URL path: never logged)."""
        self._health = health
        self._keepalive = keepalive_timeout
        self._reconnect = (reconnect_initial, reconnect_max)
        self._on_sync = on_sync
        self._on_ephemeral = on_ephemeral
        self.connections = 0
        self.keepalive_timeouts = 0
        self.token_refused = False

    async def run(self) -> None:
        """Follows the stream until cancelled."""
        failures = 0
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    ws = await session.ws_connect(self._url, heartbeat=None, autoping=True)
                except aiohttp.WSServerHandshakeError as exc:
                    failures += 1
                    # The exception's text holds the URL, token included: only the status is used.
                    if exc.status in (401, 403):
                        self.token_refused = True
                        reason = f"HTTP {exc.status}: the access token was refused"
                    else:
                        reason = f"HTTP {exc.status}"
                    self._health.failing(reason)
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    failures += 1
                    # An invalid URL's text is the URL itself, token included.
                    self._health.failing(self._redact(describe_error(exc)))
                else:
                    failures = 0
                    self.connections += 1
                    self._health.restored()
                    self._on_sync()
                    try:
                        await self._follow(ws)
                    finally:
                        with contextlib.suppress(Exception):
                            await ws.close()
                    self._health.lost()
                await asyncio.sleep(doubling(max(failures, 1), *self._reconnect))

    async def _follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            try:
                frame = await ws.receive(timeout=self._keepalive)
            except TimeoutError:
                self.keepalive_timeouts += 1
                log.warning(
                    "pushbullet stream %s: no frame (nop) for %.1fs: reconnecting",
                    self.display,
                    self._keepalive,
                )
                return
            if frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                log.info("pushbullet stream %s closed by the server: reconnecting", self.display)
                return
            if frame.type is aiohttp.WSMsgType.ERROR:
                reason = self._redact(repr(ws.exception()))
                log.warning("pushbullet stream %s failed (%s): reconnecting", self.display, reason)
                return
            if frame.type is aiohttp.WSMsgType.TEXT:
                self._handle(frame.data)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***")

    def _handle(self, text: str) -> None:
        try:
            data = json.loads(text)
        except ValueError:
            log.warning("pushbullet stream %s: a frame that is not JSON was ignored", self.display)
            return
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        if kind == "tickle" and data.get("subtype") == "push":
            self._on_sync()
        elif kind == "push" and isinstance(data.get("push"), dict):
            self._on_ephemeral(data["push"])
        # "nop" only proves the socket is alive; device tickles do not concern pushes.
