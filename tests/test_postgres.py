"""The postgres source against a real PostgreSQL 15 cluster (WAL mode, in process)."""

from __future__ import annotations

import asyncio
import base64
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fastconn.errors import SourceError
from fastconn.functions import FunctionTarget
from fastconn.testing import FunctionDouble, RecordedCall, to_toml, wait_for
from postgres_fixtures import ChangeFunction, Cluster, connection, pg_cluster, running_source, unique

__all__ = ["pg_cluster"]


def _source(cluster: Cluster, table: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "postgres",
        "dsn": cluster.dsn,
        "slot": unique("slot"),
        "publication": unique("pub"),
        "tables": [table],
        "poll_interval": 0.05,
        "retry_backoff_initial": 0.05,
        "retry_backoff_max": 0.2,
        **extra,
    }


def _bodies(fn: FunctionDouble, path: str) -> list[dict[str, Any]]:
    return [orjson.loads(c.body) for c in fn.calls_to(path) if c.status == 200]


async def test_every_action_reaches_its_function_with_typed_body_and_headers(pg_cluster: Cluster) -> None:
    table = unique("customer")
    await pg_cluster.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, name text, balance numeric, meta jsonb, raw bytea, "
        "at timestamptz, tags int[], labels text[], doc text, ok boolean)"
    )
    await pg_cluster.execute(f"ALTER TABLE {table} ALTER COLUMN doc SET STORAGE EXTERNAL")
    topics = [f"{table}:insert", f"{table}:update", f"{table}:delete"]
    async with FunctionDouble() as fn:
        targets = [FunctionTarget(t.split(":")[1], (t,), fn.url("/" + t.split(":")[1])) for t in topics]
        config = _source(pg_cluster, table)
        async with running_source(config, targets):
            big = "x" * 10_000  # TOASTed out of line (storage external)
            async with connection(pg_cluster) as conn:
                await conn.execute(
                    f"INSERT INTO {table} VALUES (1, 'Ada', 12345678901234567890.123456789, "
                    """'{"a": [1, 2]}', '\\x00ff', '2024-05-01 12:00:00.25+00', '{1,NULL,3}', """
                    """'{"a b",c}', $1, true)""",
                    big,
                )
                await conn.execute(f"UPDATE {table} SET name = NULL WHERE id = 1")
                await conn.execute(f"DELETE FROM {table} WHERE id = 1")
            await wait_for(lambda: len([c for c in fn.calls if c.status == 200]) == 3, 15, what="3 calls")
    (ins,) = _bodies(fn, "/insert")
    assert ins["action"] == "insert" and ins["table"] == table and ins["schema"] == "public"
    assert ins["data"] == {
        "id": 1,
        "name": "Ada",
        "balance": "12345678901234567890.123456789",
        "meta": {"a": [1, 2]},
        "raw": base64.b64encode(b"\x00\xff").decode(),
        "at": "2024-05-01T12:00:00.25+00:00",
        "tags": [1, None, 3],
        "labels": ["a b", "c"],
        "doc": big,
        "ok": True,
    }
    assert ins["dataOld"] is None
    assert ins["commitTime"].endswith("Z") and ins["lsn"] and ins["xid"] > 0
    (upd,) = _bodies(fn, "/update")
    assert upd["data"]["name"] is None, "NULL is null"
    assert "doc" not in upd["data"] and upd["unchangedToast"] == ["doc"], "unchanged TOAST is not NULL"
    (dele,) = _bodies(fn, "/delete")
    assert dele["dataOld"]["id"] == 1 and dele["data"] is None
    call = fn.calls_to("/insert")[0]
    assert call.headers["X-Topic"] == f"{table}:insert"
    assert call.headers["X-Event-Action"] == "insert"
    assert call.headers["X-Event-Table"] == table
    assert call.headers["X-Event-Schema"] == "public"
    assert call.headers["X-Event-Id"] == call.headers["X-Message-Id"] == ins["id"]
    assert call.headers["X-Pg-Lsn"] == ins["lsn"]
    assert call.headers["X-Delivery-Attempt"] == "1"
    assert len({b["id"] for b in (ins, upd, dele)}) == 3


