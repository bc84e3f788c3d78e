"""The RabbitMQ source itself: connection, declarations, consuming, settling (see the package
docstring for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from fastconn.deadletter import DLT_PREFIX, DLT_RESPONSE, failure_context, response_excerpt
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import ConnectionHealth, SourceHealth, describe_error, display_servers
from fastconn.message import Message, Outcome
from fastconn.ratelimit import RateLimitedLog
from fastconn.responses import request_reply
from fastconn.source import SourceContext
from fastconn.sources.rabbitmq import frames
from fastconn.sources.rabbitmq.acks import AckWindow
from fastconn.sources.rabbitmq.config import RabbitMQConfig
from fastconn.sources.rabbitmq.headers import (
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    amqp_headers,
)
from fastconn.sources.rabbitmq.metrics import rabbitmq_collector
from fastconn.sources.rabbitmq.settle import (
    Ack,
    DeadLetter,
    Keep,
    Retry,
    decide,
    delay_levels,
    deliveries,
    message_digest,
    retry_queue,
)

log = logging.getLogger("fastconn.source.rabbitmq")

_STOP_TIMEOUT: Final = 10.0
_PUBLISH_TIMEOUT: Final = 10.0
_PUBLISH_CONCURRENCY: Final = 64
_ACK_LINGER: Final = 0.05
"""How long a settled message may wait for a ``multiple`` ack before it is acknowledged alone."""
_ACK_INTERVAL: Final = 0.005
"""How often acks held back (:mod:`.acks`) are sent, at most: outcomes come a few at a time."""
_LINGER: Final = 0.002
"""How long a small batch waits for more arrivals while calls are in flight anyway: aio-pika
hands over one message per task, and every crossing into the core has a fixed cost."""

# The source's own coordinates on dead letters (the rest of the context is fastconn.deadletter's).
DLT_EXCHANGE: Final = "fastconn-dlt-original-exchange"
DLT_ROUTING_KEY: Final = "fastconn-dlt-original-routing-key"
DLT_QUEUE: Final = "fastconn-dlt-original-queue"


class _Incoming:
    """A delivered message as aiormq hands it over, read directly: aio-pika's
    ``IncomingMessage`` (and the task it starts per message) costs more than the rest of
    a message's way through this source."""

    __slots__ = ("body", "channel", "delivery", "props")

    def __init__(self, message: DeliveredMessage) -> None:
        self.body: bytes = message.body
        self.channel: Any = message.channel
        self.delivery: Any = message.delivery
        self.props: Basic.Properties = message.header.properties

    @property
    def headers(self) -> Mapping[str, Any] | None:
        return self.props.headers

    @property
    def message_id(self) -> str | None:
        return self.props.message_id

    @property
    def reply_to(self) -> str | None:
        return self.props.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self.props.correlation_id

    @property
    def content_type(self) -> str | None:
        return self.props.content_type

    @property
    def redelivered(self) -> bool:
        return bool(self.delivery.redelivered)

    async def nack(self, *, requeue: bool) -> None:
        await self.channel.basic_nack(self.delivery.delivery_tag, requeue=requeue)


@dataclass(eq=False, slots=True)
class _Delivery:
    """One delivery of one queue message, from arrival until it is settled."""

    msg: _Incoming
    queue: str
    exchange: str
    routing_key: str
    deliveries: int
    message_id: str
    channel: Any
    """The (aiormq) channel it came on: its delivery tag means something only there."""
    tag: int


