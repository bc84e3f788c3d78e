"""fastconn._compat: each use of a library's private parts works with the installed release.
These fail when a library update renames or drops what fastconn relies on."""

from __future__ import annotations

import asyncio

from fastconn._compat import asyncpg_connect_params, nats_can_write_raw, nats_write_raw
from nats_fixtures import NatsServer, connected, nats_server, unique

__all__ = ["nats_server"]  # the fixture is used by name


async def test_nats_raw_write_delivers_each_publish(nats_server: NatsServer) -> None:
    subject = unique("compat.raw")
    async with connected(nats_server.url) as nc:
        assert nats_can_write_raw(nc)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: object) -> None:
            await got.put(msg.data)  # type: ignore[attr-defined]

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        blob = b"".join(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(p), p) for p in (b"a", b"", b"ccc"))
        await nats_write_raw(nc, blob)
        received = [await asyncio.wait_for(got.get(), 5) for _ in range(3)]
    assert received == [b"a", b"", b"ccc"]


def test_raw_write_needs_the_command_buffer() -> None:
    assert not nats_can_write_raw(object())


def test_asyncpg_connect_params_reads_the_dsn_as_asyncpg_does() -> None:
    addrs, params = asyncpg_connect_params("postgresql://alice:s%20cret@db.example:6543/app?sslmode=disable")
    assert addrs == [("db.example", 6543)]
    assert (params.user, params.password, params.database) == ("alice", "s cret", "app")
    assert not params.ssl
    assert params.sslmode.name == "disable"
    _, preferred = asyncpg_connect_params("postgresql://alice@db.example/app")
    assert preferred.ssl and preferred.sslmode.name == "prefer"
