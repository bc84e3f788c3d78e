"""``postgres``: row inserts → function through a logical replication slot (pgoutput, peek then
advance after success), fastconn's postgres source against an asyncpg + aiohttp pipeline reading
the same kind of slot (peek a batch, 64 calls in flight, advance after the batch), in the same
run on a throw-away PostgreSQL cluster.

Each system has its own table, publication and slot, and one process for all its rounds. A round
inserts N single-row changes committed 1,000 per transaction; the window runs from the first
delivery to the last. The latency probe is left out: the change body is fastconn's JSON, not the
sink's stamped payload. Slot lag after the window is reported (``slot_lag_kb``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from _common import proc_peak_rss_mb
from fastconn.testing_pg import Cluster
from scenarios._base import Context, Role, Sample, ScenarioResult, System, Target, alternate, delivery_window
from scenarios._process import Running, daemon_config, start_daemon, start_pipeline

PER_TRANSACTION = 1000


@dataclass
class PostgresSystem:
    role: Role
    label: str
    cluster: Cluster
    process: Running | None = None
    next_id: int = 0

    @property
    def table(self) -> str:
        return f"bench_{self.role}"

    async def setup(self, ctx: Context) -> None:
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            await conn.execute(f"CREATE TABLE {self.table} (id int PRIMARY KEY, payload text)")
            await conn.execute(f"CREATE PUBLICATION {self.table} FOR TABLE {self.table}")
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
        return Sample(window.rate, window.messages, None, None, window.cpu_per_100k(), rss, extra)

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
    try:
        systems: list[System] = [
            PostgresSystem("fastconn", "fastconn daemon (postgres source)", cluster),
            PostgresSystem("baseline", f"asyncpg + aiohttp slot poller ({o.inflight} in flight)", cluster),
        ]
        await alternate(ctx, result, systems)
    finally:
        await asyncio.to_thread(cluster.destroy)
    result.notes.append(
        "one process per system for all rounds; no latency probe (bodies are change JSON); fastconn reads "
        "with its default batch_size (4,000 rows), the baseline peeks 1,000 rows per batch"
    )
    return [result]
