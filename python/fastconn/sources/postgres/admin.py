"""``python -m fastconn postgres status|drop-slot|install-trigger``: look after a slot from the
command line (the slot keeps WAL on the server while nothing reads it), and install the trigger
the NOTIFY mode reads."""

from __future__ import annotations

import re
from typing import Any, Final

import asyncpg

from fastconn.errors import SourceError
from fastconn.sources.postgres import server
from fastconn.sources.postgres.config import PostgresConfig, read_dsn
from fastconn.sources.postgres.pgoutput import format_lsn

__all__ = ["NOTIFY_LIMIT", "drop_slot", "install_trigger", "status"]

NOTIFY_LIMIT: Final = 8000
"""PostgreSQL refuses NOTIFY payloads of 8,000 bytes or more (and would fail the writing
statement): the trigger sends a payload without ``data`` (``"truncated": true``) instead."""

_TABLE = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_$]{0,62}\.)?[A-Za-z_][A-Za-z0-9_$]{0,62}")


async def _connect(config: PostgresConfig) -> Any:
    return await server.connect(config, read_dsn(config), 10.0)


async def status(config: PostgresConfig) -> str:
    conn = await _connect(config)
    try:
        row = await conn.fetchrow(
            "SELECT active, (confirmed_flush_lsn - '0/0')::bigint AS confirmed, wal_status, "
            "(pg_current_wal_lsn() - confirmed_flush_lsn)::bigint AS lag FROM pg_replication_slots "
            "WHERE slot_name = $1",
            config.slot,
        )
        holder = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)",
            server.lock_key(config.slot),
        )
    finally:
        await conn.close()
    if row is None:
        return f"slot {config.slot}: does not exist"
    return (
        f"slot {config.slot}: confirmed {format_lsn(int(row['confirmed']))}, lag {int(row['lag'])} bytes, "
        f"wal_status {row['wal_status']}, {'read by a replica' if holder else 'no reader'}"
    )


async def drop_slot(config: PostgresConfig) -> str:
    conn = await _connect(config)
    try:
        await conn.execute("SELECT pg_drop_replication_slot($1)", config.slot)
    except asyncpg.UndefinedObjectError:
        return f"slot {config.slot}: does not exist"
    except asyncpg.ObjectInUseError as exc:
        raise SourceError(f"slot {config.slot} is in use ({exc}): stop fastconn first") from None
    finally:
        await conn.close()
    return f"slot {config.slot}: dropped (its WAL can be recycled; changes not read are gone)"


def trigger_sql(table: str) -> list[str]:
    """The statements installing the NOTIFY trigger on ``table``: channel ``<table>:<action>``,
    payload ``{schema, table, action, data}`` (the old row on delete)."""
    if not _TABLE.fullmatch(table):
        raise SourceError(f"expected table or schema.table (plain identifiers), got {table!r}")
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    function = f'"{schema}"."fastconn_notify_{name}"'
    prefix = name if schema == "public" else f"{schema}.{name}"
    return [
        f"""CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
  payload text;
  action text := lower(TG_OP);
BEGIN
  payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'action', action,
    'data', row_to_json(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END))::text;
  IF octet_length(payload) >= {NOTIFY_LIMIT} THEN
    payload := json_build_object('schema', TG_TABLE_SCHEMA, 'table', TG_TABLE_NAME, 'action', action,
      'truncated', true)::text;
  END IF;
  PERFORM pg_notify('{prefix}:' || action, payload);
  RETURN NULL;
END
$fn$""",
        f'DROP TRIGGER IF EXISTS fastconn_notify ON "{schema}"."{name}"',
        f'CREATE TRIGGER fastconn_notify AFTER INSERT OR UPDATE OR DELETE ON "{schema}"."{name}" '
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
    ]


async def install_trigger(config: PostgresConfig, table: str) -> str:
    statements = trigger_sql(table)
    conn = await _connect(config)
    try:
        async with conn.transaction():
            for sql in statements:
                await conn.execute(sql)
    except asyncpg.UndefinedTableError as exc:
        raise SourceError(f"cannot install the trigger: {exc}") from None
    finally:
        await conn.close()
    prefix = table if "." in table and not table.startswith("public.") else table.removeprefix("public.")
    return f"trigger fastconn_notify installed on {table}: channels {prefix}:insert, :update, :delete"
