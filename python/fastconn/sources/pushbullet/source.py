"""The Pushbullet source: follow the stream, sync pushes on tickles, dispatch, checkpoint
(see the package docstring for the guarantee)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Final

import orjson

from fastconn.backoff import doubling
from fastconn.checkpoint import CheckpointStore, checkpoint_store
from fastconn.dead_letter_sink import DeadLetterError, DeadLetterSink, dead_letter_sink
from fastconn.deadletter import failure_context
from fastconn.delay_queue import DelayQueue
from fastconn.errors import DispatcherClosed, SourceError
from fastconn.health import ConnectionHealth, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.ratelimit import RateLimitedLog
from fastconn.source import SourceContext
from fastconn.sources.pushbullet.api import ApiError, PushbulletApi, TokenRefused
from fastconn.sources.pushbullet.config import PushbulletConfig, read_token
from fastconn.sources.pushbullet.metrics import pushbullet_metrics
from fastconn.sources.pushbullet.progress import Boundary, Progress, Tracked
from fastconn.sources.pushbullet.stream import StreamFollower

__all__ = ["EPHEMERAL_TOPIC_PREFIX", "PushbulletSource"]

log = logging.getLogger("fastconn.source.pushbullet")

EPHEMERAL_TOPIC_PREFIX: Final = "ephemeral:"
"""Ephemerals have no channel: their topic is ``ephemeral:<push type>`` (``ephemeral:mirror``)."""
_SKIP_REASONS: Final = ("unknown_channel", "no_channel", "filtered", "dismissed", "malformed")


@dataclass(slots=True, eq=False)
class InFlight:
    """A push handed to the dispatcher (``tracked`` is None for an ephemeral)."""

    message: Message
    tracked: Tracked | None
    deliveries: int = 1
    held: bool = False
    stuck: bool = False


class PushbulletSource:
    def __init__(self, config: PushbulletConfig) -> None:
        self.config = config
        self.name = config.name
        self._ctx: SourceContext | None = None
        self._api: PushbulletApi | None = None
        self._store: CheckpointStore | None = None
        self._dead_letters: DeadLetterSink | None = None
        self._stream: StreamFollower | None = None
        self.progress = Progress(Boundary())
        self._tags: dict[str, str] = {}
        self._health = ConnectionHealth(self.name, "pushbullet stream", log)
        self._sync_wanted = asyncio.Event()
        self._save_wanted = asyncio.Event()
        self._ephemerals: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10_000)
        self._retries: DelayQueue[InFlight] = DelayQueue()
        self._letters: asyncio.Queue[tuple[InFlight, Outcome]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stuck = 0
        self._failures = RateLimitedLog(log, 30.0)
        self.skipped = dict.fromkeys(_SKIP_REASONS, 0)
        self._counts = dict.fromkeys(
            ("syncs", "sync_failures", "dispatched", "ephemerals", "redeliveries", "dead_lettered"),
            0,
        )
        self._counts["checkpoints"] = 0

    # -- lifecycle -------------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        pushbullet_metrics(ctx.metrics.registry).sources.append(self)

    def health(self) -> SourceHealth:
        return self._health.health()

    @property
    def counters(self) -> dict[str, int]:
        """Event counts (``fastconn_pushbullet_events``), the stream's and the API's included."""
        counts = dict(self._counts)
        counts["rate_limited"] = self._api.rate_limited if self._api is not None else 0
        stream = self._stream
        counts["stream_connections"] = stream.connections if stream is not None else 0
        counts["keepalive_timeouts"] = stream.keepalive_timeouts if stream is not None else 0
        return counts

    @property
    def stuck_pushes(self) -> int:
        return self._stuck

    @property
    def outstanding_pushes(self) -> int:
        return self.progress.outstanding

    async def start(self) -> None:
        cfg = self.config
        token = read_token(cfg)
        self._api = PushbulletApi(
            cfg.api_url,
            token,
            source=self.name,
            timeout=cfg.request_timeout,
            max_rate_limit_wait=cfg.max_rate_limit_wait,
        )
        try:
            await self._api.open()
            await self._api.me()
            self._tags = await self._api.channel_tags()
            self._store = checkpoint_store(cfg.checkpoint, self.name)
            await self._store.open()
            self.progress = Progress(await self._initial_boundary())
            await self._store.save(self.progress.boundary.encode())
            if cfg.dead_letter is not None:
                self._dead_letters = dead_letter_sink(cfg.dead_letter, self.name)
                await self._dead_letters.open()
        except ApiError as exc:
            await self._close_clients()
            raise SourceError(
                f"pushbullet source {self.name!r}: the API at {cfg.api_url} did not answer ({exc}): "
                "check api_url and the network"
            ) from None
        except BaseException:
            await self._close_clients()
            raise
        missing = [tag for tag in cfg.channels if tag not in self._tags.values()]
        if missing:
            log.warning(
                "pushbullet source %r: not subscribed to and not owning channel(s) %s: their pushes "
                "will not arrive",
                self.name,
                ", ".join(missing),
            )
        self._stream = StreamFollower(
            cfg.stream_url,
            token,
            health=self._health,
            keepalive_timeout=cfg.keepalive_timeout,
            reconnect_initial=cfg.reconnect_initial,
            reconnect_max=cfg.reconnect_max,
            on_sync=self._sync_wanted.set,
            on_ephemeral=self._on_ephemeral,
        )
        ctx = self._require_ctx()
        self._sync_wanted.set()
        self._tasks = [
            ctx.supervise(f"{self.name}.stream", self._stream.run),
            ctx.supervise(f"{self.name}.sync", self._sync_loop),
            ctx.supervise(f"{self.name}.ephemerals", self._ephemeral_loop),
            ctx.supervise(f"{self.name}.redeliver", self._redeliver_loop),
            ctx.supervise(f"{self.name}.dead-letters", self._dead_letter_loop),
            ctx.supervise(f"{self.name}.checkpoint", self._checkpoint_loop),
        ]
        log.info(
            "pushbullet source %r: %d channel(s) known, resuming after modified=%.6f, stream %s",
            self.name,
            len(self._tags),
            self.progress.boundary.modified,
            self._stream.display,
        )

    async def _initial_boundary(self) -> Boundary:
        """The saved checkpoint; on the very first start, the newest push (deleted ones
        included): history before the source existed is not replayed."""
        assert self._store is not None and self._api is not None
        saved = await self._store.load()
        if saved is not None:
            try:
                return Boundary.decode(saved)
            except ValueError as exc:
                raise SourceError(
                    f"pushbullet source {self.name!r}: the saved checkpoint {saved[:80]!r} is not "
                    f"readable ({exc}): delete it to start from the newest push"
                ) from None
        newest = (await self._api.get("pushes", {"limit": "1"})).get("pushes")
        if isinstance(newest, list) and newest and isinstance(newest[0], dict):
            push = newest[0]
            modified, iden = push.get("modified"), push.get("iden")
            if isinstance(modified, int | float) and isinstance(iden, str):
                return Boundary(float(modified), frozenset({iden}))
        return Boundary()

    async def stop(self) -> None:
        """Stops following, syncing and redelivering; pushes in flight keep settling."""
        self._stopping = True
        for task in self._tasks:
            if not task.get_name().endswith(("dead-letters", "checkpoint")):
                task.cancel()
        self._retries.drain()  # not checkpointed: synced again after the restart

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._store is not None and self.progress.unsaved:
            try:
                await self._save()
            except Exception as exc:
                log.warning("pushbullet source %r: last checkpoint not saved: %r", self.name, exc)
        await self._close_clients()

    async def _close_clients(self) -> None:
        for client in (self._api, self._store, self._dead_letters):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
        self._api = self._store = self._dead_letters = None

    # -- syncing ---------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        ctx = self._require_ctx()
        # Pushes read before the topic map exists would be "unrouted", settled and checkpointed.
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            log.warning("pushbullet source %r waits for the topic map before syncing", self.name)
        self._sync_wanted.set()  # also after a restart of this loop: what it was doing is redone
        failures = 0
        while True:
            await self._sync_wanted.wait()
            # Tickles arriving while a sync runs are folded into one more sync.
            self._sync_wanted.clear()
            try:
                await self._sync()
            except DispatcherClosed:
                return
            except (ApiError, TokenRefused) as exc:
                failures += 1
                self._counts["sync_failures"] += 1
                delay = doubling(failures, self.config.reconnect_initial, self.config.reconnect_max)
                self._failures.warning(
                    "pushbullet source %r: sync failed (%s): again in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                self._sync_wanted.set()
            else:
                failures = 0

    async def _sync(self) -> None:
        api = self._require_api()
        progress = self.progress
        pushes = await api.pushes_since(Boundary(progress.read_through).modified_after, self.config.page_size)
        self._counts["syncs"] += 1
        readable = [p for p in pushes if _well_formed(p)]
        self.skipped["malformed"] += len(pushes) - len(readable)
        readable.sort(key=_modified)
        if any(self._needs_refresh(p) for p in readable):
            self._tags = await api.channel_tags()
        messages: list[Message] = []
        for push in readable:
            iden, modified = push["iden"], _modified(push)
            created = float(push.get("created", modified))
            tracked = progress.read(iden, created, modified)
            if tracked is None:
                continue
            topic = self._topic(push)
            if topic is None:
                self._settle(tracked)
                continue
            messages.append(self._message(push, topic, tracked))
        await self._submit_all(messages)

    def _needs_refresh(self, push: dict[str, Any]) -> bool:
        channel = push.get("channel_iden")
        return isinstance(channel, str) and bool(channel) and channel not in self._tags

    def _topic(self, push: dict[str, Any]) -> str | None:
        """The channel's tag, or None (counted) when the push is not for a function."""
        if push.get("dismissed") is True:
            reason = "dismissed"
        elif not isinstance(push.get("channel_iden"), str) or not push["channel_iden"]:
            reason = "no_channel"
        elif push["channel_iden"] not in self._tags:
            reason = "unknown_channel"
        elif self.config.channels and self._tags[push["channel_iden"]] not in self.config.channels:
            reason = "filtered"
        else:
            return self._tags[push["channel_iden"]]
        self.skipped[reason] += 1
        return None

    def _message(self, push: dict[str, Any], topic: str, tracked: Tracked | None) -> Message:
        iden = push.get("iden")
        kind = push.get("type")
        headers = [("X-Pushbullet-Type", kind)] if isinstance(kind, str) and kind else []
        if isinstance(iden, str) and iden:
            headers.append(("X-Pushbullet-Iden", iden))
        if tracked is not None:
            headers.append(("X-Pushbullet-Channel", topic))
        message = Message(
            topic=topic,
            payload=orjson.dumps(push),
            headers=headers,
            message_id=iden if isinstance(iden, str) and iden else None,
        )
        message.handle = InFlight(message, tracked)
        return message

    async def _submit_all(self, messages: list[Message]) -> None:
        # In chunks the dispatcher takes at once: a long backlog starts settling (and the
        # checkpoint moving) while the rest waits for room.
        chunk = max(1, self._require_ctx().dispatcher.options.batch_size)
        for start in range(0, len(messages), chunk):
            part = messages[start : start + chunk]
            await self._submit(part)
            self._counts["dispatched"] += len(part)

    async def _submit(self, messages: list[Message]) -> None:
        await self._require_ctx().submit(
            self.name, messages, self._on_outcomes, asynchronous=self.config.asynchronous_invocation
        )

    # -- ephemerals ------------------------------------------------------------------------

    def _on_ephemeral(self, push: dict[str, Any]) -> None:
        if not self.config.ephemerals:
            return
        try:
            self._ephemerals.put_nowait(push)
        except asyncio.QueueFull:
            self._failures.warning("pushbullet source %r: ephemeral dropped (backlog full)", self.name)

    async def _ephemeral_loop(self) -> None:
        ctx = self._require_ctx()
        while not await ctx.wait_ready(max(ctx.startup_wait, 1.0)):
            pass  # the sync loop says so in the log
        while True:
            batch = [await self._ephemerals.get()]
            while not self._ephemerals.empty():
                batch.append(self._ephemerals.get_nowait())
            messages = []
            for push in batch:
                kind = push.get("type") if not push.get("encrypted") else "encrypted"
                topic = f"{EPHEMERAL_TOPIC_PREFIX}{kind if isinstance(kind, str) and kind else 'unknown'}"
                messages.append(self._message(push, topic, None))
            try:
                await self._submit(messages)
            except DispatcherClosed:
                return
            self._counts["ephemerals"] += len(messages)

    # -- outcomes --------------------------------------------------------------------------

    def _on_outcomes(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        for outcome in outcomes:
            item: InFlight = outcome.message.handle
            if outcome.ok:
                self._done(item)
            elif outcome.verdict is Verdict.FAILED and self._dead_letters is not None:
                self._stick(item)
                self._letters.put_nowait((item, outcome))
            else:
                self._retry_later(item, outcome)
        ctx.count_settled(self.name, [o for o in outcomes if o.ok])

    def _done(self, item: InFlight) -> None:
        if item.stuck:
            item.stuck = False
            self._stuck -= 1
        if item.tracked is not None:
            self._settle(item.tracked)

    def _settle(self, tracked: Tracked) -> None:
        self.progress.settle(tracked)
        self._save_wanted.set()

    def _stick(self, item: InFlight) -> None:
        if not item.stuck:
            item.stuck = True
            self._stuck += 1

    def _retry_later(self, item: InFlight, outcome: Outcome) -> None:
        self._stick(item)
        cfg = self.config
        delay = doubling(item.deliveries, cfg.retry_backoff_initial, cfg.retry_backoff_max)
        if outcome.retry_after:
            delay = max(delay, outcome.retry_after)
        failure = outcome.first_failure()
        self._failures.warning(
            "pushbullet push %s (%s) not delivered (%s, delivery %d): retrying in %.1fs%s",
            outcome.message_id,
            outcome.message.topic,
            f"{failure.function} -> {failure.status_label}" if failure else outcome.verdict.name,
            item.deliveries,
            delay,
            "" if outcome.verdict is Verdict.RETRY else " (failed for good, no dead_letter)",
        )
        if self._stopping:
            return  # not checkpointed: synced again after the restart
        self._retries.push(item, delay)

    async def _redeliver_loop(self) -> None:
        while True:
            batch = await self._retries.next_due()
            for item in batch:
                item.deliveries += 1
                item.message = dataclasses.replace(item.message, delivery_attempt=item.deliveries)
            try:
                await self._submit([i.message for i in batch])
            except DispatcherClosed:
                return
            self._counts["redeliveries"] += len(batch)

    async def _dead_letter_loop(self) -> None:
        while True:
            item, outcome = await self._letters.get()
            attempt = 0
            while True:
                try:
                    await self._dead_letter(item, outcome)
                    break
                except DeadLetterError as exc:
                    attempt += 1
                    cfg = self.config
                    delay = doubling(attempt, cfg.retry_backoff_initial, cfg.retry_backoff_max)
                    self._failures.warning(
                        "pushbullet push %s: dead letter not written (%s): again in %.1fs",
                        outcome.message_id,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)

    async def _dead_letter(self, item: InFlight, outcome: Outcome) -> None:
        assert self._dead_letters is not None
        origin = [("fastconn-dlt-original-topic", outcome.message.topic)]
        if item.tracked is not None:
            origin.append(("fastconn-dlt-original-modified", repr(item.tracked.modified)))
        context = failure_context(outcome, origin, deliveries=item.deliveries, reason="failed")
        await self._dead_letters.publish(outcome.message.payload, [*outcome.message.headers, *context])
        self._counts["dead_lettered"] += 1
        self._require_ctx().metrics.messages_failed.labels(source=self.name).inc()
        failure = outcome.first_failure()
        log.warning(
            "pushbullet push %s (%s) dead-lettered (%s)",
            outcome.message_id,
            outcome.message.topic,
            failure and f"{failure.function} -> {failure.status_label}",
        )
        self._done(item)

    # -- checkpoint ------------------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        failures = 0
        while True:
            await self._save_wanted.wait()
            self._save_wanted.clear()
            try:
                await self._save()
            except Exception as exc:
                failures += 1
                delay = doubling(failures, self.config.retry_backoff_initial, self.config.retry_backoff_max)
                self._failures.warning(
                    "pushbullet source %r: checkpoint not saved (%r): again in %.1fs", self.name, exc, delay
                )
                await asyncio.sleep(delay)
                self._save_wanted.set()
            else:
                failures = 0

    async def _save(self) -> None:
        assert self._store is not None
        boundary = self.progress.boundary
        if boundary == self.progress.saved:
            return
        await self._store.save(boundary.encode())
        self.progress.saved = boundary
        self._counts["checkpoints"] += 1

    # -- helpers ---------------------------------------------------------------------------

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError("pushbullet source used before register()")
        return self._ctx

    def _require_api(self) -> PushbulletApi:
        if self._api is None:
            raise RuntimeError("pushbullet source used before start()")
        return self._api


def _well_formed(push: dict[str, Any]) -> bool:
    """An iden, a finite ``modified`` and, when present, a finite ``created`` (without one, the
    push counts as created when modified)."""
    iden, created = push.get("iden"), push.get("created", 0.0)
    number = isinstance(created, int | float) and not isinstance(created, bool) and math.isfinite(created)
    return isinstance(iden, str) and bool(iden) and number and math.isfinite(_modified(push))


def _modified(push: dict[str, Any]) -> float:
    value = push.get("modified")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
