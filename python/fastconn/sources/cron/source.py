"""The cron source: turns the function table's schedules into fires and dispatches them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from fastconn.errors import DispatcherClosed
from fastconn.functions import FunctionTarget
from fastconn.health import HEALTHY, SourceHealth
from fastconn.message import Message, Outcome, Verdict
from fastconn.registry import CRON_TOPIC
from fastconn.source import SourceContext, wait_or_stop
from fastconn.sources.cron.config import CronConfig, Policy
from fastconn.sources.cron.leases import Leases
from fastconn.sources.cron.schedule import Schedule, ScheduleError, parse_schedule
from fastconn.sources.cron.store import Claimed, JetStreamKVStore, LocalStore, SlotStore
from fastconn.sources.cron.timeline import Due, Timeline, catch_up_slots

__all__ = ["CronSource", "message_id", "scheduled_time"]

log = logging.getLogger("fastconn.source.cron")

# Longest sleep with nothing scheduled; a table change wakes the loop earlier anyway.
_IDLE_WAIT = 3600.0
_CHUNK = 128


def scheduled_time(slot: float) -> str:
    """``X-Cron-Scheduled-Time``: the slot in ISO 8601, UTC (the same text on every replica)."""
    return datetime.fromtimestamp(slot, UTC).isoformat().replace("+00:00", "Z")


def message_id(function: str, slot: float) -> str:
    """``X-Message-Id`` of a fire: one id across retries, catch-up and replicas."""
    return f"cron:{function}:{scheduled_time(slot)}"


@dataclass(frozen=True, slots=True)
class _Spec:
    """What the function table says about one scheduled function."""

    schedule: str
    timezone: str
    policy: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _Job:
    spec: _Spec
    schedule: Schedule
    policy: Policy


class CronSource:
    """Fires ``cron-function`` subscribers on their schedules (see :mod:`fastconn.sources.cron`)."""

    def __init__(
        self,
        config: CronConfig,
        *,
        store: SlotStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = config.name
        self.config = config
        self._clock = clock
        self._body = config.body.encode()
        if store is None:
            store = JetStreamKVStore(config.store) if config.store is not None else LocalStore()
        self._store = store
        self._ctx: SourceContext | None = None
        self._wanted: dict[str, _Spec] = {}
        self._table_changed = False
        self._jobs: dict[str, _Job] = {}
        self._timeline = Timeline(self._jitter_of)
        self._first_sync = True
        self._running: set[str] = set()
        self._reported: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._leases = Leases(self._store, self.name, self._count_store_failures, scheduled_time)
        self._lease_tasks: list[asyncio.Task[None]] = []
        self.fired = 0
        """Fires this replica dispatched (its claims won)."""
        self.skipped_running = 0
        """Fires skipped by ``concurrency = forbid``."""
        self.claims_lost = 0
        """Slots another replica (or an earlier fire) already claimed."""
        self.taken_over = 0
        """Claims of dead replicas (lease expired, never done) this replica took over and fired."""

    # -- source protocol -------------------------------------------------------------------

    def register(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        ctx.on_functions_changed(self._on_functions)

    async def start(self) -> None:
        ctx = self._require_ctx()
        if self.config.store is None and self.config.catch_up != "none":
            log.warning(
                "source %s: catch_up = %r has no effect without a store: nothing remembers the last "
                'fired slot across a restart; add store = { type = "jetstream_kv", ... }',
                self.name,
                self.config.catch_up,
            )
        await self._store.open(self.name)
        self._task = ctx.supervise(f"{self.name}.timer", self._run)
        if self._store.durable:
            self._lease_tasks = [
                ctx.supervise(f"{self.name}.leases", self._keep_leases),
                ctx.supervise(f"{self.name}.done", self._leases.mark_done_loop),
            ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})

    async def close(self) -> None:
        # After the dispatcher drained: the fires that settled meanwhile are marked done, the
        # others keep their claim, which another replica takes over when its lease expires.
        for task in self._lease_tasks:
            task.cancel()
        await asyncio.gather(*self._lease_tasks, return_exceptions=True)
        self._lease_tasks = []
        try:
            await self._leases.flush_done()
        finally:
            await self._store.close()

    def health(self) -> SourceHealth:
        health = getattr(self._store, "health", None)
        return health.health() if health is not None else HEALTHY

    @property
    def scheduled(self) -> frozenset[str]:
        """The functions on the timeline now."""
        return self._timeline.functions

    # -- the function table ----------------------------------------------------------------

    def _on_functions(self, targets: tuple[FunctionTarget, ...]) -> None:
        self._wanted = {
            t.name: _Spec(t.schedule, t.timezone or self.config.timezone, t.cron_policy)
            for t in targets
            if t.schedule is not None and CRON_TOPIC in t.topics
        }
        self._table_changed = True
        self._wake.set()

    async def _sync(self, now: float) -> None:
        """Bring the timeline in line with the wanted schedules; on the first table after start,
        fire the missed slots the catch-up policy asks for."""
        for function in [f for f in self._jobs if f not in self._wanted]:
            del self._jobs[function]
            self._timeline.remove(function)
            log.info("source %s: %s unscheduled", self.name, function)
        added: list[str] = []
        for function, spec in self._wanted.items():
            current = self._jobs.get(function)
            if current is not None and current.spec == spec:
                continue
            job = self._job(function, spec)
            if job is None:
                if current is not None:
                    del self._jobs[function]
                    self._timeline.remove(function)
                continue
            self._jobs[function] = job
            self._timeline.put(function, job.schedule, now)
            added.append(function)
            log.info("source %s: %s scheduled %r (%s)", self.name, function, spec.schedule, spec.timezone)
        first, self._first_sync = self._first_sync, False
        if first:
            await self._catch_up(added, now)

    def _job(self, function: str, spec: _Spec) -> _Job | None:
        try:
            schedule = parse_schedule(spec.schedule, spec.timezone)
        except ScheduleError as exc:
            self._report(function, f"schedule {spec.schedule!r} ignored: {exc}")
            return None

        def report(key: str, value: str, reason: str) -> None:
            self._report(function, f"annotation fastconn.cron.{key}={value!r} ignored ({reason})")

        return _Job(spec, schedule, self.config.policy.overridden(dict(spec.policy), report))

    def _report(self, function: str, problem: str) -> None:
        """Warn once per function and problem, not on every rebuild."""
        if (function, problem) not in self._reported:
            self._reported.add((function, problem))
            log.warning("source %s: function %s: %s", self.name, function, problem)

    def _jitter_of(self, function: str) -> float:
        job = self._jobs.get(function)
        return job.policy.jitter if job is not None else 0.0

    async def _catch_up(self, functions: Sequence[str], now: float) -> None:
        wanted = [f for f in functions if self._jobs[f].policy.catch_up != "none"]
        if not wanted:
            return
        lasts = await asyncio.gather(*(self._store.last_fired(f) for f in wanted), return_exceptions=True)
        late: list[Due] = []
        for function, last in zip(wanted, lasts, strict=True):
            if isinstance(last, BaseException):
                log.warning(
                    "source %s: no catch-up for %s: store unavailable (%r)", self.name, function, last
                )
                continue
            job = self._jobs[function]
            slots = catch_up_slots(job.schedule, last, now, job.policy.catch_up, job.policy.max_catch_up)
            late.extend(Due(function, slot, now) for slot in slots)
        if late:
            log.info("source %s: catching up %d missed slot(s)", self.name, len(late))
            await self._fire(late)

    # -- firing ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self._table_changed:
                self._table_changed = False
                await self._sync(self._clock())
            due = self._timeline.pop_due(self._clock())
            if due:
                await self._fire(due)
            next_due = self._timeline.next_due()
            delay = _IDLE_WAIT if next_due is None else max(0.0, next_due - self._clock())
            if delay > 0:
                await wait_or_stop(self._wake, delay)

    async def _fire(self, due: Sequence[Due], *, claimed: bool = False) -> None:
        """Claims and fires ``due`` (``claimed``: already this replica's, e.g. taken over)."""
        # In chunks: the first calls go out while the rest are still being claimed and built
        # (1,000 fires on one slot take ~20 ms to build; the first should not wait for the last).
        for start in range(0, len(due), _CHUNK):
            if start:
                await asyncio.sleep(0)  # let outcomes and other sources run between chunks
            chunk = due[start : start + _CHUNK]
            if claimed:
                await self._dispatch(chunk)
            else:
                await self._fire_chunk(chunk)

    async def _fire_chunk(self, due: Sequence[Due]) -> None:
        ctx = self._require_ctx()
        candidates: list[Due] = []
        for fire in due:
            job = self._jobs.get(fire.function)
            if job is None:
                continue
            if job.policy.concurrency == "forbid" and fire.function in self._running:
                self.skipped_running += 1
                ctx.metrics.source_errors.labels(source=self.name, kind="skipped_running").inc()
                log.info(
                    "source %s: %s skipped slot %s: the previous fire still runs (concurrency = forbid)",
                    self.name,
                    fire.function,
                    scheduled_time(fire.slot),
                )
                continue
            candidates.append(fire)
        won, taken_over = await self._claim(candidates)
        self._report_taken_over(taken_over)
        await self._dispatch([*taken_over, *won])

    async def _dispatch(self, fires: Sequence[Due]) -> None:
        ctx = self._require_ctx()
        fires = [fire for fire in fires if fire.function in self._jobs]
        messages = [self._message(fire) for fire in fires]
        if not messages:
            return
        if self._store.durable:
            for message, fire in zip(messages, fires, strict=True):
                self._leases.started(message.message_id or "", fire.function, fire.slot)
        self._running.update(m.function for m in messages if m.function is not None)
        self.fired += len(messages)
        try:
            await ctx.submit(
                self.name, messages, self._settled, asynchronous=self.config.asynchronous_invocation
            )
        except DispatcherClosed:
            ctx.metrics.messages_failed.labels(source=self.name).inc(len(messages))
            log.warning("source %s: %d fire(s) not dispatched: shutting down", self.name, len(messages))

    async def _claim(self, due: Sequence[Due]) -> tuple[list[Due], list[Due]]:
        """The fires this replica won (one fire per slot among replicas sharing the store), and
        the expired claims of dead replicas it took over on the way."""
        now = self._clock()
        if isinstance(self._store, LocalStore):  # no I/O: no task per claim
            results: list[Claimed | BaseException] = [
                await self._store.claim(d.function, d.slot, now) for d in due
            ]
        else:
            # The function's fires settled since its last claim are marked done in this write.
            done = [self._leases.take_done(d.function) for d in due]
            results = await asyncio.gather(
                *(
                    self._store.claim(d.function, d.slot, now, finished)
                    for d, finished in zip(due, done, strict=True)
                ),
                return_exceptions=True,
            )
            for fire, finished, result in zip(due, done, results, strict=True):
                if isinstance(result, BaseException):  # not written: still owed
                    self._leases.give_back(fire.function, finished)
        won: list[Due] = []
        taken_over: list[Due] = []
        for fire, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                # Not fired: without the store nobody can say whether another replica fires it.
                self._require_ctx().metrics.source_errors.labels(source=self.name, kind="store").inc()
                log.warning(
                    "source %s: %s slot %s not fired: the store failed (%r)",
                    self.name,
                    fire.function,
                    scheduled_time(fire.slot),
                    result,
                )
                continue
            taken_over.extend(Due(fire.function, slot, now) for slot in result.taken_over)
            if result.won:
                won.append(fire)
            else:
                self.claims_lost += 1
        return won, taken_over

    def _message(self, fire: Due) -> Message:
        job = self._jobs[fire.function]
        when = scheduled_time(fire.slot)
        return Message(
            CRON_TOPIC,
            self._body,
            (("X-Cron-Schedule", job.spec.schedule), ("X-Cron-Scheduled-Time", when)),
            message_id=f"cron:{fire.function}:{when}",  # message_id(), without formatting twice
            function=fire.function,
        )

    def _settled(self, outcomes: list[Outcome]) -> None:
        ctx = self._require_ctx()
        ctx.count_settled(self.name, outcomes)
        for outcome in outcomes:
            if outcome.message.function is not None:
                self._running.discard(outcome.message.function)
            self._leases.settled(outcome.message_id)
            if outcome.verdict in (Verdict.RETRY, Verdict.FAILED):
                failure = outcome.first_failure()
                log.warning(
                    "source %s: fire %s failed (%s)",
                    self.name,
                    outcome.message_id,
                    failure.status_label if failure is not None else outcome.verdict.name,
                )

    # -- leases (durable store only) ---------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renews the leases of this replica's running fires every third of the lease, and
        every lease takes over the expired claims of scheduled functions (a replica died
        between claim and done; per-second schedules see them at their next claim anyway)."""
        lease = self._store_lease()
        sweep_at = self._clock()
        # Until close() cancels it, not until stop(): fires still running while the dispatcher
        # drains keep their leases, or another replica would take them over and fire them again.
        while True:
            await asyncio.sleep(lease / 3)
            now = self._clock()
            await self._leases.renew(now)
            if not self._stopping and now >= sweep_at:
                sweep_at = now + lease
                await self._sweep(now)

    async def _sweep(self, now: float) -> None:
        functions = list(self._jobs)
        taken: list[Due] = []
        for start in range(0, len(functions), _CHUNK):
            chunk = functions[start : start + _CHUNK]
            results = await asyncio.gather(
                *(self._store.take_over(f, now) for f in chunk), return_exceptions=True
            )
            for function, result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning(
                        "source %s: expired claims of %s not checked: %r", self.name, function, result
                    )
                else:
                    taken.extend(Due(function, slot, now) for slot in result)
        if taken:
            self._report_taken_over(taken)
            await self._fire(taken, claimed=True)

    def _report_taken_over(self, fires: Sequence[Due]) -> None:
        if not fires:
            return
        self.taken_over += len(fires)
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind="taken_over").inc(len(fires))
        log.warning(
            "source %s: firing %d slot(s) claimed by a replica that died before they were done "
            "(lease expired): %s",
            self.name,
            len(fires),
            ", ".join(f"{d.function}@{scheduled_time(d.slot)}" for d in fires[:5]),
        )

    def _count_store_failures(self, n: int) -> None:
        self._require_ctx().metrics.source_errors.labels(source=self.name, kind="store").inc(n)

    def _store_lease(self) -> float:
        lease = getattr(self._store, "lease", 30.0)
        return float(lease)

    def _require_ctx(self) -> SourceContext:
        if self._ctx is None:
            raise RuntimeError(f"source {self.name}: register() was not called")
        return self._ctx
