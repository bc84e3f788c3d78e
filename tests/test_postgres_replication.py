"""The streaming replication client of the postgres source: its pure framing on arbitrary splits,
SCRAM against RFC 7677's example, and log-in against a real PostgreSQL 15 (trust, MD5,
SCRAM-SHA-256, a wrong password, a pg_hba.conf without a replication line)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from fastconn.errors import SourceError
from fastconn.sources.postgres.config import PostgresConfig
from fastconn.sources.postgres.replication import (
    Frames,
    Keepalive,
    ReplicationError,
    ReplicationStream,
    Scram,
    XLogData,
    copy_data,
    status_update,
)
from fastconn.sources.postgres.server import SESSION_SETTINGS, check_replication_login
from postgres_fixtures import Cluster, connection, own_pg_cluster, unique

__all__ = ["own_pg_cluster"]


def _frame(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _xlog(start: int, data: bytes) -> bytes:
    return _frame(b"d", b"w" + struct.pack("!QQq", start, start + 100, 0) + data)


def test_frames_come_out_whole_whatever_the_splits() -> None:
    keepalive = _frame(b"d", b"k" + struct.pack("!QqB", 7, 0, 1))
    stream = _xlog(1, b"B" * 30) + keepalive + _xlog(2, b"") + _frame(b"c", b"")
    whole = list(Frames().feed(stream))
    assert [kind for kind, _ in whole] == [ord("d"), ord("d"), ord("d"), ord("c")]
    for cut in range(len(stream) + 1):
        frames = Frames()
        assert list(frames.feed(stream[:cut])) + list(frames.feed(stream[cut:])) == whole
    frames = Frames()
    one_by_one = [frame for i in range(len(stream)) for frame in frames.feed(stream[i : i + 1])]
    assert one_by_one == whole


def test_a_frame_with_an_impossible_length_is_a_clear_error() -> None:
    with pytest.raises(ReplicationError, match="length 2"):
        list(Frames().feed(b"d" + struct.pack("!I", 2)))
    with pytest.raises(ReplicationError, match="length"):
        list(Frames().feed(b"d" + struct.pack("!I", 0xFFFFFFFF)))


def test_copy_data_decodes_wal_data_and_keepalives_and_refuses_the_rest() -> None:
    assert copy_data(b"w" + struct.pack("!QQq", 10, 20, 0) + b"payload") == XLogData(10, 20, b"payload")
    assert copy_data(b"k" + struct.pack("!QqB", 99, 0, 1)) == Keepalive(99, True)
    assert copy_data(b"k" + struct.pack("!QqB", 99, 0, 0)) == Keepalive(99, False)
    for garbage in (b"", b"w", b"w" + b"\x00" * 10, b"k\x00", b"x" * 40):
        with pytest.raises(ReplicationError):
            copy_data(garbage)


def test_a_status_update_reports_the_confirmed_position_as_flushed() -> None:
    message = status_update(0x16B3748, reply=True)
    assert message[:1] == b"d"
    (length,) = struct.unpack_from("!I", message, 1)
    assert length == len(message) - 1
    tag, write, flush, apply, _clock, reply = struct.unpack_from("!cQQQqB", message, 5)
    assert (tag, write, flush, apply, reply) == (b"r", 0x16B3748, 0x16B3748, 0x16B3748, 1)


def test_scram_matches_rfc_7677() -> None:
    scram = Scram("pencil", user="user", nonce="rOprNGfwEbeRWgbNEkqO")
    assert scram.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    final = scram.final(
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    scram.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ReplicationError, match="signature"):
        scram.verify(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(ReplicationError, match="nonce"):
        Scram("pencil", nonce="abc").final(b"r=xyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


async def _roles_with_passwords(cluster: Cluster) -> None:
    """scram_role and md5_role, each logging in with its own method, and refused_role refused.
    A logical replication connection matches pg_hba.conf's lines for its database (not the
    ``replication`` keyword, which is for physical replication). The lines go first: first match
    wins."""
    async with connection(cluster) as conn:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute("CREATE ROLE scram_role LOGIN REPLICATION PASSWORD 'scram secret'")
        await conn.execute("SET password_encryption = 'md5'")
        await conn.execute("CREATE ROLE md5_role LOGIN REPLICATION PASSWORD 'md5 secret'")
        await conn.execute("CREATE ROLE refused_role LOGIN REPLICATION")
        hba = cluster.data / "pg_hba.conf"
        lines = (
            "host postgres scram_role 127.0.0.1/32 scram-sha-256\n"
            "host postgres md5_role 127.0.0.1/32 md5\n"
            "host postgres refused_role 127.0.0.1/32 reject\n"
        )
        hba.write_text(lines + hba.read_text())
    # A restart, not pg_reload_conf(): a reload is asynchronous, the next log-in could still
    # meet the old rules.
    await asyncio.to_thread(cluster.restart)


def _dsn(cluster: Cluster, user: str, password: str | None = None) -> str:
    secret = f":{password.replace(' ', '%20')}" if password else ""
    return f"postgresql://{user}{secret}@127.0.0.1:{cluster.port}/postgres"


async def _stream_one_insert(cluster: Cluster, dsn: str) -> list[XLogData]:
    table, slot = unique("repl"), unique("slot")
    async with connection(cluster) as conn:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        await conn.execute(f"CREATE PUBLICATION {table} FOR TABLE {table}")
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
        stream = await ReplicationStream.open(dsn, SESSION_SETTINGS, timeout=10)
        try:
            await stream.start(slot, table)
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
            got: list[XLogData] = []
            while not any(item.data[:1] == b"C" for item in got):
                batch = await stream.read(100, 5.0)
                assert batch, "no change streamed within 5 s"
                got += batch
            await stream.confirm(got[-1].end)
        finally:
            await stream.close()
        confirmed = await cluster.confirmed(slot)
        assert confirmed is not None and confirmed >= got[-1].end
    return got


async def test_stream_logs_in_with_each_password_method(own_pg_cluster: Cluster) -> None:
    cluster = own_pg_cluster
    await _roles_with_passwords(cluster)
    for dsn in (
        cluster.dsn,  # trust
        _dsn(cluster, "scram_role", "scram secret"),
        _dsn(cluster, "md5_role", "md5 secret"),
    ):
        tags = [item.data[:1] for item in await _stream_one_insert(cluster, dsn)]
        assert tags == [b"B", b"R", b"I", b"C"], dsn


async def test_a_refused_replication_login_names_the_fix(own_pg_cluster: Cluster) -> None:
    cluster = own_pg_cluster
    await _roles_with_passwords(cluster)
    with pytest.raises(ReplicationError) as wrong:
        await ReplicationStream.open(_dsn(cluster, "scram_role", "not it"), SESSION_SETTINGS, timeout=10)
    assert wrong.value.sqlstate == "28P01"
    config: Any = PostgresConfig(name="pg", dsn=_dsn(cluster, "refused_role"))
    with pytest.raises(SourceError) as refused:
        await check_replication_login(config, config.dsn)
    text = str(refused.value)
    assert "refused_role" in text and "pg_hba.conf" in text and "Traceback" not in text
