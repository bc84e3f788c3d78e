"""The MQTT source: intake from the paho bridge, settling (in-order acknowledgements, in-place
retries, dead letters) and MQTT 5 responses (see the package docstring for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Final

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fastconn.backoff import doubling
from fastconn.deadletter import DLT_PREFIX, DLT_RESPONSE, RESPONSE_EXCERPT, failure_context, response_excerpt
from fastconn.delay_queue import DelayQueue
from fastconn.errors import DispatcherClosed
from fastconn.headers import passthrough
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.ratelimit import RateLimitedLog
from fastconn.responses import response_messages
from fastconn.source import SourceContext
from fastconn.sources.mqtt.acks import AckWindow, Delivery
from fastconn.sources.mqtt.client import MqttBridge, Received, new_properties
from fastconn.sources.mqtt.config import MqttConfig, check_filter

__all__ = ["DLT_TOPIC", "MqttSource"]

log = logging.getLogger("fastconn.source.mqtt")

DLT_TOPIC: Final = "fastconn-dlt-original-topic"
_RESERVED: Final = frozenset({"x-mqtt-qos", "x-mqtt-retain", "x-mqtt-message-id", "content-type"})
_DEAD_LETTER_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0


@dataclass(eq=False, slots=True)
class _Pending:
    """One received message from arrival until it is acknowledged (or given up)."""

    msg: Any
    delivery: Delivery | None
    """None for QoS 0 (nothing to acknowledge)."""
    attempts: int = 1


class MqttSource:
    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._bridge: MqttBridge | None = None
        self._window = AckWindow()
        self._acks: list[Delivery] = []
        """Acknowledgements due, written together at the end of the loop's turn."""
        self._health = ConnectionHealth(self.name, config.endpoint.display, log)
        self._static: tuple[str, ...] | None = None
        self._has_data = asyncio.Event()
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._retries: DelayQueue[Message] = DelayQueue()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._failed_log = RateLimitedLog(log)
        self._drop_log = RateLimitedLog(log)

    # -- lifecycle -------------------------------------------------------------------------

    def health(self) -> SourceHealth:
        return self._health.health()

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        if self.config.topics:
            self._static = self.config.topics
        elif ctx.default_topics:
            self._static = ctx.default_topics
        else:
            ctx.on_topics_changed(self._topics_changed)

    async def start(self) -> None:
        ctx = self._require_ctx()
        receive_maximum = self.config.receive_maximum or ctx.dispatcher.capacity
        self._bridge = MqttBridge(
            self.config,
            asyncio.get_running_loop(),
            self._health,
            log,
            receive_maximum=receive_maximum,
            on_messages=self._has_data.set,
        )
        await self._bridge.connect(self._wanted())
        log.info(
            "source %s: connected to %s as %s (MQTT %s, %s session%s)",
            self.name,
            self.config.endpoint.display,
            self.config.session_client_id,
            self.config.protocol,
            "clean" if self.config.clean_start else "persistent",
            ", resumed" if self._bridge.session_present else "",
        )
        self._tasks["intake"] = ctx.supervise(f"{self.name}.intake", self._intake)
        self._tasks["retry"] = ctx.supervise(f"{self.name}.retry", self._retry_loop)

    async def stop(self) -> None:
        """Stops intake. What arrives from now on (and scheduled retries) is not acknowledged:
        with a persistent session the broker delivers it again on the next start."""
        self._stopping = True
        self._has_data.set()
        await _finish(self._tasks.get("intake"), _STOP_TIMEOUT)
        await _finish(self._tasks.get("retry"), 0)
        waiting = self._retries.drain()
        for message in waiting:
            self._release_held_key(message)
        if waiting:
            log.info(
                "source %s: %d message(s) waiting for a retry left unacknowledged (the broker "
                "delivers them again with a persistent session)",
                self.name,
                len(waiting),
            )

    async def close(self) -> None:
        """After the dispatcher drained: finishes dead letters and responses, sends the last
        acknowledgements, disconnects (the session stays)."""
        if self._side_tasks:
            await asyncio.wait(self._side_tasks, timeout=_STOP_TIMEOUT)
        if self._bridge is not None:
            await self._bridge.close()

    # -- subscriptions ---------------------------------------------------------------------

    def _wanted(self) -> list[str]:
        if self._static is not None:
            return list(self._static)
        wanted = []
        for topic in self._require_ctx().subscribed_topics:
            if check_filter(topic) is None and not topic.startswith("$share/"):
                wanted.append(topic)
            else:
                log.debug("source %s: topic %r is not an MQTT filter; not subscribed", self.name, topic)
        return sorted(set(wanted))

    def _topics_changed(self, topics: tuple[str, ...]) -> None:
        if self._bridge is not None and not self._stopping:
            self._bridge.set_filters(self._wanted())

    # -- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        ctx = self._require_ctx()
        bridge = self._require_bridge()
        await ctx.wait_ready(ctx.startup_wait)
        while not self._stopping:
            await self._has_data.wait()
            self._has_data.clear()
            self._window.reconnected(bridge.generation)
            if self._stopping:
                return
            inbox = bridge.inbox
            batch: list[Received] = []
            while inbox:
                batch.append(inbox.popleft())
            self._count_dropped(bridge)
            if not batch:
                continue
            plain: list[Message] = []
            requests: list[Message] = []
            for msg, generation in batch:
                message = self._to_message(msg, generation)
                if message is None:
                    continue
                (requests if _response_topic(msg) else plain).append(message)
            try:
                asynchronous, decode = self.config.asynchronous_invocation, self.config.decode
                if plain:
                    await ctx.submit(
                        self.name, plain, self._settled, asynchronous=asynchronous, decode=decode
                    )
                if requests:
                    await ctx.submit(
                        self.name,
                        requests,
                        self._settled,
                        capture=True,
                        asynchronous=asynchronous,
                        decode=decode,
                    )
            except DispatcherClosed:
                return

    def _count_dropped(self, bridge: MqttBridge) -> None:
        dropped, bridge.dropped = bridge.dropped, 0
        if dropped:
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="dropped").inc(dropped)
            self._drop_log.warning(
                "source %s: %d QoS 0 message(s) dropped: the functions are behind", self.name, dropped
            )

    def _to_message(self, msg: Any, generation: int) -> Message | None:
        qos = int(msg.qos)
        topic = bytes(msg._topic).decode("utf-8", "replace")  # .topic raises on invalid UTF-8
        headers: list[tuple[str, str]] = []
        props = getattr(msg, "properties", None)
        if props is not None:
            user = getattr(props, "UserProperty", None)
            if user:
                headers = passthrough(user, source_reserved=_RESERVED)
            content_type = getattr(props, "ContentType", None)
            if isinstance(content_type, str) and content_type:
                headers.append(("Content-Type", content_type))
        headers += [
            ("X-Mqtt-Qos", str(qos)),
            ("X-Mqtt-Retain", "true" if msg.retain else "false"),
            ("X-Mqtt-Message-Id", str(msg.mid)),
        ]
        delivery = self._window.received(msg.mid, qos, generation) if qos else None
        key = topic.encode() if self.config.ordering == "topic" else None
        return Message(
            topic,
            msg.payload,
            headers,
            key=key,
            hold_key_on_retry=key is not None,
            delivery_attempt=2 if msg.dup else 1,
            handle=_Pending(msg, delivery),
        )

    # -- settling --------------------------------------------------------------------------

    def _settled(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        acked = 0
        for outcome in outcomes:
            pending: _Pending = outcome.message.handle
            if outcome.ok:
                self._respond(outcome)
                self._acknowledge(pending)
                acked += 1
                continue
            spent = 0 < self.config.max_deliver <= pending.attempts
            if outcome.verdict is Verdict.RETRY and not spent:
                if self._stopping:
                    # Left unacknowledged: the broker delivers it again on the next start.
                    self._release_key(outcome)
                    continue
                ctx.metrics.source_errors.labels(source=self.name, kind="retry").inc()
                self._schedule_retry(outcome)
                continue
            reason = (
                f"max_deliver ({self.config.max_deliver}) reached"
                if outcome.verdict is Verdict.RETRY
                else "non-retryable failure"
            )
            self._respond(outcome)
            if self.config.dead_letter_topic is not None:
                self._spawn(self._dead_letter(outcome, reason))
                continue
            self._give_up(outcome, reason)
        if acked:
            ctx.metrics.messages_acked.labels(source=self.name).inc(acked)

    def _acknowledge(self, pending: _Pending) -> None:
        """Acknowledges ``pending`` and whatever finished behind it, in arrival order."""
        if pending.delivery is None:
            return
        ready = self._window.finished(pending.delivery)
        if not ready:
            return
        if not self._acks:
            # Acknowledgements of one turn of the loop (a settled batch) go out in one write.
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.extend(ready)

    def _flush_acks(self) -> None:
        ready, self._acks = self._acks, []
        # A packet id is only meaningful on the connection it came in on: after a reconnect
        # the broker sends those messages again (and may reuse the ids for others).
        generation = self._window.generation
        self._require_bridge().ack_many([(d.mid, d.qos) for d in ready if d.generation == generation])

    def _give_up(self, outcome: Outcome, reason: str) -> None:
        """A final failure without a dead-letter topic: logged, counted, acknowledged."""
        self._require_ctx().metrics.messages_failed.labels(source=self.name).inc()
        failure = outcome.first_failure()
        self._failed_log.warning(
            "source %s: message on %s failed for good (%s: %s) and is dropped: set "
            "dead_letter_topic to keep such messages",
            self.name,
            outcome.message.topic,
            reason,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._release_key(outcome)
        self._acknowledge(outcome.message.handle)

    # -- retries in place ------------------------------------------------------------------

    def _schedule_retry(self, outcome: Outcome) -> None:
        message = outcome.message
        pending: _Pending = message.handle
        retry_after = outcome.retry_after
        c = self.config
        if retry_after is not None:
            delay = min(max(retry_after, 0.0), c.retry_delay_max)
        else:
            delay = doubling(pending.attempts, c.retry_delay, c.retry_delay_max)
        pending.attempts += 1
        message.delivery_attempt += 1
        message.resume = outcome.key_held
        self._retries.push(message, delay)

    async def _retry_loop(self) -> None:
        ctx = self._require_ctx()
        while True:
            due = await self._retries.next_due()
            plain = [m for m in due if not _response_topic(m.handle.msg)]
            requests = [m for m in due if _response_topic(m.handle.msg)]
            try:
                asynchronous, decode = self.config.asynchronous_invocation, self.config.decode
                if plain:
                    await ctx.resubmit(plain, self._settled, asynchronous=asynchronous, decode=decode)
                if requests:
                    await ctx.resubmit(
                        requests, self._settled, capture=True, asynchronous=asynchronous, decode=decode
                    )
            except DispatcherClosed:
                return

    def _release_key(self, outcome: Outcome) -> None:
        if outcome.key_held:
            self._release_held_key(outcome.message)

    def _release_held_key(self, message: Message) -> None:
        if message.key is not None and message.resume:
            with contextlib.suppress(DispatcherClosed):
                self._require_ctx().dispatcher.release_key(message.key)

    # -- dead letters ----------------------------------------------------------------------

    async def _dead_letter(self, outcome: Outcome, reason: str) -> None:
        """Publishes to the dead-letter topic and waits for the broker's PUBACK, then
        acknowledges; retried (the message stays unacknowledged) until it is confirmed."""
        ctx = self._require_ctx()
        bridge = self._require_bridge()
        pending: _Pending = outcome.message.handle
        topic = self.config.dead_letter_topic
        assert topic is not None
        properties = self._dead_letter_properties(outcome, reason)
        attempt = 0
        while True:
            attempt += 1
            try:
                await asyncio.wait_for(
                    bridge.publish(topic, pending.msg.payload, 1, properties), _DEAD_LETTER_TIMEOUT
                )
                break
            except Exception as exc:
                ctx.metrics.source_errors.labels(source=self.name, kind="dead_letter").inc()
                log.error(
                    "source %s: cannot dead-letter a message of %s to %s (%r); trying again",
                    self.name,
                    outcome.message.topic,
                    topic,
                    exc,
                )
                if self._stopping:
                    self._release_key(outcome)
                    return  # unacknowledged: the broker delivers it again
                await asyncio.sleep(doubling(attempt, self.config.retry_delay, self.config.retry_delay_max))
        ctx.metrics.messages_failed.labels(source=self.name).inc()
        failure = outcome.first_failure()
        log.warning(
            "source %s: message on %s dead-lettered to %s (%s: %s)",
            self.name,
            outcome.message.topic,
            topic,
            reason,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._release_key(outcome)
        self._acknowledge(pending)

    def _dead_letter_properties(self, outcome: Outcome, reason: str) -> Properties | None:
        """MQTT 5: the message's own user properties and content type plus the failure
        context (:mod:`fastconn.deadletter`) as user properties. MQTT 3.1.1 has none."""
        if not self.config.v5:
            return None
        pending: _Pending = outcome.message.handle
        original = getattr(pending.msg, "properties", None)
        props = new_properties(PacketTypes.PUBLISH)
        own = [
            (k, v)
            for k, v in (getattr(original, "UserProperty", None) or [])
            if not k.lower().startswith(DLT_PREFIX)
        ]
        context = failure_context(
            outcome, [(DLT_TOPIC, outcome.message.topic)], deliveries=pending.attempts, reason=reason
        )
        excerpt = response_excerpt(outcome)
        if excerpt is not None:
            context.append((DLT_RESPONSE, excerpt[:RESPONSE_EXCERPT].decode("utf-8", "replace")))
        props.UserProperty = own + context
        content_type = getattr(original, "ContentType", None)
        if content_type:
            props.ContentType = content_type
        return props

    # -- MQTT 5 request/response -----------------------------------------------------------

    def _respond(self, outcome: Outcome) -> None:
        """Publishes each function's response to the message's response topic, if it has one."""
        pending: _Pending = outcome.message.handle
        topic = _response_topic(pending.msg)
        if not topic:
            return
        correlation = getattr(pending.msg.properties, "CorrelationData", None)
        bridge = self._require_bridge()
        for body, headers in response_messages(outcome):
            props = new_properties(PacketTypes.PUBLISH)
            content_type = headers.pop("Content-Type", None)
            if content_type:
                props.ContentType = content_type
            if correlation:
                props.CorrelationData = correlation
            props.UserProperty = list(headers.items())
            future = bridge.publish(topic, body, 1, props)
            future.add_done_callback(self._response_published)

    def _response_published(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._require_ctx().metrics.source_errors.labels(source=self.name, kind="response").inc()
            log.warning("source %s: could not publish a response: %s", self.name, future.exception())

    # -- helpers ---------------------------------------------------------------------------

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name} used before register()")
        return self._ctx

    def _require_bridge(self) -> MqttBridge:
        if self._bridge is None:
            raise RuntimeError(f"source {self.name} used before start()")
        return self._bridge


def _response_topic(msg: Any) -> str | None:
    props = getattr(msg, "properties", None)
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    return topic if isinstance(topic, str) and topic else None


async def _finish(task: asyncio.Task[None] | None, timeout: float) -> None:
    """Waits up to ``timeout`` for ``task`` to end by itself, then cancels it."""
    if task is None or task.done():
        return
    if timeout > 0:
        await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
