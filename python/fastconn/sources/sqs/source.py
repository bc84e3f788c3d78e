"""The SQS source itself: the client, the pollers, settling and visibility upkeep (see the
package docstring for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]

from fastconn.backoff import doubling
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import ConnectionHealth, SourceHealth, describe_error
from fastconn.message import Message, Outcome, Verdict
from fastconn.ratelimit import RateLimitedLog
from fastconn.s3_events import S3EventError, decode_notification
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.sqs.batch import BatchCalls
from fastconn.sources.sqs.config import MAX_VISIBILITY, SqsConfig, queue_name
from fastconn.sources.sqs.headers import MESSAGE_ID, QUEUE_URL, attribute_headers
from fastconn.sources.sqs.settle import (
    DeadLetter,
    Delay,
    Delete,
    Redrive,
    dead_letter_attributes,
    decide,
    worse,
)

log = logging.getLogger("fastconn.source.sqs")

_STOP_TIMEOUT: Final = 10.0
_CEILING_MARGIN: Final = 60.0
"""Visibility is never asked past 12 h minus this since the receive: SQS refuses it outright."""


@dataclass(frozen=True, slots=True)
class _Queue:
    url: str
    name: str
    fifo: bool


@dataclass(eq=False, slots=True)
class _Received:
    """One received SQS message, from its receive until its settlement is decided."""

    queue: _Queue
    receipt: str
    message_id: str
    body: str
    message_attributes: Mapping[str, Any]
    receives: int
    group: str | None
    received_at: float
    visible_until: float
    pending: int = 0
    """Parts (messages for the core) not settled yet."""
    worst: Outcome | None = None
    attempts: int = 0
    """Receives plus the in-place retries of this receive."""
    parts: list[Message] = field(default_factory=list)


class SqsSource:
    def __init__(self, config: SqsConfig) -> None:
        self.config = config
        self.name = config.name
        self._queues = tuple(
            _Queue(url, queue_name(url), queue_name(url).endswith(".fifo")) for url in config.queue_urls
        )
        self._ctx: SourceContext | None = None
        self._exit = contextlib.AsyncExitStack()
        self._client: Any = None
        self._batch: BatchCalls | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._spawned: set[asyncio.Task[None]] = set()
        self._in_hand: dict[str, _Received] = {}
        """Messages received and not settled yet, by receipt handle (visibility upkeep)."""
        self._reserved = 0
        """Receives in progress times the messages each may return."""
        self._room = asyncio.Event()
        self._limit = 1
        self._in_place: dict[int, tuple[Message, asyncio.TimerHandle]] = {}
        """In-place retries waiting for their delay, by ``id(message)`` (messages are not hashable)."""
        self._stopping = asyncio.Event()
        self._error_log = RateLimitedLog(log)
        self._health = ConnectionHealth(self.name, config.endpoint_url or f"SQS {config.client_region}", log)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        return self._health.health()

    @property
    def in_hand(self) -> int:
        return len(self._in_hand)

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx

    async def start(self) -> None:
        ctx = self._require_ctx()
        dispatcher = ctx.dispatcher
        # Enough in hand to keep every call slot busy while the next receives return; more
        # would only hide messages from other replicas (and cost moto-like servers per message).
        self._limit = max(
            self.config.max_messages, min(dispatcher.capacity, 2 * dispatcher.options.max_inflight)
        )
        pollers = self.config.pollers or _default_pollers(self._limit, self.config.max_messages)
        # FIFO: one receive at a time per queue by default, so messages reach the core in the
        # queue's order even where the server does not hide a group while it is in flight (SQS
        # does; moto can hand one group to two concurrent receives).
        fifo_pollers = self.config.pollers or 1
        session = get_session()
        timeout = self.config.wait_time + 20
        aio_config = AioConfig(
            max_pool_connections=pollers * len(self._queues) + 24,
            read_timeout=timeout,
            connect_timeout=min(10.0, self.config.startup_timeout),
            retries={"max_attempts": 1, "mode": "standard"},
        )
        try:
            self._client = await self._exit.enter_async_context(
                session.create_client(
                    "sqs",
                    region_name=self.config.client_region,
                    endpoint_url=self.config.endpoint_url,
                    config=aio_config,
                )
            )
            await self._check_queues()
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._health.failing(describe_error(exc))
            await self._exit.aclose()
            raise
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning(
                "source %s: waiting for the topic map before receiving (messages stay queued)", self.name
            )
        self._batch = BatchCalls(self._client, self.name, log, self._count)
        self._tasks.append(ctx.supervise(f"{self.name}.settle", self._batch.run))
        self._tasks.append(ctx.supervise(f"{self.name}.visibility", self._keep_hidden))
        for queue in self._queues:
            for i in range(fifo_pollers if queue.fifo else pollers):
                self._tasks.append(ctx.supervise(f"{self.name}.poll.{queue.name}.{i}", self._poller(queue)))
        log.info(
            "source %s: receiving from %s (%d poller(s) per queue, up to %d messages in hand)",
            self.name,
            ", ".join(q.name for q in self._queues),
            pollers,
            self._limit,
        )

    async def _check_queues(self) -> None:
        """Every queue (and the dead-letter queue) must exist: a typo fails the start, naming it."""
        urls = [*self.config.queue_urls, *filter(None, [self.config.dead_letter_queue_url])]
        for url in urls:
            try:
                await asyncio.wait_for(
                    self._client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"]),
                    self.config.startup_timeout,
                )
            except Exception as exc:
                raise SourceError(
                    f"source {self.name}: cannot use queue {url}: {describe_error(exc)}"
                ) from None

    async def stop(self) -> None:
        """Stops receiving (a long poll in progress is abandoned: what it would return stays in
        the queue); in-place retries waiting for their delay go back to the queue at once."""
        self._stopping.set()
        pollers = [t for t in self._tasks if ".poll." in t.get_name()]
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)
        for message, timer in list(self._in_place.values()):
            timer.cancel()
            self._in_place.pop(id(message), None)
            self._release_key(message)
            received: _Received = message.handle
            self._part_settled(received, None, handed_back=True)

    async def close(self) -> None:
        """After the dispatcher drained: sends the remaining deletes and visibility changes,
        makes what is still in hand visible again, disconnects."""
        if self._spawned:
            await asyncio.wait(set(self._spawned), timeout=_STOP_TIMEOUT)
        batch = self._batch
        if batch is not None:
            for received in list(self._in_hand.values()):
                self._in_hand.pop(received.receipt, None)
                batch.change_visibility(received.queue.url, received.receipt, 0)
            await batch.flush(_STOP_TIMEOUT)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._exit.aclose()

    # -- intake ----------------------------------------------------------------------------

    def _poller(self, queue: _Queue) -> Any:
        async def poll() -> None:
            await self._poll(queue)

        return poll

    async def _poll(self, queue: _Queue) -> None:
        config = self.config
        failures = 0
        while not self._stopping.is_set():
            n = await self._reserve(config.max_messages)
            try:
                response = await self._client.receive_message(
                    QueueUrl=queue.url,
                    MaxNumberOfMessages=n,
                    WaitTimeSeconds=round(config.wait_time),
                    VisibilityTimeout=round(config.visibility_timeout),
                    AttributeNames=["All"],
                    MessageAttributeNames=list(config.message_attribute_names),
                )
            except Exception as exc:
                self._unreserve(n)
                failures += 1
                self._health.failing(describe_error(exc))
                self._count("receive")
                self._error_log.warning("source %s: receive from %s failed: %r", self.name, queue.url, exc)
                await wait_or_stop(self._stopping, doubling(failures, 0.2, 10.0))
                continue
            except BaseException:
                self._unreserve(n)
                raise
            if failures:
                failures = 0
            self._health.restored()
            messages = response.get("Messages") or []
            if len(messages) < n:
                self._unreserve(n - len(messages))
            if messages:
                await self._take(queue, messages)

    async def _reserve(self, n: int) -> int:
        """Waits until this source holds fewer messages than the dispatcher has room for; returns
        how many the next receive may ask for (so a stalled function stops the receives)."""
        while self._reserved >= self._limit:
            self._room.clear()
            await self._room.wait()
        n = min(n, self._limit - self._reserved)
        self._reserved += n
        return n

    def _unreserve(self, n: int) -> None:
        """``n`` reserved messages were not received, or were settled."""
        self._reserved -= n
        if self._reserved < self._limit:
            self._room.set()

    async def _take(self, queue: _Queue, raw: list[dict[str, Any]]) -> None:
        ctx = self._require_ctx()
        now = time.monotonic()
        hidden_until = now + self.config.visibility_timeout
        messages: list[Message] = []
        for item in raw:
            attributes = item.get("Attributes") or {}
            received = _Received(
                queue=queue,
                receipt=item["ReceiptHandle"],
                message_id=item["MessageId"],
                body=item.get("Body") or "",
                message_attributes=item.get("MessageAttributes") or {},
                receives=_int(attributes.get("ApproximateReceiveCount"), 1),
                group=attributes.get("MessageGroupId") if queue.fifo else None,
                received_at=now,
                visible_until=hidden_until,
            )
            received.attempts = received.receives
            self._in_hand[received.receipt] = received
            parts = self._parts(received)
            if parts is None:
                continue
            received.parts = parts
            received.pending = len(parts)
            if not parts:  # nothing to deliver (an s3:TestEvent)
                self._settle(received)
            messages.extend(parts)
        if not messages:
            return
        try:
            await ctx.submit(
                self.name, messages, self._on_outcomes, asynchronous=self.config.asynchronous_invocation
            )
        except DispatcherClosed:
            # Left in hand: close() makes them visible again for another replica.
            log.warning("source %s: %d message(s) not dispatched: shutting down", self.name, len(messages))

    def _parts(self, received: _Received) -> list[Message] | None:
        """The messages for the core of one SQS message (None: it could not be decoded and is
        settled as a final failure)."""
        queue = received.queue
        headers = attribute_headers(received.message_attributes)
        headers += [(MESSAGE_ID, received.message_id), (QUEUE_URL, queue.url)]
        key = received.group.encode() if received.group is not None else None
        if self.config.decode == "none":
            return [
                self._message(received, queue.name, received.body.encode(), headers, received.message_id, key)
            ]
        try:
            records = decode_notification(received.body)
        except S3EventError as exc:
            self._undecodable(received, str(exc))
            return None
        return [
            self._message(received, r.topic, r.body, [*headers, *r.headers], r.message_id, key)
            for r in records
        ]

    def _message(
        self,
        received: _Received,
        topic: str,
        payload: bytes,
        headers: list[tuple[str, str]],
        message_id: str,
        key: bytes | None,
    ) -> Message:
        return Message(
            topic,
            payload,
            headers,
            message_id=message_id,
            key=key,
            delivery_attempt=received.attempts,
            hold_key_on_retry=key is not None,
            handle=received,
        )

    def _undecodable(self, received: _Received, reason: str) -> None:
        self._count("decode")
        self._error_log.warning(
            "source %s: message %s on %s is not an S3 event notification (%s); %s",
            self.name,
            received.message_id,
            received.queue.name,
            reason,
            "moving it to the dead-letter queue"
            if self.config.dead_letter_queue_url
            else "handing it back for the queue's redrive policy "
            "(set dead_letter_queue_url to move such messages aside)",
        )
        reason = f"cannot decode: {reason}"
        decision = DeadLetter(reason) if self.config.dead_letter_queue_url else Redrive(reason)
        self._apply(received, decision)

    # -- settling --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            message = outcome.message
            received: _Received = message.handle
            if (
                outcome.verdict is Verdict.RETRY
                and outcome.key_held
                and not self._stopping.is_set()
                and received.attempts < self._in_place_limit()
            ):
                self._retry_in_place(message, outcome)
                continue
            if outcome.key_held:
                self._release_key(message)
            self._part_settled(received, outcome)

    def _in_place_limit(self) -> int:
        return self.config.max_deliver

    def _part_settled(
        self, received: _Received, outcome: Outcome | None, *, handed_back: bool = False
    ) -> None:
        if outcome is not None:
            received.worst = worse(received.worst, outcome)
        received.pending -= 1
        if handed_back and received.receipt in self._in_hand:
            # Stopping: back to the queue at once, whatever the other parts do.
            self._in_hand.pop(received.receipt)
            self._forget(received)
            self._visibility(received, 0)
            return
        if received.pending <= 0 and received.receipt in self._in_hand:
            self._settle(received)

    def _settle(self, received: _Received) -> None:
        config = self.config
        decision = decide(
            received.worst,
            attempts=received.attempts,
            max_deliver=config.max_deliver,
            dead_letters=config.dead_letter_queue_url is not None,
            initial=config.retry_delay,
            maximum=config.backoff_max,
        )
        self._apply(received, decision)

    def _apply(self, received: _Received, decision: Delete | Delay | DeadLetter | Redrive) -> None:
        if self._in_hand.pop(received.receipt, None) is None:
            return
        self._forget(received)
        metrics = self._require_ctx().metrics
        if isinstance(decision, Delete):
            self._require_batch().delete(received.queue.url, received.receipt)
            metrics.messages_acked.labels(source=self.name).inc()
        elif isinstance(decision, Delay):
            self._count("retry")
            self._visibility(received, decision.seconds)
        elif isinstance(decision, DeadLetter):
            self._spawn(self._dead_letter(received, decision.reason))
        else:
            self._count("redrive")
            metrics.messages_failed.labels(source=self.name).inc()
            failure = received.worst.first_failure() if received.worst is not None else None
            self._error_log.warning(
                "source %s: message %s on %s failed for good (%s%s); "
                "visible again for the queue's redrive policy",
                self.name,
                received.message_id,
                received.queue.name,
                decision.reason,
                f": {failure.function} -> {failure.status_label}" if failure else "",
            )
            self._visibility(received, 0)

    def _visibility(self, received: _Received, seconds: float) -> None:
        """Hides the message ``seconds`` from now (0: visible at once), within SQS's 12 h."""
        left = MAX_VISIBILITY - (time.monotonic() - received.received_at) - _CEILING_MARGIN
        self._require_batch().change_visibility(
            received.queue.url, received.receipt, max(0.0, min(seconds, left))
        )

    async def _dead_letter(self, received: _Received, reason: str) -> None:
        url = self.config.dead_letter_queue_url
        assert url is not None
        attributes = dead_letter_attributes(
            received.worst,
            queue_url=received.queue.url,
            message_id=received.message_id,
            deliveries=received.attempts,
            reason=reason,
            original=received.message_attributes,
        )
        send: dict[str, Any] = {
            "QueueUrl": url,
            "MessageBody": received.body,
            "MessageAttributes": attributes,
        }
        if received.queue.fifo:
            send["MessageGroupId"] = received.group or "fastconn-dlt"
            send["MessageDeduplicationId"] = received.message_id
        try:
            await self._client.send_message(**send)
        except Exception as exc:
            self._count("dead_letter")
            log.error(
                "source %s: cannot send %s to the dead-letter queue %s: %r; it is received again later",
                self.name,
                received.message_id,
                url,
                exc,
            )
            self._visibility(received, self.config.backoff_max)
            return
        failure = received.worst.first_failure() if received.worst is not None else None
        log.warning(
            "source %s: message %s on %s moved to the dead-letter queue (%s%s)",
            self.name,
            received.message_id,
            received.queue.name,
            reason,
            f": {failure.function} -> {failure.status_label}" if failure else "",
        )
        self._require_ctx().metrics.messages_failed.labels(source=self.name).inc()
        self._require_batch().delete(received.queue.url, received.receipt)

    def _forget(self, received: _Received) -> None:
        """A settled message no longer counts against the receive limit."""
        self._unreserve(1)

    # -- in-place retries (FIFO groups) ----------------------------------------------------

    def _retry_in_place(self, message: Message, outcome: Outcome) -> None:
        """Keeps a FIFO message (hidden, its group's key held) and runs it again after the
        delay: handing it back would let the later messages of its group this replica holds
        overtake it."""
        received: _Received = message.handle
        received.attempts += 1
        delay = decide(
            outcome,
            attempts=received.attempts - 1,
            max_deliver=1 << 30,
            dead_letters=False,
            initial=self.config.retry_delay,
            maximum=self.config.backoff_max,
        )
        seconds = delay.seconds if isinstance(delay, Delay) else self.config.retry_delay
        message.delivery_attempt = received.attempts
        message.resume = True
        self._count("retry")
        loop = asyncio.get_running_loop()
        timer = loop.call_later(seconds, lambda: self._spawn(self._resubmit(message)))
        self._in_place[id(message)] = (message, timer)

    async def _resubmit(self, message: Message) -> None:
        self._in_place.pop(id(message), None)
        try:
            await self._require_ctx().dispatcher.submit(
                [message], self._on_outcomes, asynchronous=self.config.asynchronous_invocation
            )
        except DispatcherClosed:
            self._release_key(message)
            self._part_settled(message.handle, None, handed_back=True)

    # -- visibility upkeep -----------------------------------------------------------------

    async def _keep_hidden(self) -> None:
        """Extends the visibility of messages still in hand (calls slower than the visibility
        timeout, messages waiting for a retry in place or for their group) before it ends."""
        timeout = self.config.visibility_timeout
        tick = max(0.2, min(5.0, timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            batch = self._require_batch()
            for received in list(self._in_hand.values()):
                if received.visible_until - now > timeout / 2:
                    continue
                left = MAX_VISIBILITY - (now - received.received_at) - _CEILING_MARGIN
                seconds = min(timeout, left)
                if seconds <= 0:
                    continue  # at SQS's 12 h ceiling: it becomes visible, and is received again
                batch.change_visibility(received.queue.url, received.receipt, seconds)
                received.visible_until = now + seconds

    # -- bookkeeping -----------------------------------------------------------------------

    def _release_key(self, message: Message) -> None:
        if message.key is not None:
            with contextlib.suppress(DispatcherClosed):
                self._require_ctx().dispatcher.release_key(message.key)

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def _count(self, kind: str, n: int = 1) -> None:
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind=kind).inc(n)

    def _require_batch(self) -> BatchCalls:
        if self._batch is None:
            raise RuntimeError(f"source {self.name} settling before start()")
        return self._batch

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx


def _default_pollers(limit: int, max_messages: int) -> int:
    """Enough concurrent receives to refill the messages in hand (``limit``) within a couple of
    round trips: a receive returns at most ``max_messages``."""
    return max(1, min(16, limit // (max_messages * 2)))


def _int(value: object, default: int) -> int:
    try:
        return int(str(value))
    except ValueError:
        return default
