"""The JetStream source itself: connection, stream and consumer set-up, the continuous
pull, settling and in-place retries (see the package docstring for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from fastconn.deadletter import DLT_PREFIX, DLT_RESPONSE, RESPONSE_EXCERPT, failure_context, response_excerpt
from fastconn.delay_queue import DelayQueue
from fastconn.errors import DispatcherClosed
from fastconn.health import SourceHealth
from fastconn.ingress_store import MESSAGE_ID_HEADER, TOPIC_HEADER, unwrap
from fastconn.message import Message, Outcome
from fastconn.responses import response_messages
from fastconn.source import SourceContext
from fastconn.sources._nats_common import (
    ACK,
    PROGRESS,
    TERM,
    AckWriter,
    RateLimitedLog,
    connect,
    connection_health,
    http_headers,
    nak,
    parse_ack_subject,
    sanitize_header_value,
)
from fastconn.sources.jetstream.config import JetStreamConfig
from fastconn.sources.jetstream.consumer import ensure_consumer, ensure_stream
from fastconn.sources.jetstream.pull import PullWindow, pull_room
from fastconn.sources.jetstream.restart import RestartGate
from fastconn.sources.jetstream.settle import (
    Ack,
    DeadLetter,
    Keep,
    Redeliver,
    decide,
    key_still_held,
    server_drops,
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
# A stored event's envelope (fastconn.ingress_store) is fastconn's, not the sender's.
_RESERVED_STORED: Final = _RESERVED | {TOPIC_HEADER.lower(), MESSAGE_ID_HEADER.lower()}

# The source's own coordinates on dead letters (the rest of the context is fastconn.deadletter's).
DLT_SUBJECT: Final = "fastconn-dlt-original-subject"
DLT_STREAM: Final = "fastconn-dlt-original-stream"
DLT_SEQUENCE: Final = "fastconn-dlt-original-sequence"


@dataclass(eq=False, slots=True)
class _Delivery:
    """One delivery of one stream message, from arrival until it is settled."""

    msg: Any
    touched: float
    stream: str = ""
    seq: int = 0
    deliveries: int = 1
    """This delivery's number: the server's count plus our in-place retries."""
    server_deliveries: int = 1
    """The server's own delivery count (what its ``max_deliver`` is compared with)."""

    def parse_reply(self) -> None:
        """Reads stream, sequence and delivery count from the ack subject."""
        self.stream, self.seq, self.server_deliveries = parse_ack_subject(self.msg.reply)
        self.deliveries = self.server_deliveries


