"""``postgres``: row inserts → function through a logical replication slot (pgoutput; fastconn
streams it and confirms after success), fastconn's postgres source against an asyncpg + aiohttp
pipeline reading the same kind of slot (peek a batch, 64 calls in flight, advance after the
batch), in the same run on a throw-away PostgreSQL cluster.

Each system has its own table, publication and slot, and one process for all its rounds. A round
inserts N single-row changes committed 1,000 per transaction; the window runs from the first
delivery to the last. The latency probe is left out: the change body is fastconn's JSON, not the
sink's stamped payload. Instead, fastconn's rounds end with a **commit → function latency probe**:
``PROBE_SECONDS`` of inserts at a steady 1,000 changes/s (10 rows committed every 10 ms) into a
second table of the same publication, routed to a receiver in the bench process that subtracts
each change's ``commitTime`` (the server's commit timestamp, same host clock) from its arrival.
The baseline pipeline posts to the sink only, so it has no probe. Slot lag after the window is
reported (``slot_lag_kb``)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from _common import proc_peak_rss_mb
from fastconn.testing_pg import Cluster
from scenarios._base import Context, Role, Sample, ScenarioResult, System, Target, alternate, delivery_window
from scenarios._process import Running, daemon_config, start_daemon, start_pipeline
from scenarios._receiver import TimingReceiver

PER_TRANSACTION = 1000
PROBE_SECONDS = 3.0
PROBE_RATE = 1000
PROBE_BATCH = 10
"""Rows per probe transaction: 10 every 10 ms makes the steady 1,000 changes/s."""


def commit_time(_headers: Mapping[str, str], body: bytes) -> float:
    """A change is late against its transaction's commit (``commitTime`` in the body)."""
    return datetime.fromisoformat(json.loads(body)["commitTime"]).timestamp()


@dataclass
class PostgresSystem:
    role: Role
    label: str
    cluster: Cluster
    receiver: TimingReceiver | None = None
    """Where the latency probe's changes go (fastconn only)."""
    process: Running | None = None
    next_id: int = 0
    next_probe_id: int = 0

    @property
    def table(self) -> str:
        return f"bench_{self.role}"

    @property
    def probe_table(self) -> str:
        return f"bench_{self.role}_probe"

    async def setup(self, ctx: Context) -> None:
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            await conn.execute(f"CREATE TABLE {self.table} (id int PRIMARY KEY, payload text)")
            tables = self.table
            if self.receiver is not None:
                await conn.execute(f"CREATE TABLE {self.probe_table} (id int PRIMARY KEY, payload text)")
                tables += f", {self.probe_table}"
            await conn.execute(f"CREATE PUBLICATION {self.table} FOR TABLE {tables}")
            await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", self.table)
        finally:
            await conn.close()
        if self.role == "fastconn":
            source = {
                "type": "postgres",
                "dsn": self.cluster.dsn,
                "slot": self.table,
                "publication": self.table,
                "poll_interval": 0.02,
            }
            config = daemon_config(ctx, [f"{self.table}:insert"], [source])
            if self.receiver is not None:
                config["functions"].append(
                    {
                        "name": "probe",
                        "url": f"{self.receiver.url}/function/probe",
                        "topics": [f"{self.probe_table}:insert"],
                    }
                )
            self.process = await start_daemon(ctx, config)
        else:
            args = ["--server", self.cluster.dsn, "--group", self.table, "--stream", self.table]
            self.process = await start_pipeline(ctx, "postgres", args)

    async def _insert(self, n: int, payload: int) -> None:
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            for start in range(self.next_id, self.next_id + n, PER_TRANSACTION):
                stop = min(start + PER_TRANSACTION, self.next_id + n) - 1
                await conn.execute(
                    f"INSERT INTO {self.table} SELECT g, repeat('x', $3) "
                    "FROM generate_series($1::int, $2::int) g",
                    start,
                    stop,
                    payload,
                )
        finally:
            await conn.close()
        self.next_id += n

    async def round(self, ctx: Context) -> Sample:
        assert self.process is not None
        n = ctx.options.messages
        await ctx.sink.reset()
        inserting = asyncio.create_task(self._insert(n, ctx.options.payload))
        try:
            window = await delivery_window(ctx, n, self.process.pid)
        finally:
            await inserting
        await asyncio.sleep(0.5)  # the last confirmation
        lag = await self._slot_lag()
        extra = {**window.busy, "slot_lag_kb": lag / 1024}
        rss = proc_peak_rss_mb(self.process.pid)
        p50, p99 = await self._latency_probe(ctx) if self.receiver is not None else (None, None)
        return Sample(window.rate, window.messages, p50, p99, window.cpu_per_100k(), rss, extra)

    async def _latency_probe(self, ctx: Context) -> tuple[float | None, float | None]:
        """Inserts at a steady PROBE_RATE for PROBE_SECONDS; p50/p99 of commit → function, ms."""
        assert self.receiver is not None
        self.receiver.calls.clear()
        n = int(PROBE_RATE * PROBE_SECONDS)
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            started = time.monotonic()
            for k, start in enumerate(range(self.next_probe_id, self.next_probe_id + n, PROBE_BATCH)):
                due = started + k * PROBE_BATCH / PROBE_RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await conn.execute(
                    f"INSERT INTO {self.probe_table} SELECT g, 'p' FROM generate_series($1::int, $2::int) g",
                    start,
                    start + PROBE_BATCH - 1,
                )
        finally:
            await conn.close()
        self.next_probe_id += n
        deadline = time.monotonic() + 30
        while len(self.receiver.calls) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self.receiver.calls) < n:
            raise TimeoutError(f"latency probe: the receiver got {len(self.receiver.calls)} of {n} changes")
        latencies = sorted(late * 1000 for _, _, late in self.receiver.calls)
        return statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]

    async def _slot_lag(self) -> float:
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            value = await conn.fetchval(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
                "WHERE slot_name = $1",
                self.table,
            )
        finally:
            await conn.close()
        return float(value or 0)

    async def close(self) -> None:
        if self.process is not None:
            await self.process.stop()


async def run(ctx: Context) -> list[ScenarioResult]:
    o = ctx.options
    result = ScenarioResult(
        "postgres",
        f"Postgres WAL → function (inserts, {PER_TRANSACTION} per transaction, confirm after success)",
        {"messages": o.messages, "payload": o.payload, "inflight": o.inflight},
        targets=[Target("≥ 5x asyncpg + aiohttp slot poller (issue 12)", "ratio_baseline", 5.0)],
    )
    cluster = await asyncio.to_thread(Cluster)
    receiver = TimingReceiver(commit_time)
    await receiver.start()
    try:
        systems: list[System] = [
            PostgresSystem("fastconn", "fastconn daemon (postgres source)", cluster, receiver),
            PostgresSystem("baseline", f"asyncpg + aiohttp slot poller ({o.inflight} in flight)", cluster),
        ]
        await alternate(ctx, result, systems)
    finally:
        await receiver.close()
        await asyncio.to_thread(cluster.destroy)
    result.notes.append(
        "one process per system for all rounds; fastconn reads with its default batch_size (4,000 rows), "
        "the baseline peeks 1,000 rows per batch; p50/p99 = fastconn's commit → function latency at a "
        f"steady {PROBE_RATE:,} changes/s ({PROBE_BATCH} rows per commit, {PROBE_SECONDS:g} s, after the "
        "throughput window); the baseline has no probe"
    )
    return [result]
