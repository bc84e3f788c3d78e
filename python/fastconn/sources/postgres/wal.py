"""The write-ahead-log mode: read a logical replication slot (streamed, or with SQL peeks),
deliver each row change, confirm the slot only below changes that are done (see the package
docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

import asyncpg
import orjson

from fastconn.backoff import doubling
from fastconn.deadletter import failure_context, response_excerpt
from fastconn.delay_queue import DelayQueue
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.ratelimit import RateLimitedLog
from fastconn.redact import redact_text
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.postgres import server
from fastconn.sources.postgres.changes import Assembler, Change, Transaction
from fastconn.sources.postgres.config import PostgresConfig, read_dsn
from fastconn.sources.postgres.metrics import postgres_collector
from fastconn.sources.postgres.pgoutput import Column, PgOutputError, Relation, decode, format_lsn, parse_lsn
from fastconn.sources.postgres.replication import ReplicationError, ReplicationStream, XLogData
from fastconn.sources.postgres.state import InFlight, Pending, TxnState

__all__ = ["WalSource"]

log = logging.getLogger("fastconn.source.postgres")

_TRANSACTION_KEY: Final = b"\x00postgres-transaction"
"""``ordering = "transaction"``: every change shares one key, so they run one at a time in order."""
_LAG_EVERY: Final = 5.0
_LAG_WARN_EVERY: Final = 60.0


class WalSource:
    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._dsn: str | None = None
        self._conn: Any = None
        """The reader's connection (holds the advisory lock, peeks, advances)."""
        self._stream: ReplicationStream | None = None
        """With ``read = "stream"``: the replication connection (confirms the slot)."""
        self._dlt_conn: Any = None
        self._dlt_lock = asyncio.Lock()
        self._assembler = Assembler()
        self.pending = Pending()
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._retries: DelayQueue[InFlight] = DelayQueue()
        self._tasks: list[asyncio.Task[None]] = []
        self._in_core = 0
        self._filters = config.topic_filter
        self._health = ConnectionHealth(self.name, "postgres", log)
        self._pk_checked: dict[int, tuple[Column, ...]] = {}
        self.holds_lock = False
        self.stuck = 0
        self.slot_lag_bytes: int | None = None
        self._lag_checked = 0.0
        self._lag_warned = 0.0
        self._read_failures = RateLimitedLog(log, 30.0)
        self.counters = dict.fromkeys(
            ("delivered", "dead_lettered", "redeliveries", "confirms", "filtered"), 0
        )

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        postgres_collector(ctx.metrics.registry).sources.append(self)

    def health(self) -> SourceHealth:
        return self._health.health()

    async def start(self) -> None:
        self._dsn = read_dsn(self.config)
        conn = await server.connect(self.config, self._dsn, self.config.startup_timeout)
        try:
            await server.check_server(conn, self.config)
            await server.ensure_publication(conn, self.config)
            await server.ensure_slot(conn, self.config)
            if self.config.dead_letter_table:
                await server.ensure_dead_letter_table(conn, self.config.dead_letter_table)
            if self.config.read == "stream":
                await server.check_replication_login(self.config, self._dsn)
        except asyncpg.PostgresError as exc:
            await conn.close()
            raise SourceError(f"postgres source {self.name!r}: set-up failed: {exc}") from None
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        ctx = self._require_ctx()
        self._tasks = [
            ctx.supervise(f"{self.name}.reader", self._reader),
            ctx.supervise(f"{self.name}.redeliver", self._redeliver),
        ]
        log.info(
            "postgres source %r: slot %s, publication %s, ordering %s",
            self.name,
            self.config.slot,
            self.config.publication,
            self.config.ordering,
        )

    async def stop(self) -> None:
        """Stops reading and redelivering; in-flight changes keep settling."""
        self._stop.set()
        self._progress.set()
        reader, redeliver = self._tasks or (None, None)
        if redeliver is not None:
            redeliver.cancel()
        if reader is not None:
            # The reader finishes its query and leaves (a cancelled query could leave the
            # connection unusable for the last confirmation in close()).
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(reader), 5.0)
            reader.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._retries.drain()  # not confirmed: read again after a restart

    async def close(self) -> None:
        """After the dispatcher drained: confirm what is done, release the slot, disconnect."""
        if self._conn is not None and self.holds_lock:
            with contextlib.suppress(*server.CONNECTION_ERRORS, asyncpg.PostgresError, ReplicationError):
                await self._confirm(self._conn)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
        for conn in (self._conn, self._dlt_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5.0)
        log.info(
            "postgres source %r closed: confirmed through %s, %d transaction(s) read and not confirmed "
            "(read again after a restart)",
            self.name,
            format_lsn(self.pending.confirmed) if self.pending.confirmed is not None else "-",
            self.pending.outstanding,
        )

    # -- the reader ------------------------------------------------------------------------

    async def _reader(self) -> None:
        ctx = self._require_ctx()
        # Changes read before the topic map exists would be "unrouted" and confirmed.
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning("postgres source %r waits for the topic map before reading", self.name)
        attempt = 0
        while not self._stop.is_set():
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self._dsn, server_settings=server.SESSION_SETTINGS, timeout=10
                    )
                    self._pk_checked.clear()
                if not await self._take_lock(self._conn):
                    return
                self._health.restored()
                attempt = 0
                if self.config.read == "stream":
                    await self._read_stream(self._conn)
                else:
                    await self._read(self._conn)
            except server.CONNECTION_ERRORS as exc:
                attempt += 1
                self._lost(exc)
                delay = doubling(attempt, 0.2, self.config.reconnect_max)
                if await wait_or_stop(self._stop, delay):
                    return
            except (asyncpg.PostgresError, PgOutputError, ReplicationError) as exc:
                self._drop_stream()
                # The slot was dropped, a query refused, a change not decodable: nothing was
                # confirmed past it, so waiting and reading again loses nothing.
                attempt += 1
                self._error("read")
                delay = doubling(attempt, 1.0, max(self.config.reconnect_max, 30.0))
                self._read_failures.warning(
                    "postgres source %r cannot read slot %s: %s (%s); the slot stays at its confirmed "
                    "position, reading again in %.0fs",
                    self.name,
                    self.config.slot,
                    exc,
                    type(exc).__name__,
                    delay,
                )
                if await wait_or_stop(self._stop, delay):
                    return

    def _drop_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.abort()

    def _lost(self, exc: BaseException) -> None:
        self.holds_lock = False
        self._drop_stream()
        self._error("connection")
        self._health.failing(redact_text(str(exc)) or type(exc).__name__)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _take_lock(self, conn: Any) -> bool:
        """Waits (standing by) until this replica holds the slot's advisory lock. False: stopped."""
        announced = False
        while not self._stop.is_set():
            if await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", server.lock_key(self.config.slot)
            ):
                if announced or not self.holds_lock:
                    log.info("postgres source %r holds slot %s: reading", self.name, self.config.slot)
                self.holds_lock = True
                return True
            self.holds_lock = False
            if not announced:
                announced = True
                log.info(
                    "postgres source %r: slot %s is read by another replica; standing by",
                    self.name,
                    self.config.slot,
                )
            self._health.restored()
            if await wait_or_stop(self._stop, self.config.standby_poll):
                return False
        return False

    async def _read(self, conn: Any) -> None:
        cfg = self.config
        while not self._stop.is_set():
            if not await self._room(conn):
                continue
            rows = await conn.fetch(
                server.PEEK, cfg.slot, self.pending.rows + cfg.batch_size, cfg.publication
            )
            await self._learn_keys(conn, [data for _, data in rows])
            transactions = self._assemble(rows)
            # No "nothing published up to the current WAL position, confirm it" shortcut for a quiet
            # publication: the flush position can lie inside a commit record the peek did not
            # decode yet, and confirming it would skip that transaction. A quiet slot's lag shows
            # in fastconn_postgres_slot_lag_bytes instead.
            if not transactions:
                if await wait_or_stop(self._stop, cfg.poll_interval):
                    return
                continue
            try:
                await self._deliver(conn, transactions)
            except DispatcherClosed:
                return

    async def _read_stream(self, conn: Any) -> None:
        """Streams the slot: the server pushes each change once as it commits. A new stream
        starts at the slot's confirmed position; what was handed out already is skipped by
        commit LSN, as after a peek."""
        cfg = self.config
        self._drop_stream()
        stream = await ReplicationStream.open(self._dsn, server.SESSION_SETTINGS, timeout=10)
        self._stream = stream
        await stream.start(cfg.slot, cfg.publication)
        if self.pending.confirmed is not None:
            # The server keeps a streamed slot's confirmed position in memory until a checkpoint
            # finds the slot dirty: after a server restart it may start further back than we
            # confirmed. Confirm again; later confirmations only go forward from here.
            await stream.confirm(self.pending.confirmed)
        self._assembler.reset()
        while not self._stop.is_set():
            if not await self._room(conn):
                # Not reading holds the server back (TCP); status updates keep the stream alive.
                await stream.tick()
                continue
            batch = await stream.read(cfg.batch_size, cfg.poll_interval)
            if not batch:
                continue
            await self._learn_keys(conn, [item.data for item in batch])
            transactions = self._assemble_stream(batch)
            if transactions:
                try:
                    await self._deliver(conn, transactions)
                except DispatcherClosed:
                    return

    def _assemble_stream(self, batch: list[XLogData]) -> list[tuple[Transaction, int]]:
        """The transactions a streamed batch completes (a batch may end inside a transaction:
        the assembler keeps it open for the next)."""
        out: list[tuple[Transaction, int]] = []
        skip = self.pending.read_through
        feed = self._assembler.feed
        for item in batch:
            txn = feed(item.start, item.data, skip)
            if txn is not None:
                out.append((txn, 0))
                skip = txn.commit_lsn
        return out

    async def _room(self, conn: Any) -> bool:
        """Confirms what is done and watches the lag; then False, after waiting up to
        ``poll_interval`` for progress, while reading must wait (see :meth:`_full`)."""
        await self._confirm(conn)
        await self._watch_lag(conn)
        if not self._full():
            return True
        self._progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._progress.wait(), self.config.poll_interval)
        return False

    def _full(self) -> bool:
        """Whether to wait before the next peek: the dispatcher is full, or a batch is already
        read and not confirmed. Every peek decodes again (on the server) and returns everything
        not confirmed yet, so reading further ahead costs more than it gains."""
        d = self._require_ctx().dispatcher
        return not d.has_capacity or self.pending.changes >= self.config.batch_size

    def _assemble(self, rows: list[Any]) -> list[tuple[Transaction, int]]:
        """The transactions of a peek not read before, with the rows each took."""
        self._assembler.reset()
        out: list[tuple[Transaction, int]] = []
        rows_in_txn = 0
        skip = self.pending.read_through
        for lsn_text, data in rows:
            rows_in_txn += 1
            txn = self._assembler.feed(parse_lsn(lsn_text), data, skip)
            if txn is not None:
                out.append((txn, rows_in_txn))
                skip = txn.commit_lsn
            if data[:1] == b"C":
                rows_in_txn = 0
        return out

    async def _learn_keys(self, conn: Any, messages: list[bytes]) -> None:
        """Orders by primary key where the table has one (with REPLICA IDENTITY FULL every
        column is flagged as identity, and a changed column would change the key). Looked up
        once per table, before the batch's changes are built."""
        if self.config.ordering != "key":
            return
        for data in messages:
            if data[:1] != b"R":
                continue
            relation = decode(data)
            if not isinstance(relation, Relation) or self._pk_checked.get(relation.oid) == relation.columns:
                continue
            # Again after a schema change: the key's column positions may have moved.
            self._pk_checked[relation.oid] = relation.columns
            names = await conn.fetch(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = $1 AND i.indisprimary",
                relation.oid,
            )
            wanted = {r["attname"] for r in names}
            if wanted:
                self._assembler.key_columns[relation.oid] = tuple(
                    i for i, c in enumerate(relation.columns) if c.name in wanted
                )
            else:
                self._assembler.key_columns.pop(relation.oid, None)

    async def _deliver(self, conn: Any, transactions: list[tuple[Transaction, int]]) -> None:
        messages: list[Message] = []
        message = self._message
        filters = self._filters
        for txn, rows in transactions:
            chosen = [c for c in txn.changes if c.topic in filters] if filters else txn.changes
            self.counters["filtered"] += len(txn.changes) - len(chosen)
            state = self.pending.add(txn, rows, len(chosen))
            messages.extend([message(change, state) for change in chosen])
        self._progress.set()
        # In chunks the dispatcher takes at once, confirming in between: a peek can hold more
        # changes than the dispatcher, and waiting for room must not hold back the confirmation
        # of what finished meanwhile (after a crash, all of that would be delivered again).
        # Every change tracked above must reach the dispatcher even when a confirmation fails
        # (the server restarting): the next peek skips them, so one left out would hold the
        # slot forever. The failure is raised once all are submitted.
        chunk = max(1, self._require_ctx().dispatcher.options.batch_size)
        failure: Exception | None = None
        for start in range(0, len(messages), chunk):
            await self._submit(messages[start : start + chunk])
            if failure is None:
                try:
                    await self._confirm(conn)
                except (*server.CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    failure = exc
        if failure is not None:
            raise failure

    def _message(self, change: Change, txn: TxnState) -> Message:
        ordering = self.config.ordering
        if ordering == "key":
            key = change.identity
        elif ordering == "transaction":
            key = _TRANSACTION_KEY
        else:
            key = None
        message = Message(
            topic=change.topic,
            payload=change.body,
            headers=(
                ("X-Event-Action", change.action),
                ("X-Event-Table", change.table),
                ("X-Event-Schema", change.schema),
                ("X-Event-Id", change.id),
                ("X-Pg-Lsn", change.lsn_text),
            ),
            message_id=change.id,
            key=key,
            hold_key_on_retry=key is not None,
            hold_key_on_failure=key is not None and self.config.dead_letter_table is None,
        )
        message.handle = InFlight(txn, change, message)
        return message

    async def _submit(self, messages: list[Message]) -> None:
        self._in_core += len(messages)
        try:
            await self._require_ctx().submit(
                self.name, messages, self._on_outcomes, asynchronous=self.config.asynchronous_invocation
            )
        except BaseException:
            self._in_core -= len(messages)
            raise

    # -- outcomes --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        self._in_core -= len(outcomes)
        settled: list[Outcome] = []
        for outcome in outcomes:
            item: InFlight = outcome.message.handle
            verdict = outcome.verdict
            if verdict is Verdict.OK or verdict is Verdict.UNROUTED:
                self._done(item)
                settled.append(outcome)
            elif verdict is Verdict.FAILED and self.config.dead_letter_table:
                if outcome.key_held and outcome.message.key is not None:
                    ctx.dispatcher.release_key(outcome.message.key)
                self._stick(item)
                ctx.supervise(f"{self.name}.dead-letter", self._dead_letter_job(item, outcome))
            else:
                self._retry_later(item, outcome)
        self.counters["delivered"] += len(settled)
        ctx.count_settled(self.name, settled)
        self._progress.set()

    def _done(self, item: InFlight) -> None:
        self._unstick(item)
        self.pending.change_done(item.txn)

    def _stick(self, item: InFlight) -> None:
        if not item.stuck:
            item.stuck = True
            self.stuck += 1

    def _unstick(self, item: InFlight) -> None:
        if item.stuck:
            item.stuck = False
            self.stuck -= 1

    def _retry_later(self, item: InFlight, outcome: Outcome) -> None:
        item.held = outcome.key_held
        self._stick(item)
        cfg = self.config
        delay = doubling(item.deliveries, cfg.retry_backoff_initial, cfg.retry_backoff_max)
        if outcome.retry_after:
            delay = max(delay, outcome.retry_after)
        failure = outcome.first_failure()
        level = logging.WARNING if item.deliveries == 1 or item.deliveries % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "postgres change %s (%s) not delivered (%s, delivery %d): retrying in %.1fs; the slot waits%s",
            item.change.id,
            item.change.topic,
            f"{failure.function} -> {failure.status_label}" if failure else outcome.verdict.name,
            item.deliveries,
            delay,
            "" if outcome.verdict is Verdict.RETRY else " (failed for good, no dead_letter_table)",
        )
        if self._stop.is_set():
            return  # not confirmed: read again after the restart
        self._retries.push(item, delay)

    async def _redeliver(self) -> None:
        while True:
            batch = await self._retries.next_due()
            messages = []
            for item in batch:
                item.deliveries += 1
                item.message = dataclasses.replace(
                    item.message, delivery_attempt=item.deliveries, resume=item.held
                )
                item.held = False
                messages.append(item.message)
            try:
                await self._submit(messages)
            except DispatcherClosed:
                return
            self.counters["redeliveries"] += len(messages)

    def _dead_letter_job(self, item: InFlight, outcome: Outcome) -> Callable[[], Coroutine[Any, Any, None]]:
        return lambda: self._dead_letter(item, outcome)

    async def _dead_letter(self, item: InFlight, outcome: Outcome) -> None:
        """Writes the change and its failure context to ``dead_letter_table``, then it is done.
        Raises when the write fails: the supervisor runs it again (the change stays not done)."""
        table = self.config.dead_letter_table
        assert table is not None
        failure = outcome.first_failure()
        excerpt = response_excerpt(outcome)
        context = dict(failure_context(outcome, (), deliveries=item.deliveries, reason="failed"))
        async with self._dlt_lock:
            if self._dlt_conn is None or self._dlt_conn.is_closed():
                self._dlt_conn = await asyncpg.connect(
                    self._dsn, server_settings=server.SESSION_SETTINGS, timeout=10
                )
            try:
                await self._dlt_conn.execute(
                    f"INSERT INTO {server.qualified(table)} (change_id, lsn, topic, function, status, "
                    "attempts, error, response, deliveries, change, context) "
                    "VALUES ($1, $2::text::pg_lsn, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11::jsonb)",
                    item.change.id,
                    item.change.lsn_text,
                    item.change.topic,
                    failure.function if failure else None,
                    failure.status if failure else None,
                    failure.attempts if failure else None,
                    (f"HTTP {failure.status}" if failure.status else failure.error.label)
                    if failure
                    else None,
                    excerpt.decode("utf-8", "replace") if excerpt else None,
                    item.deliveries,
                    item.change.body.decode(),
                    orjson.dumps(context).decode(),
                )
            except BaseException:
                conn, self._dlt_conn = self._dlt_conn, None
                with contextlib.suppress(Exception):
                    conn.terminate()
                self._error("dead_letter")
                await asyncio.sleep(self.config.retry_backoff_initial)
                raise
        self.counters["dead_lettered"] += 1
        log.warning(
            "postgres change %s (%s) dead-lettered to %s (%s)",
            item.change.id,
            item.change.topic,
            table,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._require_ctx().metrics.messages_failed.labels(source=self.name).inc()
        self._done(item)
        self._progress.set()

    # -- confirming ------------------------------------------------------------------------

    async def _confirm(self, conn: Any) -> None:
        lsn = self.pending.confirmable()
        if lsn is not None and (self.pending.confirmed is None or lsn > self.pending.confirmed):
            await self._advance(conn, lsn)

    async def _advance(self, conn: Any, lsn: int) -> None:
        if self._stream is not None:
            # The streaming connection holds the slot: SQL cannot advance it meanwhile.
            await self._stream.confirm(lsn)
        else:
            await conn.execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", self.config.slot, format_lsn(lsn)
            )
        self.pending.confirmed_through(lsn)
        self.counters["confirms"] += 1

    async def _watch_lag(self, conn: Any) -> None:
        now = time.monotonic()
        if now - self._lag_checked < _LAG_EVERY:
            return
        self._lag_checked = now
        self.slot_lag_bytes = await server.slot_lag(conn, self.config.slot)
        limit = self.config.max_slot_lag_bytes
        over = limit and self.slot_lag_bytes is not None and self.slot_lag_bytes > limit
        if over and now - self._lag_warned >= _LAG_WARN_EVERY:
            self._lag_warned = now
            log.error(
                "postgres slot %s holds %d bytes of WAL on the server (max_slot_lag_bytes %d): changes "
                "are not being confirmed (%d stuck, oldest read %.0fs ago); the server keeps this WAL "
                "until they are",
                self.config.slot,
                self.slot_lag_bytes,
                limit,
                self.stuck,
                self.pending.oldest_age(),
            )

    # -- helpers ---------------------------------------------------------------------------

    def _error(self, kind: str) -> None:
        if self._ctx is not None:
            self._ctx.metrics.source_errors.labels(source=self.name, kind=kind).inc()

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError("postgres source used before register()")
        return self._ctx
