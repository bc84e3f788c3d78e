"""The vcenter source: reads vSphere events, dispatches them, checkpoints what settled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

from fastconn.backoff import doubling
from fastconn.checkpoint import checkpoint_store
from fastconn.dead_letter_sink import DeadLetterError, DeadLetterSink, dead_letter_sink
from fastconn.deadletter import DLT_RESPONSE, failure_context, response_excerpt
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.headers import valid_value
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.vcenter.client import (
    BadCertificate,
    BadLogin,
    Disconnected,
    ServerInfo,
    VcenterSession,
    keys_restarted,
)
from fastconn.sources.vcenter.config import VcenterConfig
from fastconn.sources.vcenter.events import created_time
from fastconn.sources.vcenter.messages import PendingEvent, cloudevent_headers, convert
from fastconn.sources.vcenter.progress import Cursor, Progress

__all__ = ["VcenterSource", "VcenterStats"]

log = logging.getLogger("fastconn.source.vcenter")

T = TypeVar("T")

_CATCH_UP_PAGE: Final = 1000
"""Page size of the catch-up collector (vCenter's maximum): how much history it can reach."""


@dataclass(slots=True)
class VcenterStats:
    """What the source did since it started (tests and the benchmark read it)."""

    read: int = 0
    delivered: int = 0
    """Settled OK or unrouted."""
    dead_lettered: int = 0
    retried: int = 0
    catch_ups: int = 0
    logins: int = 0
    keys_restarted: int = 0


class VcenterSource:
    """``type = "vcenter"`` (see :mod:`fastconn.sources.vcenter`)."""

    def __init__(self, config: VcenterConfig) -> None:
        self.name = config.name
        self.config = config
        self.stats = VcenterStats()
        self._ctx: SourceContext | None = None
        self._store = checkpoint_store(config.checkpoint, f"vcenter-{config.name}")
        self._sink: DeadLetterSink | None = (
            dead_letter_sink(config.dead_letter, config.name) if config.dead_letter is not None else None
        )
        self._health = ConnectionHealth(config.name, config.url, log)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._session: VcenterSession | None = None
        self._username = ""
        self._connected = False
        self._saved: Cursor | None = None
        """The checkpoint loaded at start (None: none, or ``begin = now``)."""
        self._progress: Progress | None = None
        self._instance = ""
        """The vCenter the current watermark's keys belong to."""
        self._server = ""
        """The instanceUuid of the vCenter logged in to now (a rebase moves to it)."""
        self._read_key = 0
        self._read_time: datetime | None = None
        self._floor: datetime | None = None
        """While keys restarted and nothing was read since: events up to this time are old."""
        self._rebase_pending = False
        self._catch_up_next = True
        """Read with a catch-up collector next: after every login, before trusting the tail page
        (govmomi's simulator fills a new collector's page with its oldest events, not its newest)."""
        self._stored: Cursor | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._settled_some = asyncio.Event()
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._pending_tasks: set[asyncio.Task[None]] = set()

    # -- source protocol -------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx

    async def start(self) -> None:
        ctx = self._require_ctx()
        self._username, password = self.config.credentials()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"vcenter-{self.name}")
        self._session = VcenterSession(self.config, self._username, password)
        try:
            await self._store.open()
            saved = await self._store.load()
            if saved is not None and self.config.begin == "checkpoint":
                self._saved = Cursor.decode(saved, f"source {self.name}")
            if self._sink is not None:
                await self._sink.open()
            if not await self._connect(first=True):
                log.warning("source %s: vCenter not reachable yet; retrying in the background", self.name)
        except BaseException:
            await self._release()
            raise
        self._task = ctx.supervise(f"{self.name}.events", self._run)
        self._saver = ctx.supervise(f"{self.name}.checkpoint", self._save_loop)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._settled_some.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})

    async def close(self) -> None:
        # Retries and dead letters still waiting keep their events unsettled: the checkpoint
        # stays below them and a restart delivers them again.
        for task in list(self._pending_tasks):
            task.cancel()
        if self._pending_tasks:
            await asyncio.wait(self._pending_tasks)
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.cancel()
            await asyncio.wait({saver})
        with contextlib.suppress(Exception):
            await self._save_checkpoint()
        await self._release()

    def health(self) -> SourceHealth:
        return self._health.health()

    # -- connection ------------------------------------------------------------------------

    async def _blocking(self, job: Callable[[], T]) -> T:
        """Runs a pyvmomi call on the source's one worker thread."""
        if self._executor is None:
            raise RuntimeError(f"source {self.name}: not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def _connect(self, *, first: bool = False) -> bool:
        """Logs in and positions the cursor. False when vCenter is unreachable; a refused login
        raises :class:`SourceError` at start and is retried later on (a rotated password)."""
        session = self._require_session()
        try:
            info = await self._blocking(session.connect)
        except BadLogin:
            reason = (
                f"vCenter {self.config.url} refused the login of {self._username!r} (InvalidLogin): "
                "check username/password (or username_file/password_file)"
            )
            if first:
                raise SourceError(f"source {self.name}: {reason}") from None
            self._health.failing("login refused")
            log.error("source %s: %s", self.name, reason)
            return False
        except BadCertificate as exc:
            reason = (
                f"vCenter {self.config.url} presented a certificate that is not trusted ({exc}): set "
                "tls_ca to the PEM file of the CA that signed it (or insecure = true for a lab vCenter)"
            )
            if first:
                raise SourceError(f"source {self.name}: {reason}") from None
            self._health.failing("certificate not trusted")
            log.error("source %s: %s", self.name, reason)
            return False
        except Disconnected as exc:
            self._health.failing(str(exc))
            return False
        self.stats.logins += 1
        self._connected = True
        self._catch_up_next = True
        self._health.restored()
        await self._position(info)
        return True

    async def _position(self, info: ServerInfo) -> None:
        """Where reading starts after this login (see :mod:`.progress` for the cursor)."""
        newest = Cursor(info.instance, info.newest_key, info.newest_time)
        self._server = info.instance
        if self._progress is None:
            saved = self._saved
            if saved is None:
                start = newest
                log.info(
                    "source %s: %s: starting at its newest event (key %d)", self.name, info.name, newest.key
                )
            elif saved.instance != info.instance:
                log.warning(
                    "source %s: the checkpoint belongs to vCenter %s, not to %s (%s): starting at its "
                    "newest event (key %d)",
                    self.name,
                    saved.instance,
                    info.instance,
                    info.name,
                    newest.key,
                )
                start = newest
            elif saved.key > info.newest_key:
                self._keys_restarted(
                    f"the checkpoint is at key {saved.key}, vCenter's newest is {info.newest_key}"
                )
                start = Cursor(info.instance, 0, saved.time)
            else:
                start = saved
                log.info("source %s: %s: resuming after event key %d", self.name, info.name, saved.key)
            self._start_reading(start)
            await self._save_checkpoint()  # a crash before the first event must not lose the start
        elif info.instance != self._instance or info.newest_key < self._read_key:
            self._keys_restarted(
                f"after the new login vCenter's newest event key is {info.newest_key}, "
                f"fastconn had read up to {self._read_key}"
            )

    def _start_reading(self, start: Cursor) -> None:
        self._progress = Progress(start)
        self._instance = start.instance
        self._read_key = start.key
        self._read_time = start.time
        self._floor = start.time if start.key == 0 else None

    def _keys_restarted(self, why: str) -> None:
        """vCenter's event keys started again (restored, or a simulator restarted): keys read
        before mean nothing now. Once every event read so far settled, reading restarts at key
        0, taking the events created after the last one read."""
        self.stats.keys_restarted += 1
        self._rebase_pending = True
        log.warning(
            "source %s: vCenter's event keys restarted (%s): resuming with the events created after %s",
            self.name,
            why,
            self._read_time.isoformat() if self._read_time is not None else "the start",
        )

    async def _disconnected(self, exc: Disconnected) -> None:
        self._connected = False
        self._health.lost()
        log.warning("source %s: lost vCenter (%s): logging in again", self.name, exc)
        session = self._require_session()
        await self._blocking(session.close)

    # -- reading ---------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            if not self._connected:
                if await self._connect():
                    failures = 0
                else:
                    failures += 1
                    delay = doubling(failures, self.config.retry_initial, self.config.retry_max)
                    await wait_or_stop(self._wake, delay)
                continue
            progress = self._require_progress()
            if self._rebase_pending or progress.outstanding >= self.config.max_pending:
                if progress.outstanding == 0:
                    self._rebase()
                else:  # wait for what is in flight (the old keys, or a full window) to settle
                    self._settled_some.clear()
                    await wait_or_stop(self._settled_some, self.config.poll_interval)
                continue
            try:
                events, more = await self._read()
            except Disconnected as exc:
                await self._disconnected(exc)
                continue
            if events:
                await self._dispatch(events)
            if not more and not self._stopping:
                await wait_or_stop(self._wake, self.config.poll_interval)

    def _rebase(self) -> None:
        self._rebase_pending = False
        self._start_reading(Cursor(self._server or self._instance, 0, self._read_time))
        self._dirty.set()

    async def _read(self) -> tuple[list[PendingEvent], bool]:
        """New events above the cursor, by key, converted on the worker thread; and whether
        more may be waiting (a full page)."""
        session = self._require_session()
        key, since, floor = self._read_key, self._read_time, self._floor
        page_size, catch_up = self.config.page_size, self._catch_up_next
        # What one catch-up may read: the room left under max_pending (at least a page).
        limit = max(page_size, self.config.max_pending - self._require_progress().outstanding)
        style, headers = self.config.topic_style, self._base_headers()

        def read() -> tuple[list[PendingEvent], bool, bool, bool]:
            if catch_up:
                new = session.read_since(since, key, _CATCH_UP_PAGE, limit)
                if floor is not None:
                    new = [e for e in new if created_time(e) > floor]
                return [convert(e, style, headers) for e in new], True, False, True
            if session.newest_key() <= key:
                return [], False, False, False  # nothing new (the usual idle poll)
            page = session.latest_page()
            if keys_restarted(page, key, since):
                return [], False, True, False
            new = [e for e in page if e.key > key]
            caught_up = False
            if new and len(new) == len(page):
                # Nothing on the page was seen before: more may have come than the page holds
                # (the simulator's page can be smaller than page_size, so no size test).
                new = session.read_since(since, key, _CATCH_UP_PAGE, limit)
                caught_up = True
            if floor is not None:
                new = [e for e in new if created_time(e) > floor]
            return [convert(e, style, headers) for e in new], len(new) >= page_size, False, caught_up

        events, more, restarted, caught_up = await self._blocking(read)
        self._catch_up_next = False
        if restarted:
            self._keys_restarted(f"event keys at or below {key} now carry times after {since}")
            return [], True
        if caught_up:
            self.stats.catch_ups += 1
        return events, more

    def _base_headers(self) -> tuple[tuple[str, str], ...]:
        return (("Content-Type", "application/json"), ("X-Vcenter-Host", self.config.host))

    # -- dispatch --------------------------------------------------------------------------

    async def _dispatch(self, events: Sequence[PendingEvent]) -> None:
        ctx = self._require_ctx()
        progress = self._require_progress()
        messages: list[Message] = []
        for event in events:
            if event.key <= self._read_key:  # a catch-up overlapping what was read
                continue
            progress.track(event.key, event.created)
            self._read_key, self._read_time, self._floor = event.key, event.created, None
            messages.append(self._message(event))
        self.stats.read += len(messages)
        try:
            await ctx.submit(
                self.name, messages, self._settled, asynchronous=self.config.asynchronous_invocation
            )
        except DispatcherClosed:
            log.info("source %s: %d event(s) not dispatched: shutting down", self.name, len(messages))

    def _message(self, event: PendingEvent) -> Message:
        message_id = f"{self._instance}:{event.key}"
        headers = event.headers
        if self.config.cloudevents:
            headers = (*headers, *cloudevent_headers(event, message_id, self.config.url))
        return Message(
            event.topic,
            event.payload,
            headers,
            message_id=message_id,
            delivery_attempt=event.deliveries,
            handle=event,
        )

    # -- outcomes --------------------------------------------------------------------------

    def _settled(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        for outcome in outcomes:
            event: PendingEvent = outcome.message.handle
            if outcome.verdict in (Verdict.OK, Verdict.UNROUTED):
                ctx.count_settled(self.name, [outcome])
                self.stats.delivered += 1
                self._done(event)
            elif outcome.verdict is Verdict.FAILED and self._sink is not None:
                self._spawn(self._dead_letter(event, outcome))
            else:
                self._spawn(self._retry(event, outcome))

    def _done(self, event: PendingEvent) -> None:
        progress = self._progress
        # Events of a vCenter whose keys restarted belong to the old watermark, settled already
        # when the new one started: nothing to record.
        if progress is not None and progress.settle(event.key):
            self._dirty.set()
        self._settled_some.set()

    def _spawn(self, job: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(job)
        self._pending_tasks.add(task)
        task.add_done_callback(self._pending_tasks.discard)

    async def _retry(self, event: PendingEvent, outcome: Outcome) -> None:
        """Sends the event again after a backoff: a retryable failure, or a final one with no
        dead-letter destination (the checkpoint holds meanwhile)."""
        ctx = self._require_ctx()
        self.stats.retried += 1
        kind = "retry" if outcome.verdict is Verdict.RETRY else "failed_held"
        ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc()
        delay = doubling(event.deliveries, self.config.retry_initial, self.config.retry_max)
        if outcome.retry_after is not None:
            delay = max(delay, outcome.retry_after)
        failure = outcome.first_failure()
        log.warning(
            "source %s: event %s (%s) failed (%s, delivery %d)%s; sending it again in %.1fs",
            self.name,
            outcome.message_id,
            event.topic,
            failure.status_label if failure is not None else outcome.verdict.name,
            event.deliveries,
            "" if outcome.verdict is Verdict.RETRY else " for good and no dead_letter is set",
            delay,
        )
        await asyncio.sleep(delay)
        event.deliveries += 1
        try:
            await ctx.submit(
                self.name,
                [self._message(event)],
                self._settled,
                asynchronous=self.config.asynchronous_invocation,
            )
        except DispatcherClosed:
            return

    async def _dead_letter(self, event: PendingEvent, outcome: Outcome) -> None:
        """Stores a failed event with its context, then counts it settled; retried until the
        destination takes it (the checkpoint holds meanwhile)."""
        ctx = self._require_ctx()
        sink = self._sink
        assert sink is not None
        origin = (
            ("fastconn-dlt-original-vcenter", self.config.url),
            ("fastconn-dlt-original-vcenter-instance", self._instance),
            ("fastconn-dlt-original-event-key", str(event.key)),
            ("fastconn-dlt-original-topic", event.topic),
        )
        headers = failure_context(outcome, origin, deliveries=event.deliveries, reason="failed")
        excerpt = response_excerpt(outcome)
        if excerpt is not None:
            text = excerpt.decode("utf-8", "replace").replace("\n", " ").replace("\r", " ")
            if valid_value(text):
                headers.append((DLT_RESPONSE, text))
        attempt = 0
        while True:
            try:
                await sink.publish(event.payload, headers)
                break
            except DeadLetterError as exc:
                attempt += 1
                delay = doubling(attempt, self.config.retry_initial, self.config.retry_max)
                log.warning(
                    "source %s: event %s not dead-lettered (%s); trying again in %.1fs",
                    self.name,
                    outcome.message_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        self.stats.dead_lettered += 1
        ctx.count_settled(self.name, [outcome])
        ctx.metrics.source_errors.labels(source=self.name, kind="dead_letter").inc()
        log.warning("source %s: event %s (%s) dead-lettered", self.name, outcome.message_id, event.topic)
        self._done(event)

    # -- checkpoint ------------------------------------------------------------------------

    async def _save_loop(self) -> None:
        failures = 0
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._save_checkpoint()
                failures = 0
            except Exception as exc:
                failures += 1
                delay = doubling(failures, self.config.retry_initial, self.config.retry_max)
                log.warning(
                    "source %s: checkpoint not saved (%r); trying again in %.1fs", self.name, exc, delay
                )
                self._dirty.set()
                await asyncio.sleep(delay)

    async def _save_checkpoint(self) -> None:
        progress = self._progress
        if progress is None:
            return
        cursor = progress.checkpoint
        if cursor != self._stored:
            await self._store.save(cursor.encode())
            self._stored = cursor

    @property
    def checkpoint(self) -> Cursor | None:
        """The position a restart would resume after (tests read it)."""
        return self._progress.checkpoint if self._progress is not None else None

    # -- helpers ---------------------------------------------------------------------------

    async def _release(self) -> None:
        session, executor = self._session, self._executor
        if session is not None and executor is not None:
            with contextlib.suppress(Exception):
                await self._blocking(session.close)
        if executor is not None:
            executor.shutdown(wait=False)
            self._executor = None
        with contextlib.suppress(Exception):
            await self._store.close()
        if self._sink is not None:
            with contextlib.suppress(Exception):
                await self._sink.close()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name}: register() was not called")
        return self._ctx

    def _require_session(self) -> VcenterSession:
        if self._session is None:
            raise RuntimeError(f"source {self.name}: not started")
        return self._session

    def _require_progress(self) -> Progress:
        if self._progress is None:
            raise RuntimeError(f"source {self.name}: not connected yet")
        return self._progress
