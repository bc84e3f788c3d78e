"""``type = "jetstream"``: a durable JetStream pull consumer, at-least-once.

Intake is a continuous pull: fastconn keeps pull requests open for exactly as many messages
as it has room for (the dispatcher's free capacity, at most ``max_ack_pending``), so messages
arrive as soon as they are published, in batches, and a slow function means fewer pulls:
the broker keeps the backlog, not this process. Replicas bind the same durable consumer and
share the work.

Settling, per message, once every target function has a final result:

* all succeeded (or no function subscribes): ``ack``;
* a retryable failure after the dispatcher's own retries: ``nak`` with a delay growing with
  the delivery count (``nak_delay`` doubling up to ``nak_delay_max``), or the function's
  ``Retry-After`` when it sent one;
* a final failure (a non-retryable status, or ``max_deliver`` deliveries spent): published to
  ``dead_letter_subject`` (which a stream must store: the publish is confirmed) with failure
  context headers, then ``term``. Without a dead-letter subject the message is kept
  (``nak``), counted in ``fastconn_source_errors_total{kind="stuck"}`` and logged.

Messages still running when half of ``ack_wait`` has passed get in-progress acks, so a long
call keeps its message. With ``ordering = "key"`` messages of one key (the subject, or a
header) run one at a time in stream order while other keys run in parallel; a retryable
failure is retried in place (the key waits, the message keeps in-progress acks) instead of
being redelivered out of order. The order holds within one replica: replicas sharing the
durable each get some of a key's messages.

Function headers: ``X-Topic`` (subject), ``X-Nats-Stream``, ``X-Nats-Sequence``,
``X-Delivery-Attempt`` (the server's delivery count, plus the dispatcher's own retries),
``X-Message-Id`` = ``<stream>/<sequence>``, and the message's own headers.

On stop, pulling ends, what arrived is dispatched, calls in flight finish and are acked, and
anything left (arrived late, or waiting for an in-place retry) is nak'ed at once so another
replica takes it without waiting for ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import Field, field_validator, model_validator

from fastconn.durations import Duration
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.responses import response_messages
from fastconn.source import SourceContext
from fastconn.sources._nats_common import (
    ACK,
    PROGRESS,
    TERM,
    AckWriter,
    NatsSourceOptions,
    RateLimitedLog,
    check_subject,
    check_subjects,
    connect,
    connection_health,
    http_headers,
    nak,
    parse_ack_subject,
    sanitize_header_value,
    subject_covers,
    watch_task,
)

log = logging.getLogger("fastconn.source.jetstream")

_PULL_EXPIRES: Final = 30.0
"""Lifetime of one pull request, seconds; the server answers 408 when it ends unfilled."""
_HEARTBEAT: Final = 5.0
"""Idle heartbeat of a pull request: silence for 3 of them means the requests are gone."""
_IDLE_POLL: Final = 0.1
_STOP_TIMEOUT: Final = 10.0
_DEAD_LETTER_CONCURRENCY: Final = 32
_RESERVED: Final = frozenset(
    {"x-nats-stream", "x-nats-sequence", "x-message-id", "x-topic", "x-delivery-attempt", "x-connector"}
)
_NAME_FORBIDDEN: Final = frozenset(" \t\r\n.*>/\\")
_RESPONSE_EXCERPT: Final = 1024

# Failure context on dead letters (the same names as the Kafka source's, with NATS coordinates).
DLT_FUNCTION: Final = "fastconn-dlt-function"
DLT_STATUS: Final = "fastconn-dlt-status"
DLT_ATTEMPTS: Final = "fastconn-dlt-attempts"
DLT_ERROR: Final = "fastconn-dlt-error"
DLT_RESPONSE: Final = "fastconn-dlt-response"
DLT_FAILED: Final = "fastconn-dlt-failed-functions"
DLT_SUBJECT: Final = "fastconn-dlt-original-subject"
DLT_STREAM: Final = "fastconn-dlt-original-stream"
DLT_SEQUENCE: Final = "fastconn-dlt-original-sequence"
DLT_MESSAGE_ID: Final = "fastconn-dlt-message-id"
DLT_DELIVERIES: Final = "fastconn-dlt-deliveries"
DLT_REASON: Final = "fastconn-dlt-reason"
DLT_TIME: Final = "fastconn-dlt-time"


def _check_name(value: str) -> str:
    if not value or any(c in _NAME_FORBIDDEN for c in value):
        raise ValueError("expected a name without whitespace, '.', '*', '>', '/' or '\\'")
    return value


class JetStreamConfig(NatsSourceOptions):
    """``[[sources]] type = "jetstream"``: a durable pull consumer (at-least-once)."""

    type: Literal["jetstream"] = "jetstream"
    name: str = Field(default="jetstream", min_length=1)
    stream: str
    create_stream: bool = False
    """Create ``stream`` (capturing ``subjects``) when it does not exist."""
    subjects: tuple[str, ...] = ()
    """The consumer's filter (empty: the whole stream); the stream's subjects when created."""
    durable: str = "fastconn"
    deliver_policy: Literal["all", "new", "last"] = "all"
    """Where a new durable starts; an existing durable keeps its position."""
    ack_wait: Duration = Field(default=30.0, gt=0)
    max_deliver: int = Field(default=5, ge=-1)
    """Deliveries before a message fails for good; -1: unlimited."""
    max_ack_pending: int = Field(default=1000, ge=1)
    """Unacknowledged messages of the durable (all replicas together)."""
    dead_letter_subject: str | None = None
    nak_delay: Duration = 1.0
    """Redelivery delay after the first failed delivery; doubles per delivery."""
    nak_delay_max: Duration = 60.0
    fetch_batch: int | None = Field(default=None, ge=1)
    """Most messages per pull request; default ``dispatch.batch_size``."""
    ordering: Literal["none", "key"] = "none"
    ordering_key: str = "subject"
    """With ``ordering = "key"``: ``subject``, or the name of a header holding the key."""

    @field_validator("stream", "durable")
    @classmethod
    def _check_names(cls, value: str) -> str:
        return _check_name(value)

    @field_validator("subjects")
    @classmethod
    def _check_subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_subjects(value)

    @field_validator("dead_letter_subject")
    @classmethod
    def _check_dead_letter(cls, value: str | None) -> str | None:
        if value is not None:
            problem = check_subject(value, wildcards=False)
            if problem:
                raise ValueError(f"subject {value!r} {problem}")
        return value

    @field_validator("max_deliver")
    @classmethod
    def _check_max_deliver(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be at least 1, or -1 for unlimited")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> JetStreamConfig:
        if self.nak_delay_max < self.nak_delay:
            raise ValueError(f"nak_delay_max must be >= nak_delay ({self.nak_delay:g}s)")
        dead = self.dead_letter_subject
        if dead is not None and any(subject_covers(s, dead) for s in self.subjects):
            raise ValueError(
                f"dead_letter_subject {dead!r} is consumed by this source's own subjects: "
                "dead letters would come back"
            )
        if (
            self.ordering_key != "subject"
            and not self.ordering_key.replace("-", "").replace("_", "").isalnum()
        ):
            raise ValueError("ordering_key must be 'subject' or a header name")
        return self


CONFIG_MODEL = JetStreamConfig


def create(config: JetStreamConfig) -> JetStreamSource:
    return JetStreamSource(config)


@dataclass(eq=False, slots=True)
class _Delivery:
    """One delivery of one stream message, from arrival until it is settled."""

    msg: Any
    touched: float
    stream: str = ""
    seq: int = 0
    deliveries: int = 1


class JetStreamSource:
    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._nc: Any = None
        self._response_tasks: set[asyncio.Task[None]] = set()
        self._js: Any = None
        self._acks = AckWriter(None)
        self._inbox = ""
        self._inbox_sub: Any = None
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{config.stream}.{config.durable}"
        self._ack_wait = config.ack_wait
        self._fetch_batch = config.fetch_batch or 512
        self._key_header: str | None = None if config.ordering_key == "subject" else config.ordering_key
        # Intake
        self._inflight: set[_Delivery] = set()
        self._buffer: list[_Delivery] = []
        self._buffer_ready = asyncio.Event()
        self._pulls: deque[list[float]] = deque()
        """Open pull requests, oldest first: [expires_at, messages still to come]."""
        self._requested = 0
        self._last_activity = time.monotonic()
        self._wake = asyncio.Event()
        self._consumer_lost = False
        self._stopping = False
        self._intake_closed = False
        # Settling
        self._settle_queue: deque[list[Outcome]] = deque()
        self._settle_ready = asyncio.Event()
        self._settle_closed = False
        self._retries: list[tuple[float, int, Message]] = []
        self._retry_order = itertools.count()
        self._retry_wake = asyncio.Event()
        self._dead_letters: set[asyncio.Task[None]] = set()
        self._dead_letter_slots = asyncio.Semaphore(_DEAD_LETTER_CONCURRENCY)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stuck_log = RateLimitedLog(log)
        self._status_log = RateLimitedLog(log)
        self._health = connection_health(config, self.name, log)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        """The broker connection's state (see :mod:`fastconn.health`)."""
        return self._health.health()

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self._fetch_batch = self.config.fetch_batch or ctx.dispatcher.options.batch_size

    async def start(self) -> None:
        self._nc = await connect(
            self.config,
            name=self.name,
            log=log,
            error_cb=self._on_error,
            reconnected_cb=self._on_reconnected,
            health=self._health,
        )
        self._js = self._nc.jetstream()
        self._acks = AckWriter(self._nc)
        try:
            await self._ensure_stream()
            await self._ensure_consumer()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._nc.close()
            raise
        self._inbox = self._nc.new_inbox()
        self._inbox_sub = await self._nc.subscribe(
            self._inbox, cb=self._on_inbox, pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30
        )
        for name, job in (
            ("pull", self._pull_loop),
            ("submit", self._submit_loop),
            ("settle", self._settle_loop),
            ("keepalive", self._keepalive_loop),
            ("retry", self._retry_loop),
        ):
            self._tasks[name] = watch_task(asyncio.create_task(job()), log, f"source {self.name} {name} loop")

    async def stop(self) -> None:
        """Stops pulling; what already arrived goes to the dispatcher, later arrivals are
        handed back (nak) at once; scheduled in-place retries are handed back too."""
        self._stopping = True
        self._wake.set()
        await _finish(self._tasks.get("pull"), 0)
        self._intake_closed = True
        self._buffer_ready.set()
        await _finish(self._tasks.get("submit"), _STOP_TIMEOUT)
        await _finish(self._tasks.get("retry"), 0)
        for _, _, message in self._retries:
            delivery: _Delivery = message.handle
            self._nak(delivery, self.config.nak_delay)
            self._release_key(message)
        self._retries.clear()
        await self._acks.flush()

    async def close(self) -> None:
        """After the dispatcher drained: settles the last outcomes, hands back whatever is
        left (nak, so another replica gets it at once), disconnects."""
        self._settle_closed = True
        self._settle_ready.set()
        await _finish(self._tasks.get("settle"), _STOP_TIMEOUT)
        if self._dead_letters:
            await asyncio.wait(self._dead_letters, timeout=_STOP_TIMEOUT)
        await _finish(self._tasks.get("keepalive"), 0)
        for delivery in list(self._inflight):
            self._nak(delivery, 0)
        await self._acks.flush()
        if self._nc is not None:
            if self._inbox_sub is not None:
                with contextlib.suppress(Exception):
                    await self._inbox_sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    # -- stream and consumer ---------------------------------------------------------------

    async def _ensure_stream(self) -> None:
        import nats.errors
        import nats.js.errors

        c = self.config
        try:
            info = await self._js.stream_info(c.stream)
        except nats.js.errors.NotFoundError:
            info = None
        except nats.errors.NoRespondersError:
            raise SourceError(f"source {self.name!r}: JetStream is not enabled on the NATS server") from None
        if info is not None:
            dead = c.dead_letter_subject
            if (
                dead is not None
                and not c.subjects
                and any(subject_covers(s, dead) for s in info.config.subjects or ())
            ):
                raise SourceError(
                    f"source {self.name!r}: dead_letter_subject {dead!r} is stored in stream "
                    f"{c.stream!r}, which this source consumes whole: set subjects to filter "
                    "it out, or use a subject of another stream"
                )
            return
        if not c.create_stream:
            raise SourceError(
                f"source {self.name!r}: stream {c.stream!r} does not exist "
                "(create it, or set create_stream = true with subjects)"
            )
        if not c.subjects:
            raise SourceError(f"source {self.name!r}: create_stream needs subjects for stream {c.stream!r}")
        await self._js.add_stream(name=c.stream, subjects=list(c.subjects))
        log.info("source %s: created stream %s for %s", self.name, c.stream, ", ".join(c.subjects))

    def _consumer_config(self) -> Any:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        c = self.config
        return ConsumerConfig(
            name=c.durable,
            durable_name=c.durable,
            deliver_policy=DeliverPolicy(c.deliver_policy),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=c.ack_wait,
            max_deliver=c.max_deliver,
            max_ack_pending=c.max_ack_pending,
            filter_subject=c.subjects[0] if len(c.subjects) == 1 else None,
            filter_subjects=list(c.subjects) if len(c.subjects) > 1 else None,
        )

    async def _ensure_consumer(self) -> None:
        import nats.js.errors

        c = self.config
        wanted = self._consumer_config()
        try:
            info = await self._js.consumer_info(c.stream, c.durable)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and info.config.deliver_subject:
            raise SourceError(
                f"source {self.name!r}: consumer {c.durable!r} of stream {c.stream!r} is a push "
                "consumer; fastconn needs a pull consumer (use another durable name)"
            )
        if info is None:
            info = await self._js.add_consumer(c.stream, wanted)
            log.info(
                "source %s: created durable pull consumer %s on stream %s", self.name, c.durable, c.stream
            )
        else:
            have = info.config
            filters = tuple(have.filter_subjects or ([have.filter_subject] if have.filter_subject else []))
            if (have.ack_wait, have.max_deliver, have.max_ack_pending, filters) != (
                c.ack_wait,
                c.max_deliver,
                c.max_ack_pending,
                tuple(c.subjects),
            ):
                try:
                    info = await self._js.add_consumer(c.stream, wanted)
                    log.info(
                        "source %s: updated consumer %s to the configured settings", self.name, c.durable
                    )
                except nats.js.errors.APIError as exc:
                    log.warning(
                        "source %s: consumer %s keeps its existing settings (update refused: %s)",
                        self.name,
                        c.durable,
                        exc,
                    )
        self._ack_wait = float(info.config.ack_wait or c.ack_wait)
        self._consumer_lost = False

    async def _consumer_back(self) -> bool:
        import nats.js.errors

        try:
            await self._js.consumer_info(self.config.stream, self.config.durable)
        except nats.js.errors.NotFoundError:
            return False
        except Exception as exc:
            log.debug("source %s: consumer info: %r", self.name, exc)
            return False
        log.info("source %s: consumer %s is back; pulling again", self.name, self.config.durable)
        self._consumer_lost = False
        self._reset_pulls()
        return True

    # -- intake: a continuous pull ---------------------------------------------------------

    def _room(self) -> int:
        """Messages we may ask for now: bounded by max_ack_pending and by the dispatcher's free
        capacity, minus what is already asked for, buffered or in flight."""
        d = self._require_ctx().dispatcher
        window = min(self.config.max_ack_pending, d.capacity)
        mine = window - len(self._inflight) - self._requested
        free = d.capacity - d.queued - len(self._buffer) - self._requested
        return max(0, min(mine, free))

    async def _pull_loop(self) -> None:
        ctx = self._require_ctx()
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            if self._stopping:
                return
            log.warning(
                "source %s: waiting for the topic map before pulling (messages stay in the stream)", self.name
            )
        window = min(self.config.max_ack_pending, ctx.dispatcher.capacity)
        threshold = max(1, min(self._fetch_batch, window) // 2)
        while not self._stopping:
            now = time.monotonic()
            self._expire_pulls(now)
            # A consumer deleted under us is not re-created (that would replay the stream from
            # deliver_policy): wait for whoever deleted it to put it back.
            if self._consumer_lost and not await self._consumer_back():
                await asyncio.sleep(5.0)
                continue
            room = self._room()
            # Small top-ups are not worth a request unless nothing at all is asked for.
            if room >= threshold or (room > 0 and self._requested == 0):
                n = min(room, self._fetch_batch)
                request = {
                    "batch": n,
                    "expires": int(_PULL_EXPIRES * 1e9),
                    "idle_heartbeat": int(_HEARTBEAT * 1e9),
                }
                try:
                    await self._nc.publish(
                        self._next_subject, json.dumps(request).encode(), reply=self._inbox
                    )
                except Exception as exc:
                    ctx.metrics.source_errors.labels(source=self.name, kind="pull").inc()
                    log.warning("source %s: pull request failed: %r", self.name, exc)
                    await asyncio.sleep(1.0)
                    continue
                if not self._pulls:
                    self._last_activity = now
                self._pulls.append([now + _PULL_EXPIRES, float(n)])
                self._requested += n
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_POLL)

    def _expire_pulls(self, now: float) -> None:
        pulls = self._pulls
        while pulls and pulls[0][0] + 2.0 < now:
            self._requested -= int(pulls.popleft()[1])  # its 408 never came
        if self._requested > 0 and now - self._last_activity > 3 * _HEARTBEAT:
            log.info("source %s: pull requests went silent; asking again", self.name)
            self._reset_pulls()
        if not pulls:
            self._requested = 0

    def _reset_pulls(self) -> None:
        self._pulls.clear()
        self._requested = 0
        self._last_activity = time.monotonic()
        self._wake.set()

    def _pull_done(self) -> None:
        """The oldest open pull request ended (408/409) with its remaining count unsent."""
        if self._pulls:
            self._requested -= int(self._pulls.popleft()[1])
        self._requested = max(self._requested, 0)
        self._wake.set()

    async def _on_inbox(self, msg: Any) -> None:
        self._last_activity = time.monotonic()
        reply = msg.reply
        if not reply or not reply.startswith("$JS."):
            self._on_status(msg.headers or {})
            return
        pulls = self._pulls
        if pulls:
            pulls[0][1] -= 1
            if pulls[0][1] <= 0:
                pulls.popleft()
            self._requested -= 1
        if self._intake_closed:
            self._acks.add(reply, nak())
            await self._acks.flush()
            return
        delivery = _Delivery(msg, self._last_activity)
        self._inflight.add(delivery)
        self._buffer.append(delivery)
        if len(self._buffer) == 1:
            self._buffer_ready.set()

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get("Status", "")
        if status == "100":
            return  # idle heartbeat
        if status in ("404", "408"):
            self._pull_done()
            return
        description = headers.get("Description", "")
        if status == "409":
            self._pull_done()
            if "deleted" in description.lower():
                if not self._consumer_lost:
                    log.error(
                        "source %s: consumer %s of stream %s was deleted; not pulling until it "
                        "exists again (fastconn does not re-create it: that would replay the "
                        "stream)",
                        self.name,
                        self.config.durable,
                        self.config.stream,
                    )
                self._consumer_lost = True
                self._reset_pulls()
            if "max" in description.lower() and "ack" in description.lower():
                return  # the server's own max_ack_pending bound: expected backpressure
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind="pull").inc()
        self._status_log.warning("source %s: pull request ended with %s %s", self.name, status, description)

    async def _submit_loop(self) -> None:
        ctx = self._require_ctx()
        while True:
            await self._buffer_ready.wait()
            self._buffer_ready.clear()
            batch, self._buffer = self._buffer, []
            if not batch:
                if self._intake_closed:
                    return
                continue
            messages = [self._to_message(d) for d in batch]
            try:
                await ctx.submit(
                    self.name,
                    messages,
                    self._on_outcomes,
                    capture=bool(self.config.response_subject),
                    asynchronous=self.config.asynchronous_invocation,
                )
            except DispatcherClosed:
                for delivery in batch:
                    self._nak(delivery, 0)
                await self._acks.flush()

    def _to_message(self, d: _Delivery) -> Message:
        msg = d.msg
        d.stream, d.seq, d.deliveries = parse_ack_subject(msg.reply)
        headers = http_headers(msg.headers, _RESERVED) if msg.headers else []
        headers.append(("X-Nats-Stream", d.stream))
        headers.append(("X-Nats-Sequence", str(d.seq)))
        key = self._key(msg) if self.config.ordering == "key" else None
        return Message(
            msg.subject,
            msg.data,
            headers,
            message_id=f"{d.stream}/{d.seq}",
            key=key,
            delivery_attempt=d.deliveries,
            hold_key_on_retry=key is not None,
            handle=d,
        )

    def _key(self, msg: Any) -> bytes | None:
        name = self._key_header
        if name is None:
            return str(msg.subject).encode()
        headers = msg.headers
        if not headers:
            return None
        value = headers.get(name)
        if value is None:
            lower = name.lower()
            value = next((v for k, v in headers.items() if k.lower() == lower), None)
        return value.encode() if isinstance(value, str) else None

    # -- settling --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        self._settle_queue.append(outcomes)
        self._settle_ready.set()
        if self.config.response_subject:
            self._publish_responses(self.config.response_subject, outcomes)

    def _publish_responses(self, subject: str, outcomes: list[Outcome]) -> None:
        """Publishes the results (one task per batch: core NATS publishes only buffer)."""
        records = [record for outcome in outcomes for record in response_messages(outcome)]

        async def publish() -> None:
            try:
                for body, headers in records:
                    await self._nc.publish(subject, body, headers=headers)
            except Exception as exc:
                self._require_ctx().metrics.source_errors.labels(source=self.name, kind="response").inc()
                log.warning("source %s: could not publish responses to %s: %s", self.name, subject, exc)

        task = asyncio.get_running_loop().create_task(publish())
        self._response_tasks.add(task)
        task.add_done_callback(self._response_tasks.discard)

    async def _settle_loop(self) -> None:
        metrics = self._require_ctx().metrics
        acked_counter = metrics.messages_acked.labels(source=self.name)
        while True:
            await self._settle_ready.wait()
            self._settle_ready.clear()
            acked = 0
            while self._settle_queue:
                for outcome in self._settle_queue.popleft():
                    acked += self._settle(outcome)
            await self._acks.flush()
            if acked:
                acked_counter.inc(acked)
            self._wake.set()
            if self._settle_closed and not self._settle_queue:
                return

    def _settle(self, outcome: Outcome) -> int:
        """Acts on one outcome; returns 1 when the message was acknowledged."""
        delivery: _Delivery = outcome.message.handle
        verdict = outcome.verdict
        if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
            self._inflight.discard(delivery)
            self._acks.add(delivery.msg.reply, ACK)
            return 1
        max_deliver = self.config.max_deliver
        if verdict is Verdict.RETRY and not (0 < max_deliver <= delivery.deliveries):
            delay = self._redelivery_delay(delivery.deliveries, outcome.retry_after)
            held = outcome.message.hold_key_on_retry and outcome.message.key is not None
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="nak").inc()
            if held and not self._stopping:
                self._schedule_retry(outcome.message, delay)
            else:
                self._nak(delivery, delay)
                if held:
                    self._release_key(outcome.message)
            return 0
        if verdict is Verdict.RETRY:
            reason = f"max_deliver ({max_deliver}) reached"
        else:
            reason = "non-retryable failure"
        self._failed(outcome, reason)
        return 0

    def _redelivery_delay(self, deliveries: int, retry_after: float | None) -> float:
        c = self.config
        if retry_after is not None:
            return min(max(retry_after, 0.0), c.nak_delay_max)
        return float(min(c.nak_delay * 2 ** min(max(deliveries - 1, 0), 30), c.nak_delay_max))

    def _nak(self, delivery: _Delivery, delay: float) -> None:
        """Queues a nak (sent with the next flush of the ack writer)."""
        self._inflight.discard(delivery)
        self._acks.add(delivery.msg.reply, nak(delay))

    def _release_key(self, message: Message) -> None:
        if message.hold_key_on_retry and message.key is not None:
            with contextlib.suppress(DispatcherClosed):
                self._require_ctx().dispatcher.release_key(message.key)

    def _failed(self, outcome: Outcome, reason: str) -> None:
        """A final failure: dead-letter then term, or keep (nak) and say so."""
        delivery: _Delivery = outcome.message.handle
        if self.config.dead_letter_subject is not None:
            task = asyncio.create_task(self._dead_letter(outcome, reason))
            self._dead_letters.add(task)
            task.add_done_callback(self._dead_letters.discard)
            return
        ctx = self._require_ctx()
        ctx.metrics.source_errors.labels(source=self.name, kind="stuck").inc()
        failure = outcome.first_failure()
        self._stuck_log.warning(
            "source %s: message %s on %s failed for good (%s: %s) and stays in the stream "
            "unacknowledged: set dead_letter_subject to move such messages aside",
            self.name,
            outcome.message_id,
            outcome.message.topic,
            reason,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._nak(delivery, self.config.nak_delay_max)
        self._release_key(outcome.message)

    async def _dead_letter(self, outcome: Outcome, reason: str) -> None:
        ctx = self._require_ctx()
        delivery: _Delivery = outcome.message.handle
        subject = self.config.dead_letter_subject
        async with self._dead_letter_slots:
            try:
                await self._js.publish(
                    subject,
                    delivery.msg.data,
                    headers=self._dead_letter_headers(outcome, reason),
                    timeout=5.0,
                )
            except Exception as exc:
                ctx.metrics.source_errors.labels(source=self.name, kind="dead_letter").inc()
                log.error(
                    "source %s: cannot dead-letter %s to %s (is the subject stored by a stream?): %r; "
                    "the message is kept",
                    self.name,
                    outcome.message_id,
                    subject,
                    exc,
                )
                self._nak(delivery, self.config.nak_delay_max)
                await self._acks.flush()
                self._release_key(outcome.message)
                return
            self._inflight.discard(delivery)
            self._acks.add(delivery.msg.reply, TERM)
            await self._acks.flush()
            ctx.metrics.messages_failed.labels(source=self.name).inc()
            failure = outcome.first_failure()
            log.warning(
                "source %s: message %s on %s dead-lettered to %s (%s: %s)",
                self.name,
                outcome.message_id,
                outcome.message.topic,
                subject,
                reason,
                failure and f"{failure.function} -> {failure.status_label}",
            )
            self._release_key(outcome.message)

    def _dead_letter_headers(self, outcome: Outcome, reason: str) -> dict[str, str]:
        """The original headers plus the failure context (``fastconn-dlt-*``, as the other
        sources write it)."""
        delivery: _Delivery = outcome.message.handle
        original = delivery.msg.headers or {}
        # The publisher's Nats-* headers (message id, expected stream...) would steer the
        # dead-letter publish, and earlier context would be stale: both are dropped. Our own
        # Nats-Msg-Id makes a repeated dead-lettering of one message a duplicate the stream drops.
        headers = {k: v for k, v in original.items() if not k.lower().startswith(("nats-", "fastconn-dlt-"))}
        failed = [r for r in outcome.results if not r.ok]
        headers.update(
            {
                "Nats-Msg-Id": f"dlq:{delivery.stream}/{delivery.seq}",
                DLT_SUBJECT: outcome.message.topic,
                DLT_STREAM: delivery.stream,
                DLT_SEQUENCE: str(delivery.seq),
                DLT_MESSAGE_ID: outcome.message_id,
                DLT_DELIVERIES: str(delivery.deliveries),
                DLT_REASON: reason,
                DLT_TIME: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                DLT_FAILED: ",".join(r.function for r in failed),
            }
        )
        if failed:
            first = failed[0]
            headers[DLT_FUNCTION] = first.function
            headers[DLT_STATUS] = str(first.status)
            headers[DLT_ATTEMPTS] = str(first.attempts)
            headers[DLT_ERROR] = f"HTTP {first.status}" if first.status else first.error.label
            if first.body:
                excerpt = first.body[:_RESPONSE_EXCERPT].decode("utf-8", "replace")
                headers[DLT_RESPONSE] = sanitize_header_value(excerpt, _RESPONSE_EXCERPT)
        return headers

    # -- in-place retries (key ordering) ---------------------------------------------------

    def _schedule_retry(self, message: Message, delay: float) -> None:
        delivery: _Delivery = message.handle
        delivery.deliveries += 1
        message.delivery_attempt = delivery.deliveries
        message.resume = True
        heapq.heappush(self._retries, (time.monotonic() + delay, next(self._retry_order), message))
        self._retry_wake.set()

    async def _retry_loop(self) -> None:
        dispatcher = self._require_ctx().dispatcher
        while True:
            self._retry_wake.clear()
            if not self._retries:
                await self._retry_wake.wait()
                continue
            wait = self._retries[0][0] - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_wake.wait(), wait)
                continue
            now = time.monotonic()
            due: list[Message] = []
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
            try:
                await dispatcher.submit(
                    due,
                    self._on_outcomes,
                    capture=bool(self.config.response_subject),
                    asynchronous=self.config.asynchronous_invocation,
                )
            except (DispatcherClosed, asyncio.CancelledError) as exc:
                for message in due:
                    self._nak(message.handle, 0)
                    self._release_key(message)
                await self._acks.flush()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return

    # -- keeping long calls' messages ------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        while True:
            interval = max(0.02, self._ack_wait / 4)
            await asyncio.sleep(interval)
            now = time.monotonic()
            threshold = self._ack_wait / 2
            for delivery in self._inflight:
                if now - delivery.touched >= threshold:
                    delivery.touched = now
                    self._acks.add(delivery.msg.reply, PROGRESS)
            await self._acks.flush()

    # -- connection events -----------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind="connection").inc()
        log.warning("source %s: NATS error: %r", self.name, exc)

    async def _on_reconnected(self) -> None:
        # Pull requests may not have survived: ask again (the server bounds any excess by
        # max_ack_pending).
        self._reset_pulls()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx


async def _finish(task: asyncio.Task[None] | None, timeout: float) -> None:
    """Waits up to ``timeout`` for ``task`` to end by itself, then cancels it."""
    if task is None or task.done():
        return
    if timeout > 0:
        await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