async def test_filters_deliver_only_listed_actions_and_confirm_the_rest(pg_cluster: Cluster) -> None:
    table = unique("orders")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    async with FunctionDouble() as fn:
        topics = (f"{table}:insert", f"{table}:update")
        config = _source(pg_cluster, table, filters=f"{table}:insert")
        async with running_source(config, [FunctionTarget("fn", topics, fn.url("/fn"))]):
            async with connection(pg_cluster) as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1, 1)")
                await conn.execute(f"UPDATE {table} SET v = 2")
                await conn.execute(f"INSERT INTO {table} VALUES (2, 1)")
                end = await conn.fetchval("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
            await wait_for(lambda: len(fn.calls) == 2, 15, what="the two inserts")

            async def confirmed_past_all() -> bool:
                lsn = await pg_cluster.confirmed(config["slot"])
                return lsn is not None and lsn >= end

            await wait_for(confirmed_past_all, 10, 0.05, "the slot confirmed past the filtered update")
    assert [orjson.loads(c.body)["action"] for c in fn.calls] == ["insert", "insert"]


async def test_changes_to_one_row_arrive_in_commit_order_while_rows_run_in_parallel(
    pg_cluster: Cluster,
) -> None:
    table = unique("counters")
    rows, updates = 20, 15
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
    rng = random.Random(7)

    class Slow(FunctionDouble):
        concurrent = 0
        most = 0

        async def _handle(self, request: Any) -> Any:
            Slow.concurrent += 1
            Slow.most = max(Slow.most, Slow.concurrent)
            try:
                await asyncio.sleep(rng.random() * 0.005)
                return await super()._handle(request)
            finally:
                Slow.concurrent -= 1

    async with Slow() as fn:
        config = _source(pg_cluster, table)
        topics = (f"{table}:insert", f"{table}:update")
        async with running_source(config, [FunctionTarget("fn", topics, fn.url("/fn"))]):
            async with connection(pg_cluster) as conn:
                await conn.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, {rows}) g")
                for v in range(1, updates + 1):
                    await conn.execute(f"UPDATE {table} SET v = {v}")
            total = rows * (updates + 1)
            await wait_for(lambda: len(fn.calls) >= total, 30, what=f"{total} changes")
    seen: dict[int, list[int]] = {}
    for body in (orjson.loads(c.body) for c in fn.calls):
        seen.setdefault(body["data"]["id"], []).append(body["data"]["v"])
    assert all(values == list(range(updates + 1)) for values in seen.values()), seen
    assert Slow.most > 1, "different rows ran in parallel"


async def test_a_transaction_of_5000_rows_is_delivered_and_confirmed(pg_cluster: Cluster) -> None:
    table = unique("bulk")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with FunctionDouble() as fn:
        config = _source(pg_cluster, table, batch_size=500)
        async with running_source(config, [FunctionTarget("fn", (f"{table}:insert",), fn.url("/fn"))]):
            await pg_cluster.execute(f"INSERT INTO {table} SELECT generate_series(1, 5000)")
            end = int((await pg_cluster.fetch("SELECT (pg_current_wal_lsn() - '0/0')::bigint AS l"))[0]["l"])
            await wait_for(lambda: len(fn.calls) >= 5000, 30, what="5000 changes")

            async def confirmed() -> bool:
                return (await pg_cluster.confirmed(config["slot"]) or 0) >= end

            await wait_for(confirmed, 10, 0.05, "the transaction confirmed")
    ids = sorted(orjson.loads(c.body)["data"]["id"] for c in fn.calls)
    assert ids == list(range(1, 5001))


