"""LISTEN/NOTIFY mode: each notification's payload to the functions subscribed to its channel.

At most once by nature: PostgreSQL does not store notifications, so those sent while fastconn is
disconnected are gone, and a function failure is final (counted, logged). The connection is
re-established and every channel LISTENed again after it drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import asyncpg

from fastconn.backoff import doubling
from fastconn.errors import DispatcherClosed
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome
from fastconn.redact import redact_text
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.postgres import server
from fastconn.sources.postgres.config import PostgresConfig, read_dsn

__all__ = ["NotifySource"]

log = logging.getLogger("fastconn.source.postgres")

_QUEUE_LIMIT: Final = 10_000
"""Notifications waiting for the dispatcher; beyond it the oldest are dropped (counted): NOTIFY
cannot be paused, and an unbounded queue would grow without limit."""


class NotifySource:
    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._dsn: str | None = None
        self._conn: Any = None
        self._queue: asyncio.Queue[Message] = asyncio.Queue(_QUEUE_LIMIT)
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._health = ConnectionHealth(self.name, "postgres", log)
        self.dropped = 0

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx

    def health(self) -> SourceHealth:
        return self._health.health()

    async def start(self) -> None:
        self._dsn = read_dsn(self.config)
        self._conn = await server.connect(self.config, self._dsn, self.config.startup_timeout)
        try:
            await self._listen(self._conn)
        except BaseException:
            await self._conn.close()
            raise
        ctx = self._require_ctx()
        self._tasks = [
            ctx.supervise(f"{self.name}.connection", self._keep_connected),
            ctx.supervise(f"{self.name}.intake", self._intake),
        ]
        log.info(
            "postgres source %r listening on %s (at most once)", self.name, ", ".join(self.config.channels)
        )

    async def _listen(self, conn: Any) -> None:
        self._closed.clear()
        conn.add_termination_listener(lambda _conn: self._closed.set())
        for channel in self.config.channels:
            await conn.add_listener(channel, self._on_notify)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        message = Message(topic=channel, payload=payload.encode(), headers=(("X-Pg-Channel", channel),))
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
            self._error("queue_full")
        self._queue.put_nowait(message)

    async def _keep_connected(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            if self._conn is not None and not self._conn.is_closed():
                # asyncpg notices a dead socket only when it reads: a cheap query does.
                try:
                    await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 5.0)
                except (*server.CONNECTION_ERRORS, asyncpg.PostgresError):
                    self._conn.terminate()
                if await wait_or_stop(self._stop, 1.0):
                    return
                continue
            try:
                self._conn = await asyncpg.connect(
                    self._dsn, server_settings=server.SESSION_SETTINGS, timeout=10
                )
                await self._listen(self._conn)
                self._health.restored()
                attempt = 0
            except (*server.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                attempt += 1
                self._error("connection")
                self._health.failing(redact_text(str(exc)) or type(exc).__name__)
                if await wait_or_stop(self._stop, doubling(attempt, 0.2, self.config.reconnect_max)):
                    return

    async def _intake(self) -> None:
        ctx = self._require_ctx()
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                await ctx.submit(
                    self.name,
                    batch,
                    self._on_outcomes,
                    asynchronous=self.config.asynchronous_invocation,
                    decode=self.config.decode,
                )
            except DispatcherClosed:
                return

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        self._require_ctx().count_settled(self.name, outcomes)

    async def stop(self) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 5.0)

    def _error(self, kind: str) -> None:
        if self._ctx is not None:
            self._ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError("postgres source used before register()")
        return self._ctx