class RabbitMQSource:
    def __init__(self, config: RabbitMQConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._declared: dict[str, AbstractQueue] = {}
        self._consumers: list[tuple[Any, str]] = []
        """(aiormq channel, consumer tag) of the consumers now running."""
        self._levels = delay_levels(config.retry_delay, config.backoff_max)
        self._retry_queues: set[str] = set()
        self._key_header = None if config.ordering_key == "routing_key" else config.ordering_key.lower()
        self._buffer: list[_Delivery] = []
        self._buffer_ready = asyncio.Event()
        self._submit_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._publish_slots = asyncio.Semaphore(_PUBLISH_CONCURRENCY)
        self._in_place: dict[Message, asyncio.TimerHandle] = {}
        self._windows: dict[Any, AckWindow] = {}
        self._overdue_timer: asyncio.TimerHandle | None = None
        self._prefetch = 1
        self._ack_order = asyncio.Lock()
        """Acks are computed and sent one group at a time: a ``multiple`` ack sent before an
        earlier group's would cover that group's tags, whose own ack the broker then refuses
        (unknown delivery tag), closing the channel."""
        self._stopping = False
        self._intake_closed = False
        self._stuck: set[str] = set()
        """Ids of messages kept after a final failure (no dead-letter exchange), until settled."""
        self._stuck_log = RateLimitedLog(log)
        self._error_log = RateLimitedLog(log)
        self._health = ConnectionHealth(self.name, display_servers([config.url]), log)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        """The broker connection's state (see :mod:`fastconn.health`)."""
        return self._health.health()

    @property
    def stuck_messages(self) -> int:
        return len(self._stuck)

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        rabbitmq_collector(ctx.metrics.registry).sources.append(self)

    async def start(self) -> None:
        ctx = self._require_ctx()
        frames.install()
        try:
            self._connection = await aio_pika.connect_robust(
                self.config.connection_url(),
                ssl_context=self.config.ssl_context(),
                timeout=self.config.startup_timeout,
                client_properties={"connection_name": f"fastconn {self.name}"},
            )
        except SourceError:
            raise
        except Exception as exc:
            why = describe_error(exc)
            self._health.failing(why)
            raise SourceError(
                f"source {self.name!r}: cannot connect to RabbitMQ at {display_servers([self.config.url])}: "
                f"{why}{_connect_hint(exc)}"
            ) from None
        try:
            await self._declare_and_consume(ctx)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._connection.close()
            raise
        self._connection.close_callbacks.add(self._on_connection_closed)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        self._submit_task = ctx.supervise(f"{self.name}.submit", self._submit_loop)

    async def _declare_and_consume(self, ctx: SourceContext) -> None:
        connection = self._connection
        assert connection is not None
        self._publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel = self._consume_channel = await connection.channel()
        total = self.config.prefetch or min(65535, ctx.dispatcher.capacity)
        # Per consumer, the total split between the queues: a channel-wide ("global") limit is
        # much more expensive for the broker, and quorum queues do not support it.
        prefetch = self._prefetch = max(1, total // len(self.config.queues))
        await channel.set_qos(prefetch_count=prefetch)
        declared: dict[str, AbstractQueue] = {}
        for spec in self.config.queues:
            declared[spec.name] = await channel.declare_queue(
                spec.name,
                durable=spec.durable,
                auto_delete=spec.auto_delete,
                exclusive=spec.exclusive,
                arguments=dict(spec.arguments) or None,
            )
        for binding in self.config.bindings:
            exchange = await channel.declare_exchange(
                binding.exchange, binding.exchange_type, durable=binding.durable
            )
            await declared[self.config.binding_queue(binding)].bind(exchange, routing_key=binding.routing_key)
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning(
                "source %s: waiting for the topic map before consuming (messages stay queued)", self.name
            )
        self._declared = declared
        await self._consume()
        channel.reopen_callbacks.add(self._on_channel_reopened)
        log.info("source %s: consuming %s (prefetch %d)", self.name, ", ".join(declared), prefetch)

    async def stop(self) -> None:
        """Stops consuming; what arrived goes to the dispatcher, later arrivals and scheduled
        in-place retries go back to the queue at once."""
        self._stopping = True
        for underlay, tag in self._consumers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(underlay.basic_cancel(tag), 5)
        self._intake_closed = True
        self._buffer_ready.set()
        await _finish(self._submit_task, _STOP_TIMEOUT)
        for message, timer in list(self._in_place.items()):
            timer.cancel()
            await self._requeue(message.handle)
            self._release_key(message, held=True)
        self._in_place.clear()

    async def close(self) -> None:
        """After the dispatcher drained: finishes acks and publishes, disconnects (the broker
        requeues whatever is still unacknowledged)."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_STOP_TIMEOUT)
        if self._overdue_timer is not None:
            self._overdue_timer.cancel()
            self._overdue_timer = None
        # Acks held back for a multiple ack: sent now, or the broker redelivers those messages.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._send_overdue(everything=True), _STOP_TIMEOUT)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    # -- intake ----------------------------------------------------------------------------

    async def _consume(self) -> None:
        """Starts one consumer per queue on the consuming channel's current (aiormq) channel.
        Consumers are started here rather than by aio-pika, which would restore them on a
        reopened channel itself but wrap every message in an ``IncomingMessage`` and a task;
        deliveries reach :meth:`_take` straight from the channel's reader (:mod:`.frames`)."""
        channel = self._consume_channel
        assert channel is not None
        underlay = await channel.get_underlay_channel()
        consumers = []
        for name in self._declared:
            ok = await frames.consume_directly(underlay, name, self._on_message_for(name))
            consumers.append((underlay, str(ok.consumer_tag)))
        self._consumers = consumers

    async def _on_channel_reopened(self, _sender: Any) -> None:
        """The channel came back (after a channel error or a reconnection), its queues
        re-declared by aio-pika: consume again."""
        if self._stopping:
            return
        try:
            await self._consume()
        except Exception as exc:
            self._count("consume")
            log.error("source %s: cannot consume again after the channel reopened: %r", self.name, exc)

    def _on_message_for(self, queue: str) -> Callable[[DeliveredMessage], None]:
        def on_message(message: DeliveredMessage) -> None:
            self._take(queue, _Incoming(message))

        return on_message

    def _take(self, queue: str, msg: _Incoming) -> None:
        if self._intake_closed:
            self._spawn(self._requeue_delivery(msg))
            return
        channel = msg.channel
        if channel.is_closed:
            return  # the broker delivers it again
        tag = int(msg.delivery.delivery_tag or 0)
        window = self._windows.get(channel)
        if window is None:
            # A quarter of the prefetch at most waits for its ack: the broker goes on delivering.
            window = self._windows[channel] = AckWindow(_ACK_LINGER, batch=max(1, self._prefetch // 4))
        window.delivered(tag)
        headers = msg.headers or {}
        exchange = _header_text(headers.get(ORIGINAL_EXCHANGE), msg.delivery.exchange or "")
        routing_key = _header_text(headers.get(ORIGINAL_ROUTING_KEY), msg.delivery.routing_key or "")
        message_id = msg.message_id or message_digest(exchange, routing_key, msg.body, msg.props.timestamp)
        attempt = deliveries(headers, queue, bool(msg.redelivered))
        delivery = _Delivery(msg, queue, exchange, routing_key, attempt, message_id, channel, tag)
        self._buffer.append(delivery)
        if len(self._buffer) == 1:
            self._buffer_ready.set()

    async def _submit_loop(self) -> None:
        ctx = self._require_ctx()
        batch_size = max(1, ctx.dispatcher.options.batch_size)
        while True:
            await self._buffer_ready.wait()
            if len(self._buffer) < batch_size // 4 and ctx.dispatcher.queued and not self._intake_closed:
                await asyncio.sleep(_LINGER)
            self._buffer_ready.clear()
            batch, self._buffer = self._buffer[:batch_size], self._buffer[batch_size:]
            if self._buffer:
                self._buffer_ready.set()
            if not batch:
                if self._intake_closed:
                    return
                continue
            plain = [self._to_message(d) for d in batch if not _is_request(d.msg)]
            requests = [self._to_message(d) for d in batch if _is_request(d.msg)]
            try:
                for messages, capture in ((plain, False), (requests, True)):
                    if messages:
                        await ctx.submit(
                            self.name,
                            messages,
                            self._on_outcomes,
                            capture=capture,
                            asynchronous=self.config.asynchronous_invocation,
                            decode=self.config.decode,
                        )
            except DispatcherClosed:
                # Not acknowledged: the broker gives them back when the connection closes.
                log.warning("source %s: %d message(s) not dispatched: shutting down", self.name, len(batch))
                return

    def _to_message(self, d: _Delivery) -> Message:
        msg = d.msg
        headers = amqp_headers(msg.headers)
        headers += [
            ("X-Rabbitmq-Routing-Key", d.routing_key),
            ("X-Rabbitmq-Exchange", d.exchange),
            ("X-Rabbitmq-Redelivered", "true" if msg.redelivered else "false"),
        ]
        if msg.message_id:
            headers.append(("X-Rabbitmq-Msg-Id", msg.message_id))
        if msg.content_type:
            headers.append(("Content-Type", msg.content_type))
        key = self._key(d) if self.config.ordering == "key" else None
        return Message(
            d.queue,
            msg.body,
            headers,
            message_id=d.message_id,
            key=key,
            delivery_attempt=d.deliveries,
            hold_key_on_retry=key is not None,
            hold_key_on_failure=key is not None and self.config.dead_letter_exchange is None,
            handle=d,
        )

    def _key(self, d: _Delivery) -> bytes | None:
        if self._key_header is None:
            return d.routing_key.encode()
        for name, value in (d.msg.headers or {}).items():
            if name.lower() == self._key_header:
                text = _header_text(value, "")
                return text.encode() if text else None
        return None

    # -- settling --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        acks: list[_Delivery] = []
        for outcome in outcomes:
            delivery: _Delivery = outcome.message.handle
            decision = decide(
                outcome,
                deliveries=delivery.deliveries,
                max_deliver=self.config.max_deliver,
                dead_letters=self.config.dead_letter_exchange is not None,
                stopping=self._stopping,
                levels=self._levels,
            )
            if not isinstance(decision, Keep):
                self._stuck.discard(delivery.message_id)
            if isinstance(decision, Ack):
                acks.append(delivery)
                self._reply(outcome)
            elif isinstance(decision, Retry):
                self._count("retry")
                if decision.in_place:
                    self._retry_in_place(outcome.message, decision.delay)
                else:
                    self._release_key(outcome.message, held=outcome.key_held)
                    self._spawn(self._to_retry_queue(delivery, decision.delay))
            elif isinstance(decision, DeadLetter):
                self._release_key(outcome.message, held=outcome.key_held)
                self._spawn(self._dead_letter(outcome, decision.reason))
            else:
                self._keep(outcome, decision)
        if acks:
            self._spawn(self._ack(acks))

    async def _ack(self, batch: list[_Delivery]) -> None:
        failed = await self._send_acks(batch)
        acked = len(batch) - failed
        ctx = self._require_ctx()
        if acked:
            ctx.metrics.messages_acked.labels(source=self.name).inc(acked)
        if failed:
            # The channel they came on is gone: the broker delivers them again (a duplicate).
            self._count("ack", failed)
            self._error_log.warning(
                "source %s: %d ack(s) not sent (connection lost); the broker redelivers those messages",
                self.name,
                failed,
            )

    async def _send_acks(self, batch: list[_Delivery]) -> int:
        """Acknowledges ``batch`` with as few frames as the window allows (:mod:`.acks`);
        returns how many could not be acknowledged (their channel is gone)."""
        by_channel: dict[Any, list[int]] = {}
        for d in batch:
            by_channel.setdefault(d.channel, []).append(d.tag)
        failed = 0
        async with self._ack_order:
            failed = await self._send_grouped(by_channel)
        return failed

    async def _send_grouped(self, by_channel: dict[Any, list[int]]) -> int:
        failed = 0
        now = asyncio.get_running_loop().time()
        for channel, tags in by_channel.items():
            if channel.is_closed:
                failed += len(tags)
                continue
            window = self._windows.get(channel)
            try:
                # No drain per frame: the acks go out with the next socket write.
                if window is None:
                    for tag in tags:
                        await channel.basic_ack(tag, wait=False)
                    continue
                upto = window.settle(tags, now)
                if upto is not None:
                    await channel.basic_ack(upto, multiple=True, wait=False)
            except Exception:
                failed += len(tags)
        self._schedule_overdue()
        return failed

    def _schedule_overdue(self) -> None:
        """Sends what the ack windows hold back (:mod:`.acks`) once it has waited long enough."""
        if self._overdue_timer is None and any(w.pending for w in self._windows.values()):
            loop = asyncio.get_running_loop()
            self._overdue_timer = loop.call_later(_ACK_INTERVAL, self._on_overdue)

    def _on_overdue(self) -> None:
        self._overdue_timer = None
        self._spawn(self._send_overdue())

    async def _send_overdue(self, *, everything: bool = False) -> None:
        """Sends the ``multiple`` acks due and acknowledges the settled messages that waited
        ``_ACK_LINGER`` for one (``everything``: all settled ones, before disconnecting)."""
        failed = 0
        async with self._ack_order:
            now = math.inf if everything else asyncio.get_running_loop().time()
            for channel, window in list(self._windows.items()):
                upto, singles = window.overdue(now)
                if channel.is_closed:
                    continue  # the broker requeued them: counted when they were settled
                try:
                    if upto is not None:
                        await channel.basic_ack(upto, multiple=True, wait=False)
                    for tag in singles:
                        await channel.basic_ack(tag, wait=False)
                except Exception:
                    failed += len(singles) + (upto is not None)
        if failed:
            self._count("ack", failed)
        if not everything:
            self._schedule_overdue()

    def _keep(self, outcome: Outcome, decision: Keep) -> None:
        """A final failure without a dead-letter exchange: kept, retried every ``backoff_max``."""
        self._count("stuck")
        self._stuck.add(outcome.message_id)
        failure = outcome.first_failure()
        self._stuck_log.warning(
            "source %s: message %s on %s failed for good (%s: %s) and is kept, retried every %gs: "
            "set dead_letter_exchange to move such messages aside",
            self.name,
            outcome.message_id,
            outcome.message.topic,
            decision.reason,
            failure and f"{failure.function} -> {failure.status_label}",
            decision.delay,
        )
        if outcome.key_held and not self._stopping:
            self._retry_in_place(outcome.message, decision.delay)
        else:
            self._release_key(outcome.message, held=outcome.key_held)
            self._spawn(self._to_retry_queue(outcome.message.handle, decision.delay))

    # -- retries ---------------------------------------------------------------------------

    def _retry_in_place(self, message: Message, delay: float) -> None:
        """Keeps the message (unacknowledged) and its key, and runs it again after ``delay``:
        a retry through a queue would let the key's later messages overtake it."""
        delivery: _Delivery = message.handle
        delivery.deliveries += 1
        message.delivery_attempt = delivery.deliveries
        message.resume = True
        loop = asyncio.get_running_loop()
        self._in_place[message] = loop.call_later(delay, lambda: self._spawn(self._resubmit(message)))

    async def _resubmit(self, message: Message) -> None:
        self._in_place.pop(message, None)
        try:
            await self._require_ctx().resubmit(
                [message],
                self._on_outcomes,
                capture=_is_request(message.handle.msg),
                asynchronous=self.config.asynchronous_invocation,
                decode=self.config.decode,
            )
        except DispatcherClosed:
            await self._requeue(message.handle)

    async def _to_retry_queue(self, delivery: _Delivery, delay: float) -> None:
        """Moves the message to the retry queue of ``delay``, which dead-letters it back to its
        queue when the delay is over; then acknowledges it here. Other messages of the queue go
        on meanwhile. A crash between the two leaves it in both places: a duplicate, not a loss."""
        name = retry_queue(delivery.queue, delay)
        try:
            await self._ensure_retry_queue(name, delivery.queue, delay)
            headers = dict(delivery.msg.headers or {})
            headers.setdefault(ORIGINAL_EXCHANGE, delivery.exchange)
            headers.setdefault(ORIGINAL_ROUTING_KEY, delivery.routing_key)
            await self._publish("", name, self._copy(delivery, headers))
        except Exception as exc:
            self._count("retry_publish")
            self._error_log.warning(
                "source %s: cannot move %s to retry queue %s (%r); handing it back to %s",
                self.name,
                delivery.message_id,
                name,
                exc,
                delivery.queue,
            )
            await self._requeue(delivery)
            return
        await self._settled_elsewhere(delivery)

    async def _ensure_retry_queue(self, name: str, queue: str, delay: float) -> None:
        if name in self._retry_queues:
            return
        channel = self._publish_channel
        assert channel is not None
        await channel.declare_queue(
            name,
            durable=True,
            arguments={
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )
        self._retry_queues.add(name)

    # -- dead letters ----------------------------------------------------------------------

    async def _dead_letter(self, outcome: Outcome, reason: str) -> None:
        delivery: _Delivery = outcome.message.handle
        exchange = self.config.dead_letter_exchange or ""
        routing_key = self.config.dead_letter_routing_key or delivery.routing_key
        try:
            await self._publish(
                exchange, routing_key, self._copy(delivery, self._dead_letter_headers(outcome, reason))
            )
        except Exception as exc:
            self._count("dead_letter")
            log.error(
                "source %s: cannot dead-letter %s to exchange %r (routing key %r): %r; the message is kept",
                self.name,
                outcome.message_id,
                exchange,
                routing_key,
                exc,
            )
            await self._to_retry_queue(delivery, self._levels[-1])
            return
        failure = outcome.first_failure()
        log.warning(
            "source %s: message %s on %s dead-lettered to exchange %r (%s: %s)",
            self.name,
            outcome.message_id,
            outcome.message.topic,
            exchange,
            reason,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._require_ctx().metrics.messages_failed.labels(source=self.name).inc()
        self._reply(outcome)
        await self._settled_elsewhere(delivery)

    def _dead_letter_headers(self, outcome: Outcome, reason: str) -> dict[str, Any]:
        """The original headers plus the failure context (:mod:`fastconn.deadletter`)."""
        delivery: _Delivery = outcome.message.handle
        original = delivery.msg.headers or {}
        stale = (DLT_PREFIX, "x-death", ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY)
        headers: dict[str, Any] = {k: v for k, v in original.items() if not k.lower().startswith(stale)}
        origin = [
            (DLT_EXCHANGE, delivery.exchange),
            (DLT_ROUTING_KEY, delivery.routing_key),
            (DLT_QUEUE, delivery.queue),
        ]
        headers.update(failure_context(outcome, origin, deliveries=delivery.deliveries, reason=reason))
        excerpt = response_excerpt(outcome)
        if excerpt is not None:
            headers[DLT_RESPONSE] = excerpt.decode("utf-8", "replace")
        return headers

    # -- replies (RPC) ---------------------------------------------------------------------

    def _reply(self, outcome: Outcome) -> None:
        """A message with ``reply_to`` and ``correlation_id`` gets the first function's
        response published to ``reply_to`` (the RPC pattern)."""
        delivery: _Delivery = outcome.message.handle
        msg = delivery.msg
        if not _is_request(msg):
            return
        body, headers = request_reply(outcome, "no function subscribes to this queue")
        content_type = headers.pop("Content-Type", None)
        reply = aio_pika.Message(
            body,
            headers=dict(headers.items()),
            content_type=content_type,
            correlation_id=msg.correlation_id,
            message_id=f"reply:{outcome.message_id}",
        )
        self._spawn(self._publish_reply(str(msg.reply_to), reply))

    async def _publish_reply(self, reply_to: str, reply: aio_pika.Message) -> None:
        try:
            await self._publish("", reply_to, reply, mandatory=False)
        except Exception as exc:
            self._count("reply")
            self._error_log.warning("source %s: cannot publish the reply to %s: %r", self.name, reply_to, exc)

    # -- broker operations -----------------------------------------------------------------

    async def _publish(
        self, exchange: str, routing_key: str, message: aio_pika.Message, *, mandatory: bool = True
    ) -> None:
        """Publishes with a broker confirmation; ``mandatory``: an unroutable message is an error."""
        channel = self._publish_channel
        assert channel is not None
        async with self._publish_slots:
            target = (
                channel.default_exchange
                if not exchange
                else await channel.get_exchange(exchange, ensure=False)
            )
            await target.publish(message, routing_key, mandatory=mandatory, timeout=_PUBLISH_TIMEOUT)

    @staticmethod
    def _copy(delivery: _Delivery, headers: dict[str, Any]) -> aio_pika.Message:
        msg = delivery.msg
        props = msg.props
        return aio_pika.Message(
            msg.body,
            headers=headers,
            content_type=props.content_type,
            content_encoding=props.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=props.priority,
            correlation_id=props.correlation_id,
            reply_to=props.reply_to,
            message_id=delivery.message_id,
            timestamp=props.timestamp,
            type=props.message_type,
            app_id=props.app_id,
        )

    async def _settled_elsewhere(self, delivery: _Delivery) -> None:
        """Acknowledges a message that now lives in another queue."""
        await self._send_acks([delivery])

    async def _requeue(self, delivery: _Delivery) -> None:
        # The nack first: until the window forgets the tag, no multiple ack can cover it.
        await self._requeue_delivery(delivery.msg)
        window = self._windows.get(delivery.channel)
        if window is not None:
            window.forget([delivery.tag])
            self._schedule_overdue()

    async def _requeue_delivery(self, msg: _Incoming) -> None:
        # Fails only when the channel is gone: then the broker has requeued it already.
        with contextlib.suppress(Exception):
            await msg.nack(requeue=True)

    # -- bookkeeping -----------------------------------------------------------------------

    def _release_key(self, message: Message, *, held: bool) -> None:
        """Gives back the key the core holds for ``message`` (which will not be resumed)."""
        if held and message.key is not None:
            with contextlib.suppress(DispatcherClosed):
                self._require_ctx().dispatcher.release_key(message.key)

    def _spawn(self, job: Awaitable[None]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _count(self, kind: str, n: int = 1) -> None:
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind=kind).inc(n)

    async def _on_connection_closed(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._stopping:
            self._health.lost()
            if exc is not None:
                self._count("connection")
                self._error_log.warning("source %s: connection lost: %r; reconnecting", self.name, exc)

    async def _on_reconnected(self, _sender: Any) -> None:
        self._health.restored()
        # The old channels' tags are void: the broker requeued those messages.
        for channel in [c for c in self._windows if c.is_closed]:
            del self._windows[channel]

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx


def _is_request(msg: _Incoming) -> bool:
    return bool(msg.reply_to) and bool(msg.correlation_id)


def _header_text(value: object, default: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else default


async def _finish(task: asyncio.Task[None] | None, timeout: float) -> None:
    """Waits up to ``timeout`` for ``task`` to end by itself, then cancels it."""
    if task is None or task.done():
        return
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _connect_hint(exc: BaseException) -> str:
    """The likely fix of a refused first connection, from the error's text."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            " -- the broker's certificate is not trusted: set tls_ca to the CA that signed it, and "
            "use a url host name that the certificate names"
        )
    if "ACCESS_REFUSED" in text or "authentication" in text.lower():
        return " -- check the user name and password (in the url, or username_file/password_file)"
    if "SSL" in text or "handshake" in text.lower() or "EOF occurred" in text:
        return (
            " -- the TLS handshake failed: check that the port speaks TLS (amqps://, usually 5671) and "
            "whether the broker requires a client certificate (tls_cert/tls_key)"
        )
    return ""