async def test_a_retrying_row_holds_only_its_key_and_the_slot_never_passes_it(pg_cluster: Cluster) -> None:
    table = unique("flaky")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")

    class FailRowOne(FunctionDouble):
        fail = True

        async def _handle(self, request: Any) -> Any:
            body = orjson.loads(await request.read())
            if body["data"]["id"] == 1 and FailRowOne.fail:
                self.calls.append(_call(request, await request.read(), 503))
                return web.Response(status=503)
            return await super()._handle(request)

    async with FailRowOne() as fn:
        config = _source(pg_cluster, table)
        topics = (f"{table}:insert", f"{table}:update")
        async with running_source(config, [FunctionTarget("fn", topics, fn.url("/fn"))]) as h:
            async with connection(pg_cluster) as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1, 0)")
                first_end = await conn.fetchval("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
                await conn.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(2, 10) g")
                await conn.execute(f"UPDATE {table} SET v = 1 WHERE id = 1")
                await conn.execute(f"UPDATE {table} SET v = 1 WHERE id > 1")
            await wait_for(
                lambda: len([c for c in fn.calls if c.status == 200]) == 18, 15, what="other rows delivered"
            )
            await wait_for(
                lambda: len([c for c in fn.calls if c.status == 503]) >= 6, 15, what="row 1 retried"
            )
            assert await pg_cluster.confirmed(config["slot"]) < first_end, "the slot passed a failing change"
            assert h.sample("fastconn_postgres_stuck_changes", source="postgres") == 1
            assert not [c for c in fn.calls if c.status == 200 and orjson.loads(c.body)["data"]["id"] == 1]
            FailRowOne.fail = False
            await wait_for(
                lambda: len([c for c in fn.calls if c.status == 200]) == 20, 15, what="row 1 after recovery"
            )
    ones = [
        orjson.loads(c.body) for c in fn.calls if c.status == 200 and orjson.loads(c.body)["data"]["id"] == 1
    ]
    assert [b["action"] for b in ones] == ["insert", "update"], "row 1's update waited for its insert"


async def test_a_final_failure_goes_to_the_dead_letter_table_with_context(pg_cluster: Cluster) -> None:
    table = unique("dl")
    dead = unique("dead")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with FunctionDouble() as fn:
        fn.script("/fn", [400])
        config = _source(pg_cluster, table, dead_letter_table=dead)
        async with running_source(config, [FunctionTarget("fn", (f"{table}:insert",), fn.url("/fn"))]):
            await pg_cluster.execute(f"INSERT INTO {table} VALUES (7)")
            end = int((await pg_cluster.fetch("SELECT (pg_current_wal_lsn() - '0/0')::bigint AS l"))[0]["l"])

            async def dead_lettered() -> bool:
                return bool(await pg_cluster.fetch(f"SELECT 1 FROM {dead}"))

            await wait_for(dead_lettered, 15, 0.05, "a dead-letter row")

            async def confirmed() -> bool:
                return (await pg_cluster.confirmed(config["slot"]) or 0) >= end

            await wait_for(confirmed, 10, 0.05, "the slot confirmed past the dead letter")
    (row,) = await pg_cluster.fetch(f"SELECT * FROM {dead}")
    assert row["function"] == "fn" and row["status"] == 400 and row["topic"] == f"{table}:insert"
    assert row["error"] == "HTTP 400" and row["attempts"] >= 1
    change = orjson.loads(row["change"])
    assert change["data"] == {"id": 7} and change["id"] == row["change_id"]
    assert orjson.loads(row["context"])["fastconn-dlt-function"] == "fn"


async def test_bad_set_ups_are_clear_errors(pg_cluster: Cluster) -> None:
    table = unique("t")
    async with FunctionDouble() as fn:
        targets = [FunctionTarget("fn", ("x",), fn.url("/fn"))]
        with pytest.raises(SourceError, match=rf"table '{table}' \(in tables\) does not exist"):
            async with running_source(_source(pg_cluster, table), targets):
                pass
        await pg_cluster.execute(f"CREATE TABLE {table} (id int)")
        with pytest.raises(SourceError, match=r"publication .* does not exist"):
            async with running_source(_source(pg_cluster, table, create_publication=False), targets):
                pass
        bad = {**_source(pg_cluster, table), "dsn": f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/nodb"}
        with pytest.raises(SourceError, match='database "nodb" does not exist'):
            async with running_source(bad, targets):
                pass
        await pg_cluster.execute("CREATE ROLE plain LOGIN")
        try:
            user = {
                **_source(pg_cluster, table),
                "dsn": f"postgresql://plain@127.0.0.1:{pg_cluster.port}/postgres",
            }
            with pytest.raises(SourceError, match='ALTER ROLE "plain" REPLICATION'):
                async with running_source(user, targets):
                    pass
        finally:
            await pg_cluster.execute("DROP ROLE plain")


async def test_a_server_without_logical_wal_is_a_clear_error() -> None:
    cluster = Cluster(wal_level="replica")
    try:
        async with FunctionDouble() as fn:
            with pytest.raises(SourceError, match="wal_level = logical"):
                async with running_source(
                    {"type": "postgres", "dsn": cluster.dsn}, [FunctionTarget("fn", ("x",), fn.url("/fn"))]
                ):
                    pass
    finally:
        cluster.destroy()


def _call(request: Any, body: bytes, status: int) -> RecordedCall:
    return RecordedCall(
        request.path, CIMultiDictProxy(CIMultiDict(request.headers)), body, time.monotonic(), status
    )


async def test_notify_mode_delivers_payloads_and_listens_again_after_the_connection_drops(
    pg_cluster: Cluster,
) -> None:
    channel = unique("events")
    async with ChangeFunction() as fn:
        config = {"type": "postgres", "mode": "notify", "dsn": pg_cluster.dsn, "channels": [channel]}
        async with running_source(config, [FunctionTarget("fn", (channel,), fn.url("/fn"))]):
            await pg_cluster.execute("SELECT pg_notify($1, $2)", channel, '{"n": 1}')
            await wait_for(lambda: len(fn.calls) == 1, 10, what="the first notification")
            assert fn.calls[0].body == b'{"n": 1}' and fn.calls[0].headers["X-Topic"] == channel
            # Drop the listening session: the source reconnects and LISTENs again by itself.
            killed = await pg_cluster.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fastconn'"
            )
            assert len(killed) == 1

            async def delivered_again() -> bool:
                await pg_cluster.execute("SELECT pg_notify($1, 'again')", channel)
                return any(c.body == b"again" for c in fn.calls)

            await wait_for(delivered_again, 15, 0.3, "a notification after the reconnection")


def _cli(tmp_path: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "fastconn.toml"
    function = {"name": "fn", "url": "http://127.0.0.1:9/fn", "topics": ["x"]}
    path.write_text(to_toml({"functions": [function], **config}))
    return subprocess.run(
        [sys.executable, "-m", "fastconn", "postgres", *args, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_reports_and_drops_the_slot(pg_cluster: Cluster, tmp_path: Path) -> None:
    table = unique("cli")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    source = _source(pg_cluster, table)
    async with ChangeFunction() as fn, running_source(source, [FunctionTarget("fn", ("x",), fn.url("/fn"))]):
        pass  # creates the slot
    config = {"sources": [source]}
    shown = await asyncio.to_thread(_cli, tmp_path, config, "status")
    assert shown.returncode == 0, shown.stderr
    assert f"slot {source['slot']}: confirmed" in shown.stdout and "no reader" in shown.stdout
    dropped = await asyncio.to_thread(_cli, tmp_path, config, "drop-slot")
    assert dropped.returncode == 0 and "dropped" in dropped.stdout, dropped.stderr
    assert await pg_cluster.confirmed(source["slot"]) is None
    again = await asyncio.to_thread(_cli, tmp_path, config, "status")
    assert "does not exist" in again.stdout


async def test_installed_trigger_notifies_table_action_and_shrinks_oversized_payloads(
    pg_cluster: Cluster, tmp_path: Path
) -> None:
    table = unique("trig")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    channels = [f"{table}:insert", f"{table}:update", f"{table}:delete"]
    source = {"type": "postgres", "mode": "notify", "dsn": pg_cluster.dsn, "channels": channels}
    installed = await asyncio.to_thread(
        _cli, tmp_path, {"sources": [source]}, "install-trigger", "--table", table
    )
    assert installed.returncode == 0, installed.stderr
    async with ChangeFunction() as fn:
        targets = [FunctionTarget("fn", tuple(channels), fn.url("/fn"))]
        async with running_source(source, targets), connection(pg_cluster) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            await conn.execute(f"UPDATE {table} SET note = $1", "y" * 9000)  # over NOTIFY's limit
            await conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
            await conn.execute(f"DELETE FROM {table} WHERE id = 2")
            await wait_for(lambda: len(fn.calls) == 4, 10, what="four notifications")
    # NOTIFY mode has no ordering: the calls may arrive in any order.
    by_topic: dict[str, list[Any]] = {}
    for call in fn.calls:
        body = orjson.loads(call.body)
        assert call.headers["X-Topic"] == f"{table}:{body['action']}"
        by_topic.setdefault(body["action"], []).append(body)
    head = {"schema": "public", "table": table}
    assert sorted(by_topic["insert"], key=lambda b: b["data"]["id"]) == [
        {**head, "action": "insert", "data": {"id": 1, "note": "a"}},
        {**head, "action": "insert", "data": {"id": 2, "note": "b"}},
    ]
    assert by_topic["update"] == [{**head, "action": "update", "truncated": True}]
    assert by_topic["delete"] == [{**head, "action": "delete", "data": {"id": 2, "note": "b"}}]


async def test_transaction_ordering_delivers_one_change_at_a_time_in_commit_order(
    pg_cluster: Cluster,
) -> None:
    table = unique("txn")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")

    class Counting(ChangeFunction):
        concurrent = 0
        most = 0

        async def _handle(self, request: web.Request) -> web.Response:
            Counting.concurrent += 1
            Counting.most = max(Counting.most, Counting.concurrent)
            try:
                await asyncio.sleep(0.001)
                return await super()._handle(request)
            finally:
                Counting.concurrent -= 1

    async with Counting() as fn:
        config = _source(pg_cluster, table, ordering="transaction")
        async with running_source(config, [FunctionTarget("fn", (f"{table}:insert",), fn.url("/fn"))]):
            async with connection(pg_cluster) as conn:
                for start in range(0, 100, 10):
                    await conn.execute(f"INSERT INTO {table} SELECT generate_series({start}, {start + 9})")
            await wait_for(lambda: len(fn.calls) == 100, 20, what="100 changes")
    assert [orjson.loads(c.body)["data"]["id"] for c in fn.calls] == list(range(100))
    assert Counting.most == 1


async def test_slot_lag_is_measured_and_logged_loudly_over_the_limit(
    pg_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    table = unique("lag")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with FunctionDouble() as fn:
        fn.script("/fn", [503])  # never succeeds: the slot cannot move
        config = _source(pg_cluster, table, max_slot_lag_bytes=1)
        async with running_source(config, [FunctionTarget("fn", (f"{table}:insert",), fn.url("/fn"))]) as h:
            await pg_cluster.execute(f"INSERT INTO {table} VALUES (1)")

            def lag() -> float:
                return h.sample("fastconn_postgres_slot_lag_bytes", source="postgres", slot=config["slot"])

            await wait_for(lambda: lag() > 1, 20, 0.1, "the slot's lag measured")
            await wait_for(
                lambda: "holds" in caplog.text and "max_slot_lag_bytes 1" in caplog.text,
                10,
                0.1,
                "the loud log",
            )
            assert h.sample("fastconn_postgres_oldest_pending_seconds", source="postgres") > 0


async def test_a_dropped_slot_is_a_clear_log_line_not_a_crash_loop(
    pg_cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    table = unique("gone")
    await pg_cluster.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    async with ChangeFunction() as fn:
        config = _source(pg_cluster, table)
        async with running_source(config, [FunctionTarget("fn", (f"{table}:insert",), fn.url("/fn"))]) as h:
            # An administrator drops the slot under the running source (its session releases it
            # between peeks; retry until the drop finds it idle).
            async def dropped() -> bool:
                try:
                    await pg_cluster.execute("SELECT pg_drop_replication_slot($1)", config["slot"])
                except asyncpg.ObjectInUseError:
                    return False
                return True

            await wait_for(dropped, 10, 0.01, "the slot dropped")
            # The drop itself may race a read ("is active for PID ..."), logged first; the missing
            # slot follows once the rate-limited log allows (5 s, reads back off 1 s, 2 s, 4 s).
            await wait_for(lambda: "does not exist" in caplog.text, 20, 0.05, "the missing slot logged")
            assert "cannot read slot" in caplog.text
            assert h.sample("fastconn_source_errors_total", source="postgres", kind="read") >= 1
            assert "Traceback" not in caplog.text
