"""The postgres source as users run it (the daemon in a subprocess) through faults: kill -9 of
the daemon mid-stream, a PostgreSQL restart mid-stream, two replicas taking over the slot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from fastconn.sources.postgres.pgoutput import parse_lsn
from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from postgres_fixtures import ChangeFunction, Cluster, own_pg_cluster, pg_cluster, unique

__all__ = ["own_pg_cluster", "pg_cluster"]


def _config(cluster: Cluster, fn: FunctionDouble, table: str, slot: str, **extra: Any) -> dict[str, Any]:
    return {
        "functions": [{"name": "fn", "url": fn.url("/fn"), "topics": [f"{table}:insert"]}],
        "dispatch": {"max_attempts": 2, "backoff_initial": 0.01, "backoff_max": 0.05, "shutdown_timeout": 5},
        "sources": [
            {
                "type": "postgres",
                "dsn": cluster.dsn,
                "slot": slot,
                "publication": slot,
                "tables": [table],
                "poll_interval": 0.05,
                "reconnect_max": 0.5,
                "standby_poll": 0.2,
                **extra,
            }
        ],
        "log_level": "info",
    }


def _ids(fn: FunctionDouble, since: int = 0) -> list[str]:
    return [orjson.loads(c.body)["id"] for c in fn.calls[since:] if c.status == 200]


async def _insert(cluster: Cluster, table: str, total: int, per_txn: int = 1000) -> None:
    conn = await cluster.connect()
    try:
        for start in range(0, total, per_txn):
            await conn.execute(
                f"INSERT INTO {table} SELECT generate_series($1::int, $2::int)", start, start + per_txn - 1
            )
    finally:
        await conn.close()


@pytest.mark.slow
async def test_kill_9_mid_stream_then_restart_loses_nothing(pg_cluster: Cluster, tmp_path: Path) -> None:
    table, slot = unique("crash"), unique("crash_slot")
    total = 20_000
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with ChangeFunction() as fn:
        config = _config(pg_cluster, fn, table, slot)
        first = await DaemonProcess(config, tmp_path).start()
        try:
            await _insert(pg_cluster, table, total)
            await wait_for(lambda: len(fn.calls) >= total // 4, 60, 0.01, "a quarter delivered")
        finally:
            first.kill()
        await asyncio.sleep(0.2)  # calls the killed daemon left behind finish answering
        confirmed_at_kill = await pg_cluster.confirmed(slot)
        assert confirmed_at_kill is not None
        before = set(_ids(fn))
        answered_before = len(fn.calls)
        assert len(before) < total, "killed mid-stream"
        second = await DaemonProcess(config, tmp_path).start()
        try:
            await wait_for(lambda: len(set(_ids(fn))) >= total, 60, 0.1, "every change after the restart")
        finally:
            assert await second.stop() == 0, second.output()
    after = _ids(fn, answered_before)
    # The slot never passed an undelivered change: whatever had not reached the function before
    # the kill belongs to a transaction committed after the confirmed position.
    for change_id in set(after) - before:
        assert parse_lsn(change_id.split(":")[0]) > confirmed_at_kill, change_id
    assert len(set(_ids(fn))) == total
    duplicates = len(_ids(fn)) - total
    print(f"kill -9 after {len(before)}/{total} delivered: lost 0, duplicates {duplicates}")


async def test_postgres_restart_mid_stream_loses_nothing(own_pg_cluster: Cluster, tmp_path: Path) -> None:
    cluster = own_pg_cluster
    table, slot = unique("restart"), unique("restart_slot")
    total = 10_000
    await cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    # Slow enough (32 calls of 20 ms in flight: ~1,600 changes/s) that the restart lands
    # mid-stream: streaming reads the whole backlog at once.
    async with ChangeFunction(delay=0.02) as fn:
        config = _config(cluster, fn, table, slot)
        config["dispatch"] |= {"max_inflight": 32, "max_inflight_per_function": 32}
        daemon = await DaemonProcess(config, tmp_path).start()
        try:
            await _insert(cluster, table, total)
            (row,) = await cluster.fetch("SELECT (pg_current_wal_lsn() - '0/0')::bigint AS end")
            end = int(row["end"])
            await wait_for(lambda: len(fn.calls) >= total // 5, 60, 0.01, "a fifth delivered")
            await asyncio.to_thread(cluster.restart)
            delivered_at_restart = len(set(_ids(fn)))
            await wait_for(lambda: len(set(_ids(fn))) >= total, 60, 0.1, "every change after the restart")

            async def confirmed_all() -> bool:
                return (await cluster.confirmed(slot) or 0) >= end

            await wait_for(confirmed_all, 20, 0.1, "the slot confirmed to the end")
        finally:
            assert await daemon.stop() == 0, daemon.output()
    assert delivered_at_restart < total, "restarted mid-stream"
    assert "unreachable" in daemon.output() or "restored" in daemon.output(), daemon.output()
    print(
        f"postgres restart after {delivered_at_restart}/{total}: lost 0, duplicates {len(_ids(fn)) - total}"
    )


async def test_a_server_restart_after_everything_was_confirmed_confirms_the_slot_again(
    own_pg_cluster: Cluster, tmp_path: Path
) -> None:
    """A streamed slot's confirmed position lives in the server's memory until a checkpoint finds
    the slot dirty, which a confirmation alone does not make it: after a restart the slot may be
    back where it was. The source confirms again on the new stream (the changes in between are
    skipped, not delivered again)."""
    cluster = own_pg_cluster
    table, slot = unique("again"), unique("again_slot")
    await cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with ChangeFunction() as fn:
        daemon = await DaemonProcess(_config(cluster, fn, table, slot), tmp_path).start()
        try:
            await _insert(cluster, table, 2000)
            (row,) = await cluster.fetch("SELECT (pg_current_wal_lsn() - '0/0')::bigint AS end")
            last_commit = int(row["end"])

            async def confirmed_past_the_inserts() -> bool:
                # The last commit's end is at or just below the WAL position read after it.
                return (await cluster.confirmed(slot) or 0) >= last_commit - 4096

            await wait_for(lambda: len(set(_ids(fn))) >= 2000, 60, 0.05, "every change")
            await wait_for(confirmed_past_the_inserts, 20, 0.05, "the slot confirmed")
            calls_before = len(fn.calls)
            await asyncio.to_thread(cluster.restart)
            await wait_for(confirmed_past_the_inserts, 20, 0.05, "the slot confirmed after the restart")
            assert len(fn.calls) == calls_before, "changes handed out already were delivered again"
        finally:
            assert await daemon.stop() == 0, daemon.output()


@pytest.mark.slow
async def test_a_standby_replica_takes_over_after_kill_9(pg_cluster: Cluster, tmp_path: Path) -> None:
    table, slot = unique("ha"), unique("ha_slot")
    total = 4_000
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with ChangeFunction() as fn:
        config = _config(pg_cluster, fn, table, slot)
        one = await DaemonProcess(config, tmp_path).start()
        two = await DaemonProcess(config, tmp_path).start()
        try:

            async def readers() -> list[float]:
                out = []
                for d in (one, two):
                    samples = await d.metrics()
                    out.append(samples.get('fastconn_postgres_slot_reader{source="postgres"}', 0.0))
                return out

            async def exactly_one() -> bool:
                return sorted(await readers()) == [0.0, 1.0]

            await wait_for(exactly_one, 15, 0.1, "one replica reads, the other stands by")
            reader, standby = (one, two) if (await readers())[0] == 1.0 else (two, one)
            await _insert(pg_cluster, table, total, per_txn=200)
            await wait_for(lambda: len(fn.calls) >= total // 4, 60, 0.01, "a quarter delivered")
            reader.kill()

            async def took_over() -> bool:
                samples = await standby.metrics()
                return samples.get('fastconn_postgres_slot_reader{source="postgres"}', 0.0) == 1.0

            await wait_for(took_over, 15, 0.1, "the standby takes the slot")
            await wait_for(lambda: len(set(_ids(fn))) >= total, 60, 0.1, "every change after the takeover")
        finally:
            one.kill()
            two.kill()
    assert len(set(_ids(fn))) == total
    print(f"takeover: lost 0, duplicates {len(_ids(fn)) - total}")


async def test_readyz_reports_the_server_down_and_ready_again_after_it_returns(
    own_pg_cluster: Cluster, tmp_path: Path
) -> None:
    cluster = own_pg_cluster
    table, slot = unique("ready"), unique("ready_slot")
    await cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with ChangeFunction() as fn:
        config = {**_config(cluster, fn, table, slot), "server": {"readiness_grace": "1s"}}
        daemon = await DaemonProcess(config, tmp_path).start()
        try:

            async def ready_status() -> int:
                async with aiohttp.ClientSession() as http, http.get(daemon.url + "/readyz") as r:
                    return r.status

            await asyncio.to_thread(cluster.stop)
            await wait_for(lambda: _is(ready_status(), 503), 20, 0.1, "/readyz 503 while the server is down")
            await asyncio.to_thread(cluster.start)
            await wait_for(lambda: _is(ready_status(), 200), 20, 0.1, "/readyz 200 once it is back")
            await cluster.execute(f"INSERT INTO {table} VALUES (1)")
            await wait_for(lambda: len(fn.calls) == 1, 20, 0.05, "a change after the outage")
        finally:
            assert await daemon.stop() == 0, daemon.output()
    assert "unreachable" in daemon.output()


async def _is(status: Any, expected: int) -> bool:
    return bool(await status == expected)
