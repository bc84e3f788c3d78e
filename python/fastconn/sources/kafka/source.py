"""The Kafka source itself: consumer-group membership, intake with per-partition
backpressure, settling (commit at the watermark, redeliveries, dead letters and responses)
and rebalances (see the package docstring for the guarantees)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import (
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
)

from fastconn.backoff import doubling
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources._kafka_health import MetadataProbe
from fastconn.sources.kafka.config import KafkaConfig, consumer_options, is_topic_name, producer_options
from fastconn.sources.kafka.function_headers import add_key_headers, headers_of_record, stored_event
from fastconn.sources.kafka.metrics import kafka_collector
from fastconn.sources.kafka.publish import Publisher
from fastconn.sources.kafka.settle import (
    DeadLetter,
    Done,
    RetryLater,
    decide,
    key_still_held,
)
from fastconn.sources.kafka.state import Partition, Record, fetch_budget

__all__ = ["KafkaSource"]

log = logging.getLogger("fastconn.source.kafka")

_CONNECT_RETRY_INITIAL: Final = 0.5
_CONNECT_RETRY_MAX: Final = 5.0


class KafkaSource:
    def __init__(self, config: KafkaConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._acked: Any = None
        self._failed: Any = None
        self._consumer: Any = None
        self._producer: Any = None
        self._publisher: Publisher | None = None
        self._partitions: dict[Any, Partition] = {}
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        """Set whenever messages settle or publishing finishes (wakes capacity/revoke waits)."""
        self._due: list[Record] = []
        self._due_event = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._publishes: set[asyncio.Task[None]] = set()
        self._commit_lock = asyncio.Lock()
        self._subscribed = asyncio.Event()
        self._topics: tuple[str, ...] = ()
        self._topic_change: asyncio.Task[None] | None = None
        self._closing = False
        self._subscribing = False
        self._capture = config.response_topic is not None
        self._resume_below = max(1, config.max_pending_per_partition // 2)
        self._health = ConnectionHealth(self.name, ", ".join(config.brokers), log)
        self._probe: MetadataProbe | None = None
        self.stuck_messages = 0
        self.counters = dict.fromkeys(
            (
                "duplicates",
                "rebalances",
                "dead_lettered",
                "dead_letters_shrunk",
                "redeliveries",
                "responses",
                "commits",
            ),
            0,
        )

    # -- introspection (metrics, tests) -----------------------------------------------------

    def partitions(self) -> Iterator[Partition]:
        return iter(list(self._partitions.values()))

    @property
    def consumer(self) -> Any:
        """The aiokafka consumer (None before ``start``)."""
        return self._consumer

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        self._acked = ctx.metrics.messages_acked.labels(source=self.name)
        self._failed = ctx.metrics.messages_failed.labels(source=self.name)
        kafka_collector(ctx.metrics.registry).sources.append(self)
        if self._dynamic_topics():
            ctx.on_topics_changed(self._on_topics_changed)

    def _dynamic_topics(self) -> bool:
        ctx = self._require_ctx()
        return not (self.config.topics or self.config.topic_pattern or ctx.default_topics)

    def health(self) -> SourceHealth:
        """Whether the cluster answers metadata requests (see :mod:`fastconn.sources._kafka_health`)."""
        return self._health.health()

    async def start(self) -> None:
        try:
            await self._start()
        except asyncio.CancelledError:
            # Start-up cancelled by a stop signal: the daemon closes only started sources, so
            # the clients started so far are stopped here.
            await self._stop_clients()
            raise

    async def _start(self) -> None:
        ctx = self._require_ctx()
        options = consumer_options(self.config)
        self._consumer = await self._connect(lambda: AIOKafkaConsumer(**options), "consumer")
        self._probe = MetadataProbe(self._health, self._consumer.topics)
        self._probe.start()
        if self.config.dead_letter_topic or self.config.response_topic:
            popts = producer_options(self.config)
            self._producer = await self._connect(lambda: AIOKafkaProducer(**popts), "producer")
            self._publisher = Publisher(
                self._producer,
                self.config,
                self.counters,
                on_error=self._error,
                on_stuck=self._stick,
                gone=lambda rec: rec.partition.revoked or self._closing,
            )
        if self._dynamic_topics():
            self._topics = ctx.subscribed_topics
        self._tasks = [
            ctx.supervise(f"{self.name}.intake", self._intake),
            ctx.supervise(f"{self.name}.redeliver", self._redeliver),
            ctx.supervise(f"{self.name}.commit", self._commit_periodically),
        ]
        log.info(
            "kafka source %r connected to %s (group %s, ordering %s)",
            self.name,
            ",".join(self.config.brokers),
            self.config.group_id,
            self.config.ordering,
        )

    async def _connect(self, build: Any, what: str) -> Any:
        """Starts an aiokafka client, retrying until ``startup_timeout``."""
        deadline = time.monotonic() + self.config.startup_timeout
        attempt = 0
        while True:
            attempt += 1
            client = build()
            try:
                await client.start()
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await client.stop()
                raise
            except (KafkaError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await client.stop()
                self._error("connect")
                delay = doubling(attempt, _CONNECT_RETRY_INITIAL, _CONNECT_RETRY_MAX)
                if time.monotonic() + delay > deadline:
                    raise SourceError(
                        f"kafka source {self.name!r}: cannot connect the {what} to "
                        f"{','.join(self.config.brokers)}: {exc}"
                    ) from None
                log.warning("kafka %s cannot connect yet (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                continue
            return client

    async def stop(self) -> None:
        """Stops fetching and redelivering. Messages in the dispatcher keep settling; messages
        waiting for a redelivery stay uncommitted (read again after a restart)."""
        self._stop.set()
        for task in self._tasks[:2]:
            task.cancel()
        for task in self._tasks[:2]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._topic_change is not None:
            self._topic_change.cancel()
        for part in self._partitions.values():
            for rec in part.retrying.values():
                if rec.timer is not None:
                    rec.timer.cancel()
            part.retrying.clear()
        self._due.clear()

    async def close(self) -> None:
        """After the dispatcher drained: finish publishing (bounded), commit, leave the group."""
        if self._publishes:
            _, pending = await asyncio.wait(self._publishes, timeout=max(1.0, self.config.revoke_timeout))
            for task in pending:
                task.cancel()
        for task in self._tasks[2:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._commit()
        self._closing = True
        await self._stop_clients()

    async def _stop_clients(self) -> None:
        if self._probe is not None:
            await self._probe.stop()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        for part in self._partitions.values():
            log.info(
                "kafka %s[%d]: closed at committed offset %s (%d past it not done)",
                part.tp.topic,
                part.tp.partition,
                part.mark.committed,
                part.mark.outstanding,
            )

    # -- subscription ----------------------------------------------------------------------

    def _subscribe(self) -> None:
        listener = _Listener(self)
        consumer = self._consumer
        ctx = self._require_ctx()
        if self.config.topic_pattern:
            consumer.subscribe(pattern=self.config.topic_pattern, listener=listener)
            log.info("kafka source %r subscribed to pattern %r", self.name, self.config.topic_pattern)
        else:
            wanted = self.config.topics or ctx.default_topics or self._topics
            topics = tuple(t for t in wanted if is_topic_name(t) and t not in self._outputs())
            if len(topics) != len(wanted):
                log.warning(
                    "kafka source %r does not consume %s (not Kafka topic names, or its own "
                    "dead-letter/response topics)",
                    self.name,
                    sorted(set(wanted) - set(topics)),
                )
            if not topics:
                return
            if set(topics) == set(consumer.subscription() or ()):
                self._subscribed.set()
                return
            consumer.subscribe(topics=list(topics), listener=listener)
            log.info("kafka source %r subscribed to %s", self.name, ", ".join(topics))
        self._subscribed.set()

    def _outputs(self) -> tuple[str, ...]:
        return tuple(t for t in (self.config.dead_letter_topic, self.config.response_topic) if t)

    def _on_topics_changed(self, topics: tuple[str, ...]) -> None:
        self._topics = topics
        if not self._subscribing or self._stop.is_set():
            return  # the intake subscribes to the latest topics once the topic map is ready
        previous = self._topic_change
        self._topic_change = self._require_ctx().supervise(
            f"{self.name}.topics", lambda: self._change_topics(previous)
        )

    async def _change_topics(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        wanted = tuple(t for t in self._topics if is_topic_name(t) and t not in self._outputs())
        if wanted:
            self._subscribe()  # when they differ, aiokafka rebalances: revoke (commit), then assign
            return
        if self._subscribed.is_set():
            # No function subscribes to anything: hand every partition back.
            self._subscribed.clear()
            await self._revoke(list(self._partitions))
            self._consumer.unsubscribe()
            log.info("kafka source %r unsubscribed (no topics)", self.name)

    # -- intake ----------------------------------------------------------------------------

    async def _intake(self) -> None:
        ctx = self._require_ctx()
        # Messages fetched before the topic map exists would be "unrouted" and committed.
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning("kafka source %r waits for the topic map before fetching", self.name)
        self._subscribing = True
        self._subscribe()
        consumer = self._consumer
        while not self._stop.is_set():
            if not self._subscribed.is_set():
                await self._subscribed.wait()
                continue
            budget = self._fetch_budget()
            if budget <= 0:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), 0.1)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=500, max_records=budget)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                self._error("fetch")
                log.warning("kafka fetch failed: %s", exc)
                await wait_or_stop(self._stop, 1.0)
                continue
            messages = self._accept(batches)
            if messages:
                try:
                    await self._submit(messages)
                except DispatcherClosed:
                    return
                except Exception:
                    # A bug: the offsets are tracked, so they must still be delivered (or the
                    # commit would stop at them): the redelivery loop takes them, in order,
                    # while the supervisor logs and restarts this loop.
                    self._due.extend(m.handle for m in messages)
                    self._due_event.set()
                    raise

    def _fetch_budget(self) -> int:
        """How many records the next fetch may take: within one dispatcher chunk, and leaving
        room for redeliveries (which may hold keys other messages wait behind)."""
        d = self._require_ctx().dispatcher
        if not d.has_capacity:
            return 0
        return fetch_budget(
            capacity=d.capacity,
            queued=d.queued,
            stuck=self.stuck_messages,
            max_poll_records=self.config.max_poll_records,
            batch_size=d.options.batch_size,
        )

    def _accept(self, batches: dict[Any, list[Any]]) -> list[Message]:
        messages: list[Message] = []
        budget = self.config.max_pending_per_partition
        for tp, records in batches.items():
            part = self._partitions.get(tp)
            if part is None:
                # aiokafka returns records of its current assignment only, and may do so an
                # instant before our on_partitions_assigned runs.
                part = self._partition(tp)
            elif part.revoking:
                continue  # being revoked: not ours to start any more
            last = part.mark.last_tracked
            if records and last is not None and records[0].offset <= last:
                part = self._rewound(part, records[0].offset)
            self._take(part, records, messages)
            if part.should_pause(budget):
                part.paused = True
                with contextlib.suppress(IllegalStateError):
                    self._consumer.pause(tp)
                log.debug("kafka %s paused (%d pending)", tp, part.mark.outstanding)
        return messages

    def _take(self, part: Partition, records: list[Any], out: list[Message]) -> None:
        """Turns one partition's records into messages (the per-message hot path)."""
        track = part.mark.track
        topic, fixed, id_prefix, prefix = part.tp.topic, part.fixed_headers, part.id_prefix, part.order_prefix
        by_key = self.config.ordering == "key"
        by_partition = self.config.ordering == "partition"
        stored_events = self.config.stored_events
        taken = 0
        for record in records:
            offset = record.offset
            try:
                track(offset)
            except ValueError:
                log.debug("kafka %s: offset %d already taken", part.tp, offset)
                continue
            key: bytes | None = record.key
            offset_text = str(offset)
            record_headers = record.headers
            message_topic, message_id = topic, id_prefix + offset_text
            stored = stored_event(record_headers) if stored_events else None
            if stored is not None:
                # Routed by the topic it was accepted on; the id is the one its 202 carried.
                message_topic, message_id, headers = stored
            else:
                headers = headers_of_record(record_headers) if record_headers else []
            headers += fixed
            headers.append(("X-Kafka-Offset", offset_text))
            if key is not None:
                add_key_headers(headers, key)
            order_key = prefix if by_partition else prefix + key if by_key and key is not None else None
            value = record.value
            message = Message(
                message_topic,
                value if value is not None else b"",
                headers,
                message_id,
                order_key,
                hold_key_on_retry=order_key is not None,
                # Without a dead-letter topic a final failure is retried forever: its key waits.
                hold_key_on_failure=order_key is not None and not self.config.dead_letter_topic,
            )
            message.handle = Record(part, offset, key, record_headers, message)
            out.append(message)
            taken += 1
        part.in_core += taken

    async def _submit(self, messages: list[Message]) -> None:
        try:
            await self._require_ctx().submit(
                self.name,
                messages,
                self._on_outcomes,
                capture=self._capture,
                asynchronous=self.config.asynchronous_invocation,
                decode=self.config.decode,
            )
        except BaseException:
            for m in messages:
                m.handle.partition.in_core -= 1
            self._progress.set()
            raise

    # -- outcomes --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        acked = 0
        cfg = self.config
        responses = self._producer is not None and cfg.response_topic is not None
        dead_letters = cfg.dead_letter_topic is not None
        for outcome in outcomes:
            rec: Record = outcome.message.handle
            part = rec.partition
            part.in_core -= 1
            if part.revoked or self._closing:
                self._abandon(rec, outcome)
                continue
            decision = decide(
                outcome,
                deliveries=rec.deliveries,
                dead_letters=dead_letters,
                responses=responses,
                backoff_initial=cfg.retry_backoff_initial,
                backoff_max=cfg.retry_backoff_max,
            )
            if isinstance(decision, Done):
                if decision.publish_responses:
                    self._publish(rec, outcome, dead_letter=False)
                else:
                    self._done(rec)
                    acked += 1
            elif isinstance(decision, DeadLetter):
                self._publish(rec, outcome, dead_letter=True)
            else:
                self._retry_later(rec, outcome, decision)
        if acked:
            self._acked.inc(acked)
        self._progress.set()

    def _abandon(self, rec: Record, outcome: Outcome) -> None:
        """An outcome for a partition no longer ours: only give back a key the core holds."""
        message = outcome.message
        if key_still_held(outcome):
            assert message.key is not None
            self._require_ctx().dispatcher.release_key(message.key)
        self._unstick(rec)

    def _done(self, rec: Record) -> None:
        """The message is done: its offset may be committed (the caller counts it)."""
        if rec.stuck:
            rec.stuck = False
            self.stuck_messages -= 1
        part = rec.partition
        if part.revoked:
            return
        part.mark.complete(rec.offset)
        if part.should_resume(self._resume_below):
            part.paused = False
            if not self._stop.is_set():
                with contextlib.suppress(IllegalStateError):
                    self._consumer.resume(part.tp)
                log.debug("kafka %s resumed", part.tp)

    def _unstick(self, rec: Record) -> None:
        if rec.stuck:
            rec.stuck = False
            self.stuck_messages -= 1

    def _stick(self, rec: Record) -> None:
        """Counts the message in ``fastconn_kafka_stuck_messages`` until it is done or gone."""
        if not rec.stuck:
            rec.stuck = True
            self.stuck_messages += 1

    def _retry_later(self, rec: Record, outcome: Outcome, decision: RetryLater) -> None:
        rec.held = decision.key_held
        self._stick(rec)
        delay = decision.delay
        failure = outcome.first_failure()
        level = logging.WARNING if rec.deliveries == 1 or rec.deliveries % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "kafka %s not delivered (%s, delivery %d): redelivering in %.1fs%s",
            outcome.message_id,
            f"{failure.function} -> {failure.status_label}" if failure else outcome.verdict.name,
            rec.deliveries,
            delay,
            ""
            if outcome.verdict is Verdict.RETRY
            else " (failed for good, no dead_letter_topic: retried until it succeeds)",
        )
        if self._stop.is_set():
            return  # shutting down: stays uncommitted, read again after the restart
        rec.timer = asyncio.get_running_loop().call_later(delay, self._due_now, rec)
        rec.partition.retrying[rec.offset] = rec

    def _due_now(self, rec: Record) -> None:
        rec.timer = None
        if rec.partition.retrying.pop(rec.offset, None) is None:
            return
        self._due.append(rec)
        self._due_event.set()

    async def _redeliver(self) -> None:
        """Resubmits messages whose backoff is over, in batches."""
        ctx = self._require_ctx()
        while True:
            await self._due_event.wait()
            self._due_event.clear()
            while self._due:
                d = ctx.dispatcher
                room = max(1, min(d.capacity - d.queued, d.options.batch_size))
                batch, self._due = self._due[:room], self._due[room:]
                messages = []
                for rec in batch:
                    if rec.partition.revoked:
                        self._drop_waiting(rec)
                        continue
                    messages.append(self._next_delivery(rec))
                if not messages:
                    continue
                try:
                    await self._submit(messages)
                except DispatcherClosed:
                    return
                self.counters["redeliveries"] += len(messages)

    def _next_delivery(self, rec: Record) -> Message:
        rec.deliveries += 1
        # A held key waits for exactly this message: it starts at once (resume). A FAILED one's
        # key was not held, so it queues behind its key like a new message.
        message = dataclasses.replace(rec.message, delivery_attempt=rec.deliveries, resume=rec.held)
        rec.message = message
        rec.held = False
        rec.partition.in_core += 1
        return message

    def _drop_waiting(self, rec: Record) -> None:
        """A redelivery that will not happen (its partition is gone): give back its held key."""
        if rec.timer is not None:
            rec.timer.cancel()
            rec.timer = None
        if rec.held and rec.message.key is not None:
            self._require_ctx().dispatcher.release_key(rec.message.key)
            rec.held = False
        self._unstick(rec)

    # -- dead letters and responses ----------------------------------------------------------

    def _publish(self, rec: Record, outcome: Outcome, *, dead_letter: bool) -> None:
        rec.partition.publishing += 1
        # Supervised: should publishing fail unexpectedly, it runs again (the message must be
        # done for its partition's commit to move on).
        task = self._require_ctx().supervise(
            f"{self.name}.publish", lambda: self._publish_then_done(rec, outcome, dead_letter)
        )
        self._publishes.add(task)
        task.add_done_callback(lambda t: self._published(t, rec))

    def _published(self, task: asyncio.Task[None], rec: Record) -> None:
        self._publishes.discard(task)
        rec.partition.publishing -= 1
        self._progress.set()

    async def _publish_then_done(self, rec: Record, outcome: Outcome, dead_letter: bool) -> None:
        publisher = self._publisher
        assert publisher is not None
        if dead_letter:
            if not await publisher.dead_letter(rec, outcome):
                self._unstick(rec)
                return
            self.counters["dead_lettered"] += 1
            failure = outcome.first_failure()
            log.warning(
                "kafka %s dead-lettered to %s (%s)",
                outcome.message_id,
                self.config.dead_letter_topic,
                failure and f"{failure.function} -> {failure.status_label}",
            )
        if self.config.response_topic and not await publisher.responses(rec, outcome):
            return
        self._done(rec)
        (self._failed if dead_letter else self._acked).inc()

    # -- commits ---------------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval)
            await self._commit()
            await self._follow_shrunk_logs()

    async def _follow_shrunk_logs(self) -> None:
        """A partition whose log end (high watermark) stays below the position we fetch from
        lost its log (see :meth:`_rewound`). Kafka answers such a fetch with
        OFFSET_OUT_OF_RANGE and the consumer resets itself; some Kafka-protocol brokers answer
        an empty fetch instead, and the partition would wait forever for offsets that will never
        exist. Seen on two checks in a row (a commit interval apart), it is reset here the way
        ``initial_offset`` says."""
        consumer = self._consumer
        if consumer is None or self._closing:
            return
        for part in list(self._partitions.values()):
            if part.revoking or part.paused:
                continue
            end = consumer.highwater(part.tp)
            try:
                position = await consumer.position(part.tp)
            except (KafkaError, IllegalStateError):
                continue
            behind = end is not None and end < position
            if not behind:
                part.shrunk_checks = 0
                continue
            part.shrunk_checks += 1
            if part.shrunk_checks < 2:
                continue
            part.shrunk_checks = 0
            log.warning(
                "kafka %s[%d]: the log ends at offset %d, below the position %d: resetting to the %s",
                part.tp.topic,
                part.tp.partition,
                end,
                position,
                "start" if self.config.initial_offset == "earliest" else "end",
            )
            with contextlib.suppress(KafkaError, IllegalStateError):
                if self.config.initial_offset == "earliest":
                    await consumer.seek_to_beginning(part.tp)
                else:
                    await consumer.seek_to_end(part.tp)

    async def _commit(self, parts: Sequence[Partition] | None = None) -> bool:
        """Commits the watermarks that moved. Returns False when the commit failed."""
        if self._consumer is None or self._closing:
            return True
        chosen = list(self._partitions.values()) if parts is None else list(parts)
        offsets = {p.tp: pos for p in chosen if not p.revoked and (pos := p.mark.to_commit()) is not None}
        if not offsets:
            return True
        async with self._commit_lock:
            try:
                await self._consumer.commit(offsets)
            except (KafkaError, IllegalStateError) as exc:
                self._error("commit")
                log.warning("kafka commit of %s failed: %s", _describe(offsets), exc)
                return False
        for p in chosen:
            if p.tp in offsets:
                p.mark.mark_committed(offsets[p.tp])
        self.counters["commits"] += 1
        log.debug("kafka committed %s", _describe(offsets))
        return True

    # -- rebalances ------------------------------------------------------------------------

    async def _revoke(self, tps: Sequence[Any]) -> None:
        """Stop fetching ``tps``, let their in-flight calls finish (bounded), commit, release."""
        parts = [p for tp in tps if (p := self._partitions.get(tp)) is not None]
        if not parts:
            return
        started = time.monotonic()
        deadline = started + self.config.revoke_timeout
        for p in parts:
            p.revoking = True
        if not self._closing:
            await self._flush_retries(parts, deadline)
            while any(p.busy for p in parts) and time.monotonic() < deadline:
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), max(0.0, deadline - time.monotonic()))
            await self._commit(parts)
        duplicates = sum(p.mark.outstanding for p in parts)
        for p in parts:
            self._forget(p)
        self.counters["duplicates"] += duplicates
        unfinished = sum(p.mark.in_flight for p in parts)
        log.info(
            "kafka source %r released %d partition(s) in %.2fs (%d message(s) past the commit will be "
            "read again, %d unfinished)",
            self.name,
            len(parts),
            time.monotonic() - started,
            duplicates,
            unfinished,
        )

    async def _flush_retries(self, parts: Sequence[Partition], deadline: float) -> None:
        """Messages waiting for a redelivery while their key is held: redeliver them now, so
        the messages queued behind their key in the core follow them in order (rather than
        being let go first by a bare key release)."""
        flush: list[Record] = []
        for p in parts:
            for rec in list(p.retrying.values()):
                if rec.timer is not None:
                    rec.timer.cancel()
                    rec.timer = None
                if rec.held:
                    flush.append(rec)
                else:
                    self._unstick(rec)
            p.retrying.clear()
        if not flush:
            return
        messages = [self._next_delivery(rec) for rec in flush]
        try:
            await asyncio.wait_for(self._submit(messages), max(0.01, deadline - time.monotonic()))
        except (TimeoutError, DispatcherClosed):
            for m in messages:
                if m.key is not None:
                    self._require_ctx().dispatcher.release_key(m.key)
                self._unstick(m.handle)

    def _forget(self, part: Partition) -> None:
        """The partition is no longer ours: late outcomes for it are ignored."""
        part.revoked = True
        for rec in part.retrying.values():
            self._drop_waiting(rec)
        part.retrying.clear()
        if self._partitions.get(part.tp) is part:
            del self._partitions[part.tp]

    def _rewound(self, part: Partition, offset: int) -> Partition:
        """The consumer returned an offset it had returned before. fastconn never seeks, so the
        log itself went back: the broker lost or truncated it (a topic deleted and created
        again, a broker restored without its data) and the consumer's position, now out of
        range, was reset by ``initial_offset``. The old offsets mean nothing any more: follow
        the new log from ``offset`` with a fresh watermark (late outcomes of the old one are
        ignored, as after a revoke) rather than dropping every record below the old position."""
        last = part.mark.last_tracked
        self.counters["duplicates"] += part.mark.outstanding
        self._forget(part)
        self._error("log_reset")
        log.warning(
            "kafka %s[%d]: the log went back from offset %s to %d (the broker lost or truncated it, "
            "or the topic was created again): following it from %d",
            part.tp.topic,
            part.tp.partition,
            last,
            offset,
            offset,
        )
        return self._partition(part.tp)

    def _partition(self, tp: Any) -> Partition:
        part = self._partitions.get(tp)
        if part is None:
            prefix = f"{tp.topic}\x00{tp.partition}\x00".encode()
            fixed = (("X-Kafka-Topic", tp.topic), ("X-Kafka-Partition", str(tp.partition)))
            part = self._partitions[tp] = Partition(tp, prefix, fixed, f"{tp.topic}/{tp.partition}/")
        return part

    def _assigned(self, tps: Sequence[Any]) -> None:
        self.counters["rebalances"] += 1
        for part in list(self._partitions.values()):
            if part.tp not in tps:  # lost without a revoke (aiokafka always revokes first)
                self.counters["duplicates"] += part.mark.outstanding
                self._forget(part)
        for tp in tps:
            self._partition(tp)
        log.info("kafka source %r assigned %s", self.name, _describe({tp: None for tp in tps}) or "nothing")

    # -- helpers ---------------------------------------------------------------------------

    def _error(self, kind: str) -> None:
        if self._ctx is not None:
            self._ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError("kafka source used before register()")
        return self._ctx


def _describe(offsets: dict[Any, Any]) -> str:
    return ", ".join(
        f"{tp.topic}[{tp.partition}]" + (f"@{pos}" if pos is not None else "")
        for tp, pos in sorted(offsets.items(), key=lambda item: (item[0].topic, item[0].partition))
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka calls these from its group coordination task, around every rebalance."""

    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        try:
            await self._source._revoke(list(revoked))
        except Exception:
            log.exception("kafka: handling revoked partitions failed")

    async def on_partitions_assigned(self, assigned: Any) -> None:
        try:
            self._source._assigned(list(assigned))
        except Exception:
            log.exception("kafka: handling assigned partitions failed")