class JetStreamSource:
    def __init__(self, config: JetStreamConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._nc: Any = None
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
        self._pulls = PullWindow(time.monotonic(), silence=3 * _HEARTBEAT)
        self._wake = asyncio.Event()
        self._consumer_lost = False
        self._gate: RestartGate[_Delivery] | None = None
        """Set at start when a crash left messages unacknowledged (strict key order)."""
        self._backlog: deque[_Delivery] = deque()
        """What the gate released, submitted as the dispatcher has room (before new arrivals)."""
        self._stopping = False
        self._intake_closed = False
        # Settling
        self._settle_queue: deque[list[Outcome]] = deque()
        self._settle_ready = asyncio.Event()
        self._settle_closed = False
        self._retries: DelayQueue[Message] = DelayQueue()
        self._dead_letters: set[asyncio.Task[None]] = set()
        self._dead_letter_slots = asyncio.Semaphore(_DEAD_LETTER_CONCURRENCY)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stuck_log = RateLimitedLog(log)
        self._status_log = RateLimitedLog(log)
        self._drop_log = RateLimitedLog(log)
        self._server_max_deliver = -1
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
            await self._ensure_consumer()
        except BaseException:
            with contextlib.suppress(Exception):
                await self._nc.close()
            raise
        self._inbox = self._nc.new_inbox()
        self._inbox_sub = await self._nc.subscribe(
            self._inbox, cb=self._on_inbox, pending_msgs_limit=1 << 20, pending_bytes_limit=1 << 30
        )
        ctx = self._require_ctx()
        for name, job in (
            ("pull", self._pull_loop),
            ("submit", self._submit_loop),
            ("settle", self._settle_loop),
            ("keepalive", self._keepalive_loop),
            ("retry", self._retry_loop),
        ):
            self._tasks[name] = ctx.supervise(f"{self.name}.{name}", job)
        if self._gate is not None:
            # Wakes the submit loop at the gate's deadline even if nothing arrives then.
            wait = max(0.0, self._gate.deadline - time.monotonic())
            asyncio.get_running_loop().call_later(wait, self._buffer_ready.set)

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
        for message in self._retries.drain():
            delivery: _Delivery = message.handle
            self._nak(delivery, self.config.nak_delay)
            self._release_held_key(message)
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

    async def _ensure_consumer(self) -> None:
        c = self.config
        await ensure_stream(self._js, c)
        info = await ensure_consumer(self._js, c)
        self._ack_wait = float(info.config.ack_wait or c.ack_wait)
        self._server_max_deliver = int(info.config.max_deliver or -1)
        if self._server_max_deliver > 0:
            log.error(
                "source %s: consumer %s drops messages after %d deliveries (max_deliver on the "
                'server); each is counted in fastconn_source_errors_total{kind="dropped"}: '
                "delete the consumer (or set its max_deliver to -1) so fastconn keeps them",
                self.name,
                c.durable,
                self._server_max_deliver,
            )
        self._consumer_lost = False
        self._gate_restart(info)

    def _gate_restart(self, info: Any) -> None:
        """Holds new messages while the ones a crash left unacknowledged come back (see
        :mod:`.restart`)."""
        pending = int(info.num_ack_pending or 0)
        if not self.config.strict_restart or pending <= 0 or info.delivered is None:
            return
        self._gate = RestartGate(
            pending=pending,
            last_delivered=int(info.delivered.stream_seq),
            now=time.monotonic(),
            ack_wait=self._ack_wait,
        )
        log.info(
            "source %s: consumer %s has %d unacknowledged message(s) (left by a crash?): messages "
            "are held until those come back (at most %.1fs), so every key keeps its order",
            self.name,
            self.config.durable,
            pending,
            self._gate.deadline - self._gate.started,
        )

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
        # While the restart gate holds messages (outside the dispatcher), the server's
        # max_ack_pending is the only bound: the messages it waits for must still fit.
        window = self.config.max_ack_pending if self._gate else min(self.config.max_ack_pending, d.capacity)
        return pull_room(
            window=window,
            capacity=d.capacity,
            queued=d.queued,
            inflight=len(self._inflight),
            buffered=len(self._buffer),
            requested=self._pulls.requested,
        )

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
            if self._pulls.expire(now):
                log.info("source %s: pull requests went silent; asking again", self.name)
                self._reset_pulls()
            # A consumer deleted under us is not re-created (that would replay the stream from
            # deliver_policy): wait for whoever deleted it to put it back.
            if self._consumer_lost and not await self._consumer_back():
                await asyncio.sleep(5.0)
                continue
            room = self._room()
            # Small top-ups are not worth a request unless nothing at all is asked for.
            if room >= threshold or (room > 0 and self._pulls.requested == 0):
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
                self._pulls.opened(n, now, _PULL_EXPIRES)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), _IDLE_POLL)

    def _reset_pulls(self) -> None:
        self._pulls.reset(time.monotonic())
        self._wake.set()

    def _pull_done(self) -> None:
        """The oldest open pull request ended (408/409) with its remaining count unsent."""
        self._pulls.ended()
        self._wake.set()

    async def _on_inbox(self, msg: Any) -> None:
        now = time.monotonic()
        self._pulls.heard(now)
        reply = msg.reply
        if not reply or not reply.startswith("$JS."):
            self._on_status(msg.headers or {})
            return
        self._pulls.delivered()
        if self._intake_closed:
            self._acks.add(reply, nak())
            await self._acks.flush()
            return
        delivery = _Delivery(msg, now)
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
            if self._gate is not None:
                self._through_gate(batch)
                batch = []
            if self._backlog:
                self._backlog.extend(batch)
                batch = self._from_backlog()
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
                    decode=self.config.decode,
                )
            except DispatcherClosed:
                for delivery in batch:
                    self._nak(delivery, 0)
                await self._acks.flush()
            except Exception:
                # A bug: hand the batch back at once rather than keep it (in-progress acks)
                # with nobody to run it; the supervisor logs and restarts this loop.
                for delivery in batch:
                    self._nak(delivery, 0)
                await self._acks.flush()
                raise

    def _from_backlog(self) -> list[_Delivery]:
        """What of the backlog fits the dispatcher now. Our messages in the dispatcher (or
        waiting for an in-place retry) stay within its capacity, as the pull window keeps them
        normally: a retry of a held key must always find room, or the messages queued behind
        that key would wait for it forever."""
        capacity = self._require_ctx().dispatcher.capacity
        room = capacity - (len(self._inflight) - len(self._backlog))
        n = max(0, min(room, len(self._backlog)))
        return [self._backlog.popleft() for _ in range(n)]

    def _through_gate(self, batch: list[_Delivery]) -> None:
        """Holds ``batch`` at the restart gate; once it opens, everything held goes to the
        backlog in stream order."""
        gate = self._gate
        assert gate is not None
        for delivery in batch:
            delivery.parse_reply()
            gate.hold(delivery.seq, delivery)
        now = time.monotonic()
        if not gate.ready(now):
            return
        self._gate = None
        self._wake.set()  # the pull window shrinks back to the dispatcher's capacity
        if gate.remaining > 0:
            log.warning(
                "source %s: %d of %d unacknowledged message(s) did not come back within %.1fs "
                "(another replica took them, or they wait for a nak delay); going on: those may "
                "run after newer messages of their key",
                self.name,
                gate.remaining,
                gate.pending,
                now - gate.started,
            )
        else:
            log.info(
                "source %s: the %d unacknowledged message(s) came back after %.1fs; dispatching "
                "them and %d newer one(s) in stream order",
                self.name,
                gate.pending,
                now - gate.started,
                gate.held - gate.pending,
            )
        self._backlog.extend(gate.release())

    def _to_message(self, d: _Delivery) -> Message:
        msg = d.msg
        d.parse_reply()
        topic, message_id = msg.subject, f"{d.stream}/{d.seq}"
        stored = unwrap(msg.headers) if self.config.stored_events else None
        if stored is not None:
            # Routed by the topic it was accepted on; the id is the one its 202 carried.
            topic, message_id = stored
        reserved = _RESERVED_STORED if self.config.stored_events else _RESERVED
        headers = http_headers(msg.headers, reserved) if msg.headers else []
        headers.append(("X-Nats-Stream", d.stream))
        headers.append(("X-Nats-Sequence", str(d.seq)))
        key = self._key(msg) if self.config.ordering == "key" else None
        return Message(
            topic,
            msg.data,
            headers,
            message_id=message_id,
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

    async def _publish_responses(self, subject: str, outcomes: list[Outcome]) -> None:
        """Publishes the results of a batch before it is acknowledged, in the settle loop: a
        slow response path slows settling, hence the pull window and intake, instead of
        growing a task per batch."""
        try:
            for outcome in outcomes:
                for body, headers in response_messages(outcome):
                    await self._nc.publish(subject, body, headers=headers)
        except Exception as exc:
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="response").inc()
            log.warning("source %s: could not publish responses to %s: %s", self.name, subject, exc)

    async def _settle_loop(self) -> None:
        metrics = self._require_ctx().metrics
        acked_counter = metrics.messages_acked.labels(source=self.name)
        while True:
            await self._settle_ready.wait()
            self._settle_ready.clear()
            acked = 0
            while self._settle_queue:
                outcomes = self._settle_queue.popleft()
                if self.config.response_subject:
                    await self._publish_responses(self.config.response_subject, outcomes)
                for outcome in outcomes:
                    acked += self._settle(outcome)
            await self._acks.flush()
            if acked:
                acked_counter.inc(acked)
            self._wake.set()
            if self._backlog:
                self._buffer_ready.set()
            if self._settle_closed and not self._settle_queue:
                return

    def _settle(self, outcome: Outcome) -> int:
        """Acts on one outcome; returns 1 when the message was acknowledged."""
        delivery: _Delivery = outcome.message.handle
        c = self.config
        decision = decide(
            outcome,
            deliveries=delivery.deliveries,
            max_deliver=c.max_deliver,
            dead_letters=c.dead_letter_subject is not None,
            stopping=self._stopping,
            nak_delay=c.nak_delay,
            nak_delay_max=c.nak_delay_max,
        )
        if isinstance(decision, Ack):
            self._inflight.discard(delivery)
            self._acks.add(delivery.msg.reply, ACK)
            return 1
        if isinstance(decision, Redeliver):
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="nak").inc()
            if decision.in_place:
                self._schedule_retry(outcome.message, decision.delay)
            else:
                self._nak(delivery, decision.delay)
                self._release_key(outcome)
            return 0
        if isinstance(decision, DeadLetter):
            # Supervised: should it fail unexpectedly it runs again (Nats-Msg-Id makes a
            # repeated publish a duplicate the stream drops) rather than strand the message.
            reason = decision.reason
            task = self._require_ctx().supervise(
                f"{self.name}.dead-letter", lambda: self._dead_letter(outcome, reason)
            )
            self._dead_letters.add(task)
            task.add_done_callback(self._dead_letters.discard)
            return 0
        self._keep(outcome, decision)
        return 0

    def _nak(self, delivery: _Delivery, delay: float) -> None:
        """Queues a nak (sent with the next flush of the ack writer)."""
        self._inflight.discard(delivery)
        self._acks.add(delivery.msg.reply, nak(delay))
        if server_drops(self._server_max_deliver, delivery.server_deliveries):
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="dropped").inc()
            self._drop_log.warning(
                "source %s: message %s/%d was handed back for the last time the server allows "
                "(its max_deliver is %d): the server drops it",
                self.name,
                delivery.stream,
                delivery.seq,
                self._server_max_deliver,
            )

    def _release_key(self, outcome: Outcome) -> None:
        """Gives back the message's ordering key when the core still holds it for this message
        (which will not be resubmitted in place)."""
        if key_still_held(outcome):
            self._release_held_key(outcome.message)

    def _release_held_key(self, message: Message) -> None:
        """Gives back the key held for ``message``, a scheduled in-place retry that will not run."""
        if message.key is not None:
            with contextlib.suppress(DispatcherClosed):
                self._require_ctx().dispatcher.release_key(message.key)

    def _keep(self, outcome: Outcome, decision: Keep) -> None:
        """A final failure without a dead-letter subject: the message stays (nak), said so."""
        ctx = self._require_ctx()
        ctx.metrics.source_errors.labels(source=self.name, kind="stuck").inc()
        failure = outcome.first_failure()
        self._stuck_log.warning(
            "source %s: message %s on %s failed for good (%s: %s) and stays in the stream "
            "unacknowledged: set dead_letter_subject to move such messages aside",
            self.name,
            outcome.message_id,
            outcome.message.topic,
            decision.reason,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._nak(outcome.message.handle, decision.delay)
        self._release_key(outcome)

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
                self._release_key(outcome)
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
            self._release_key(outcome)

    def _dead_letter_headers(self, outcome: Outcome, reason: str) -> dict[str, str]:
        """The original headers plus the failure context (:mod:`fastconn.deadletter`)."""
        delivery: _Delivery = outcome.message.handle
        original = delivery.msg.headers or {}
        # The publisher's Nats-* headers (message id, expected stream...) would steer the
        # dead-letter publish, and earlier context would be stale: both are dropped. Our own
        # Nats-Msg-Id makes a repeated dead-lettering of one message a duplicate the stream drops.
        headers = {k: v for k, v in original.items() if not k.lower().startswith(("nats-", DLT_PREFIX))}
        headers["Nats-Msg-Id"] = f"dlq:{delivery.stream}/{delivery.seq}"
        origin = [
            (DLT_SUBJECT, delivery.msg.subject),
            (DLT_STREAM, delivery.stream),
            (DLT_SEQUENCE, str(delivery.seq)),
        ]
        headers.update(failure_context(outcome, origin, deliveries=delivery.deliveries, reason=reason))
        excerpt = response_excerpt(outcome)
        if excerpt is not None:
            text = excerpt.decode("utf-8", "replace")
            headers[DLT_RESPONSE] = sanitize_header_value(text, RESPONSE_EXCERPT)
        return headers

    # -- in-place retries (key ordering) ---------------------------------------------------

    def _schedule_retry(self, message: Message, delay: float) -> None:
        delivery: _Delivery = message.handle
        delivery.deliveries += 1
        message.delivery_attempt = delivery.deliveries
        message.resume = True
        self._retries.push(message, delay)

    async def _retry_loop(self) -> None:
        ctx = self._require_ctx()
        while True:
            due = await self._retries.next_due()
            try:
                await ctx.resubmit(
                    due,
                    self._on_outcomes,
                    capture=bool(self.config.response_subject),
                    asynchronous=self.config.asynchronous_invocation,
                    decode=self.config.decode,
                )
            except (DispatcherClosed, asyncio.CancelledError) as exc:
                for message in due:
                    self._nak(message.handle, 0)
                    self._release_held_key(message)
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
