"""``type = "nats"``: core NATS subjects (at-most-once), request-reply as a function trigger.

Every subscription joins ``queue_group`` (default ``fastconn``) so replicas share the work.
Messages are taken from the subscriptions as they arrive and handed to the dispatcher in
batches (one ``submit`` per batch). When the functions are slower than the publishers, the
batch buffer fills, then the per-subscription pending limits; beyond them the NATS client
drops messages as a *slow consumer*, counted in
``fastconn_source_errors_total{kind="slow_consumer"}`` and logged: memory stays bounded and
nothing crashes.

Core NATS has no acknowledgement: a message is delivered at most once. A message that
carries a reply subject (``nats request``) gets the first function's response published to
it: body = response body, headers ``X-Function-Name``, ``X-Function-Status``,
``X-Message-Id``, ``X-Duration-Seconds`` (and the function's ``Content-Type``).

Subjects: ``subjects`` when set, else the connector-wide ``topics``, else the topic map's
topics, re-subscribed whenever the map changes. Subjects another subscribed subject already
covers (``orders.eu`` under ``orders.*``) are not subscribed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator

from fastconn.errors import DispatcherClosed
from fastconn.health import SourceHealth
from fastconn.message import Message, Outcome
from fastconn.responses import request_reply, response_messages
from fastconn.source import SourceContext
from fastconn.sources._nats_common import (
    NatsSourceOptions,
    RateLimitedLog,
    check_subject,
    check_subjects,
    connect,
    connection_health,
    http_headers,
    minimal_subjects,
    subjects_intersect,
)

log = logging.getLogger("fastconn.source.nats")

_UNROUTED_ERROR = "no function subscribes to this subject"
_DRAIN_TIMEOUT = 5.0
# Replies waiting to be published (a slow or disconnected NATS connection): past either bound,
# intake waits until the queue is half drained, so replies slow intake instead of growing memory.
MAX_QUEUED_REPLIES = 8192
MAX_QUEUED_REPLY_BYTES = 64 * 1024 * 1024


class NatsConfig(NatsSourceOptions):
    """``[[sources]] type = "nats"``: core NATS subscriptions (at-most-once)."""

    type: Literal["nats"] = "nats"
    name: str = Field(default="nats", min_length=1)
    subjects: tuple[str, ...] = ()
    """Subjects to subscribe (wildcards allowed); empty: ``topics``, else the topic map's."""
    queue_group: str = "fastconn"
    """Queue group shared by replicas (each message goes to one of them); empty: no group,
    every replica gets every message."""
    pending_msgs_limit: int = Field(default=262144, ge=1)
    """Messages buffered per subscription while the dispatcher is full; beyond: slow consumer."""
    pending_bytes_limit: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Bytes buffered per subscription while the dispatcher is full; beyond: slow consumer."""

    @field_validator("subjects")
    @classmethod
    def _check_subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_subjects(value)

    @field_validator("queue_group")
    @classmethod
    def _check_queue_group(cls, value: str) -> str:
        if value and check_subject(value, wildcards=False):
            raise ValueError("a queue group name is one token without whitespace or wildcards")
        return value


CONFIG_MODEL = NatsConfig


def create(config: NatsConfig) -> NatsSource:
    return NatsSource(config)


class NatsSource:
    def __init__(self, config: NatsConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._nc: Any = None
        self._subs: dict[str, Any] = {}
        self._static: tuple[str, ...] | None = None
        self._reconcile_lock = asyncio.Lock()
        self._reconcile_task: asyncio.Task[None] | None = None
        self._buffer: list[Any] = []
        self._buffer_limit = 512
        self._has_data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._intake_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._intake_closing = False
        self._replies: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._reply_bytes = 0
        self._replies_ready = asyncio.Event()
        self._reply_room = asyncio.Event()
        self._reply_room.set()
        self._reply_task: asyncio.Task[None] | None = None
        self._slow_log = RateLimitedLog(log)
        self._failed_log = RateLimitedLog(log)
        self._warned_overlaps: set[tuple[str, str]] = set()
        self._health = connection_health(config, self.name, log)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        """The broker connection's state (see :mod:`fastconn.health`)."""
        return self._health.health()

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self._buffer_limit = max(1, ctx.dispatcher.options.batch_size)
        if self.config.subjects:
            self._static = self.config.subjects
        elif ctx.default_topics:
            self._static = ctx.default_topics
        else:
            ctx.on_topics_changed(self._topics_changed)

    async def start(self) -> None:
        ctx = self._require_ctx()
        self._nc = await connect(
            self.config, name=self.name, log=log, error_cb=self._on_error, health=self._health
        )
        self._intake_task = ctx.supervise(f"{self.name}.intake", self._intake)
        self._reply_task = ctx.supervise(f"{self.name}.replies", self._publish_replies)
        await self._reconcile()
        if self._static is None and not ctx.subscribed_topics:
            log.info(
                "source %s: no topics in the topic map yet; subscribing when functions appear", self.name
            )

    async def stop(self) -> None:
        """Unsubscribes, hands what was already received to the dispatcher, stops intake."""
        self._stopping = True
        if self._reconcile_task is not None:
            await asyncio.gather(self._reconcile_task, return_exceptions=True)
        subs = list(self._subs.values())
        self._subs.clear()
        await asyncio.gather(*(self._drain(sub) for sub in subs))
        self._intake_closing = True
        self._has_data.set()
        self._room.set()
        if self._intake_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._intake_task), _DRAIN_TIMEOUT)
            except TimeoutError:
                self._intake_task.cancel()
                await asyncio.gather(self._intake_task, return_exceptions=True)

    async def close(self) -> None:
        """After the dispatcher drained: sends the last replies, disconnects."""
        if self._reply_task is not None:
            self._replies.append(("", b"", {}))  # sentinel: publish what is queued, then end
            self._replies_ready.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._reply_task), _DRAIN_TIMEOUT)
            except TimeoutError:
                self._reply_task.cancel()
                await asyncio.gather(self._reply_task, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- subscriptions ---------------------------------------------------------------------

    def _topics_changed(self, topics: tuple[str, ...]) -> None:
        if self._nc is None or self._stopping:
            return
        self._reconcile_task = self._require_ctx().supervise(f"{self.name}.subscribing", self._reconcile)

    def _wanted(self) -> list[str]:
        if self._static is not None:
            return minimal_subjects(self._static)
        valid = []
        for topic in self._require_ctx().subscribed_topics:
            if check_subject(topic) is None:
                valid.append(topic)
            else:
                log.debug("source %s: topic %r is not a NATS subject; not subscribed", self.name, topic)
        return minimal_subjects(valid)

    async def _reconcile(self) -> None:
        async with self._reconcile_lock:
            if self._stopping:
                return
            wanted = self._wanted()
            self._warn_overlaps(wanted)
            # Subscribe first, then unsubscribe: a narrower subject replaced by a wider one
            # never leaves a gap.
            for subject in wanted:
                if subject not in self._subs:
                    self._subs[subject] = await self._nc.subscribe(
                        subject,
                        queue=self.config.queue_group,
                        cb=self._on_msg,
                        pending_msgs_limit=self.config.pending_msgs_limit,
                        pending_bytes_limit=self.config.pending_bytes_limit,
                    )
            for subject in [s for s in self._subs if s not in wanted]:
                sub = self._subs.pop(subject)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            await self._nc.flush()
            group = self.config.queue_group or "(none)"
            log.info(
                "source %s: subscribed to %s (queue group %s)",
                self.name,
                ", ".join(wanted) or "nothing",
                group,
            )

    def _warn_overlaps(self, subjects: Sequence[str]) -> None:
        for i, a in enumerate(subjects):
            for b in subjects[i + 1 :]:
                if subjects_intersect(a, b) and (a, b) not in self._warned_overlaps:
                    self._warned_overlaps.add((a, b))
                    log.warning(
                        "source %s: subjects %s and %s overlap: a message matching both is delivered twice",
                        self.name,
                        a,
                        b,
                    )

    async def _drain(self, sub: Any) -> None:
        """Stops delivery from the server and lets what the client already holds reach us."""
        try:
            await asyncio.wait_for(sub.drain(), _DRAIN_TIMEOUT)
        except Exception as exc:
            log.debug("source %s: draining %s: %r", self.name, sub.subject, exc)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- intake ----------------------------------------------------------------------------

    async def _on_msg(self, msg: Any) -> None:
        buffer = self._buffer
        buffer.append(msg)
        if len(buffer) == 1:
            self._has_data.set()
        elif len(buffer) >= self._buffer_limit:
            # The dispatcher is behind: stop taking from the client's queues, whose pending
            # limits then decide (slow consumer) rather than this process's memory.
            self._room.clear()
            await self._room.wait()

    async def _intake(self) -> None:
        ctx = self._require_ctx()
        ready = False
        while True:
            await self._has_data.wait()
            if len(self._buffer) < self._buffer_limit // 4 and ctx.dispatcher.queued:
                # Work is still in flight, so waiting one loop turn costs no latency that
                # matters and lets the next socket read join this batch: fewer, larger crossings.
                await asyncio.sleep(0)
            self._has_data.clear()
            batch, self._buffer = self._buffer, []
            self._room.set()
            if not batch:
                if self._intake_closing:
                    return
                continue
            if not ready:
                # Once: messages that arrive before the first topic map wait for it (bounded).
                await ctx.wait_ready(ctx.startup_wait)
                ready = True
            await self._reply_room.wait()
            plain: list[Message] = []
            requests: list[Message] = []
            for msg in batch:
                headers = http_headers(msg.headers) if msg.headers else ()
                message_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                message = Message(
                    msg.subject, msg.data, headers, message_id=message_id or None, handle=msg.reply or None
                )
                (requests if msg.reply else plain).append(message)
            try:
                if plain:
                    await ctx.submit(
                        self.name,
                        plain,
                        self._settled,
                        capture=bool(self.config.response_subject),
                        asynchronous=self.config.asynchronous_invocation,
                        decode=self.config.decode,
                    )
                if requests:
                    await ctx.submit(
                        self.name,
                        requests,
                        self._answered,
                        capture=True,
                        asynchronous=self.config.asynchronous_invocation,
                        decode=self.config.decode,
                    )
            except DispatcherClosed:
                lost = len(plain) + len(requests)
                ctx.metrics.messages_failed.labels(source=self.name).inc(lost)
                log.warning("source %s: %d message(s) not dispatched: shutting down", self.name, lost)
                return

    # -- outcomes --------------------------------------------------------------------------

    def _settled(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        ctx.count_settled(self.name, outcomes)
        subject = self.config.response_subject
        if subject:
            for outcome in outcomes:
                for body, headers in response_messages(outcome):
                    self._queue_reply(subject, body, headers)
            self._replies_ready.set()
        failed = [o for o in outcomes if not o.ok]
        if failed:
            first = failed[0]
            failure = first.first_failure()
            self._failed_log.warning(
                "source %s: %d message(s) not delivered (at-most-once, not retried later), e.g. %s on %s: %s",
                self.name,
                len(failed),
                first.message_id,
                first.message.topic,
                failure and f"{failure.function} -> {failure.status_label}",
            )

    def _answered(self, outcomes: list[Outcome]) -> None:
        self._settled(outcomes)
        for outcome in outcomes:
            reply = outcome.message.handle
            if isinstance(reply, str) and reply:
                self._queue_reply(reply, *request_reply(outcome, _UNROUTED_ERROR))
        self._replies_ready.set()

    def _queue_reply(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        self._replies.append((subject, body, headers))
        self._reply_bytes += len(body)
        if len(self._replies) >= MAX_QUEUED_REPLIES or self._reply_bytes >= MAX_QUEUED_REPLY_BYTES:
            self._reply_room.clear()

    async def _publish_replies(self) -> None:
        ctx = self._require_ctx()
        while True:
            await self._replies_ready.wait()
            self._replies_ready.clear()
            while self._replies:
                subject, body, headers = self._replies.popleft()
                self._reply_bytes -= len(body)
                if (
                    len(self._replies) <= MAX_QUEUED_REPLIES // 2
                    and self._reply_bytes <= MAX_QUEUED_REPLY_BYTES // 2
                ):
                    self._reply_room.set()
                if not subject:
                    return
                limit = max(0, int(getattr(self._nc, "max_payload", 1048576)) - 4096)
                if len(body) > limit:
                    headers = {
                        **headers,
                        "X-Fastconn-Error": f"response body of {len(body)} bytes "
                        "exceeds the NATS max_payload",
                    }
                    body = b""
                try:
                    await self._nc.publish(subject, body, headers=headers)
                except Exception as exc:
                    ctx.metrics.source_errors.labels(source=self.name, kind="reply").inc()
                    log.warning("source %s: cannot publish the reply to %s: %r", self.name, subject, exc)

    # -- errors ----------------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        import nats.errors

        ctx = self._require_ctx()
        if isinstance(exc, nats.errors.SlowConsumerError):
            ctx.metrics.source_errors.labels(source=self.name, kind="slow_consumer").inc()
            self._slow_log.warning(
                "source %s: slow consumer on %s: pending limits reached, message dropped "
                "(functions slower than publishers; raise pending_msgs_limit/pending_bytes_limit "
                "or the functions' capacity)",
                self.name,
                exc.subject,
            )
            return
        ctx.metrics.source_errors.labels(source=self.name, kind="connection").inc()
        log.warning("source %s: NATS error: %r", self.name, exc)

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx
