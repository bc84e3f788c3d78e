"""Talking to the server outside the change stream: connecting, checking the set-up, creating the
publication, slot and dead-letter table, the slot's lock and lag. Each failure a user can fix
becomes a :class:`SourceError` naming the fix (the setting, the GRANT), never a traceback."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

import asyncpg

from fastconn.backoff import doubling
from fastconn.errors import SourceError
from fastconn.redact import redact_text
from fastconn.sources.postgres.config import PostgresConfig
from fastconn.sources.postgres.replication import ReplicationError, ReplicationStream

__all__ = [
    "CONNECTION_ERRORS",
    "PEEK",
    "SESSION_SETTINGS",
    "check_replication_login",
    "connect",
    "ensure_dead_letter_table",
    "ensure_publication",
    "ensure_slot",
    "lock_key",
    "qualified",
    "slot_lag",
]

log = logging.getLogger("fastconn.source.postgres")

SESSION_SETTINGS: Final = {
    # pgoutput formats values in the decoding session's settings: pin the ones values.py reads.
    "DateStyle": "ISO, YMD",
    "TimeZone": "UTC",
    "bytea_output": "hex",
    "extra_float_digits": "3",
    "IntervalStyle": "iso_8601",
    "application_name": "fastconn",
}

PEEK: Final = (
    "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes"
    "($1, NULL, $2, 'proto_version', '1', 'publication_names', $3)"
)

CONNECTION_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # What asyncpg raises on a connection the server shut down while it was idle ("cannot switch
    # to state ...; another operation is in progress"): the connection is unusable, reconnect.
    asyncpg.InternalClientError,
)
"""The server went away or is not there yet: reconnect (anything else is a real error)."""

_CONNECT_RETRY_INITIAL: Final = 0.2


def qualified(table: str) -> str:
    """``customer`` → ``public.customer`` (quoted for SQL: ``"public"."customer"``)."""
    schema, _, name = table.rpartition(".")
    return f'"{schema or "public"}"."{name}"'


def lock_key(slot: str) -> str:
    """Text hashed into the advisory lock every replica reading ``slot`` takes."""
    return f"fastconn slot {slot}"


async def connect(config: PostgresConfig, dsn: str | None, timeout: float) -> Any:
    """A connection, retried on network errors until ``timeout``; a refused login or a missing
    database is final at once (retrying cannot fix it)."""
    deadline = time.monotonic() + timeout
    attempt = 0
    where = redact_text(dsn) if dsn else "the PG* environment defaults"
    while True:
        attempt += 1
        try:
            return await asyncpg.connect(dsn, server_settings=SESSION_SETTINGS, timeout=10)
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise SourceError(f"postgres source {config.name!r}: login refused by {where}: {exc}") from None
        except asyncpg.InvalidCatalogNameError as exc:
            raise SourceError(f"postgres source {config.name!r}: {exc} (check the database in dsn)") from None
        except CONNECTION_ERRORS as exc:
            delay = doubling(attempt, _CONNECT_RETRY_INITIAL, config.reconnect_max)
            if time.monotonic() + delay > deadline:
                raise SourceError(
                    f"postgres source {config.name!r}: cannot connect to {where}: {exc or type(exc).__name__}"
                ) from None
            log.warning(
                "postgres source %r cannot connect yet (%s); retrying in %.1fs", config.name, exc, delay
            )
            await asyncio.sleep(delay)
        except ValueError as exc:  # asyncpg's DSN parser
            raise SourceError(
                f"postgres source {config.name!r}: invalid dsn: {redact_text(str(exc))}"
            ) from None


async def check_server(conn: Any, config: PostgresConfig) -> None:
    """``wal_level``, the tables, what the role may do."""
    level = await conn.fetchval("SHOW wal_level")
    if level != "logical":
        raise SourceError(
            f"postgres source {config.name!r}: the server runs with wal_level = {level}; logical decoding "
            "needs wal_level = logical (set it in postgresql.conf or ALTER SYSTEM SET wal_level = logical, "
            "then restart the server)"
        )
    for table in config.tables:
        if await conn.fetchval("SELECT to_regclass($1)", qualified(table)) is None:
            raise SourceError(f"postgres source {config.name!r}: table {table!r} (in tables) does not exist")
    allowed = await conn.fetchval(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    if not allowed:
        user = await conn.fetchval("SELECT current_user")
        raise SourceError(
            f"postgres source {config.name!r}: role {user!r} may not use replication slots; "
            f'grant it with: ALTER ROLE "{user}" REPLICATION'
        )


async def ensure_publication(conn: Any, config: PostgresConfig) -> None:
    exists = await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", config.publication)
    if exists:
        return
    if not config.create_publication:
        raise SourceError(
            f"postgres source {config.name!r}: publication {config.publication!r} does not exist "
            "(create it, or set create_publication = true)"
        )
    target = "ALL TABLES" if not config.tables else "TABLE " + ", ".join(qualified(t) for t in config.tables)
    try:
        await conn.execute(f'CREATE PUBLICATION "{config.publication}" FOR {target}')
    except asyncpg.DuplicateObjectError:
        return  # another replica created it meanwhile
    except asyncpg.InsufficientPrivilegeError as exc:
        need = (
            "superuser (FOR ALL TABLES): list the tables in tables instead"
            if not config.tables
            else "ownership of each table and CREATE on the database"
        )
        raise SourceError(
            f"postgres source {config.name!r}: cannot create publication {config.publication!r}: {exc}; "
            f"it needs {need}, or create it as an administrator and set create_publication = false"
        ) from None
    log.info("postgres source %r created publication %s FOR %s", config.name, config.publication, target)


async def ensure_slot(conn: Any, config: PostgresConfig) -> None:
    row = await conn.fetchrow(
        "SELECT plugin, slot_type, database = current_database() AS here FROM pg_replication_slots "
        "WHERE slot_name = $1",
        config.slot,
    )
    if row is not None:
        if row["slot_type"] != "logical" or row["plugin"] != "pgoutput" or not row["here"]:
            raise SourceError(
                f"postgres source {config.name!r}: slot {config.slot!r} exists but is not a pgoutput logical "
                "slot of this database: choose another slot name"
            )
        return
    if not config.create_slot:
        raise SourceError(
            f"postgres source {config.name!r}: replication slot {config.slot!r} does not exist "
            f"(create it with SELECT pg_create_logical_replication_slot('{config.slot}', 'pgoutput'), "
            "or set create_slot = true)"
        )
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", config.slot)
    except asyncpg.DuplicateObjectError:
        return
    except asyncpg.ObjectNotInPrerequisiteStateError as exc:
        raise SourceError(
            f"postgres source {config.name!r}: cannot create slot {config.slot!r}: {exc}"
        ) from None
    except asyncpg.ConfigurationLimitExceededError as exc:
        raise SourceError(
            f"postgres source {config.name!r}: cannot create slot {config.slot!r}: {exc} "
            "(raise max_replication_slots, or drop an unused slot)"
        ) from None
    log.info("postgres source %r created replication slot %s (pgoutput)", config.name, config.slot)


async def ensure_dead_letter_table(conn: Any, table: str) -> None:
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {qualified(table)} ("
        " id bigserial PRIMARY KEY,"
        " change_id text NOT NULL,"
        " lsn pg_lsn,"
        " topic text NOT NULL,"
        " function text,"
        " status int,"
        " attempts int,"
        " error text,"
        " response text,"
        " deliveries int,"
        " change jsonb NOT NULL,"
        " context jsonb,"
        " failed_at timestamptz NOT NULL DEFAULT now())"
    )


async def slot_lag(conn: Any, slot: str) -> int | None:
    """Bytes of WAL the slot holds back from the current position (None: no such slot)."""
    value = await conn.fetchval(
        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
        "WHERE slot_name = $1",
        slot,
    )
    return None if value is None else int(value)


async def check_replication_login(config: PostgresConfig, dsn: str | None) -> None:
    """``read = "stream"`` opens a replication connection next to the ordinary one. pg_hba.conf
    treats it like an ordinary connection to its database (the ``replication`` keyword is for
    physical replication only), and the role's REPLICATION attribute is checked already; what
    else can refuse it (``max_wal_senders`` taken) is a set-up error naming the fixes."""
    try:
        stream = await ReplicationStream.open(dsn, SESSION_SETTINGS, timeout=10)
    except ReplicationError as exc:
        raise SourceError(
            f"postgres source {config.name!r}: the server refuses the replication connection: {exc} "
            f"(SQLSTATE {exc.sqlstate or '-'}); check that the role may log in (pg_hba.conf) and that "
            'max_wal_senders leaves a sender free, or set read = "peek" to read the slot over SQL '
            "(slower)"
        ) from None
    except (TimeoutError, OSError) as exc:
        raise SourceError(
            f"postgres source {config.name!r}: cannot open a replication connection: "
            f"{exc or type(exc).__name__}"
        ) from None
    await stream.close()
