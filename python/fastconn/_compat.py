"""The only places fastconn uses private parts of the libraries it builds on.

Each wrapper says why no public API does the job, and ``tests/test_compat.py`` fails as soon
as a library release renames or removes what it relies on (rather than a source silently
falling back, or breaking at run time).
"""

from __future__ import annotations

from typing import Any

__all__ = ["asyncpg_connect_params", "nats_can_write_raw", "nats_write_raw"]


# -- nats-py: one socket write for a batch of acknowledgements -------------------------------
#
# JetStream acks are payload-only publishes to per-message subjects. ``Client.publish`` costs a
# command build, a stats update and possibly a flush *per ack*; a settled batch of thousands
# of messages is instead written as one pre-built ``PUB`` blob through the client's command
# buffer, which (like ``publish``) also holds writes across a reconnect.


def nats_can_write_raw(client: Any) -> bool:
    """Whether ``client`` has the command buffer :func:`nats_write_raw` needs."""
    return callable(getattr(client, "_send_command", None)) and callable(
        getattr(client, "_flush_pending", None)
    )


async def nats_write_raw(client: Any, commands: bytes) -> None:
    """Queues raw protocol ``commands`` (complete ``PUB`` lines) and flushes them."""
    await client._send_command(commands)
    await client._flush_pending()


# -- asyncpg: connection parameters for a connection asyncpg cannot make ----------------------
#
# The postgres source streams its slot over the replication protocol, which asyncpg does not
# speak. That connection must reach the same server as the same role as the source's asyncpg
# connection: the same DSN forms, PG* variables, passfile and TLS modes. asyncpg's parser is
# the only implementation of exactly those rules at hand.


def asyncpg_connect_params(dsn: str | None) -> tuple[list[Any], Any]:
    """``(addresses, parameters)`` as asyncpg would connect with ``dsn``: addresses are
    ``(host, port)`` pairs or unix socket paths; parameters have ``user``, ``password``,
    ``database``, ``ssl`` (an SSL context or None) and ``sslmode``."""
    from asyncpg import connect_utils

    addrs, params = connect_utils._parse_connect_dsn_and_args(
        dsn=dsn,
        host=None,
        port=None,
        user=None,
        password=None,
        passfile=None,
        database=None,
        ssl=None,
        service=None,
        servicefile=None,
        direct_tls=None,
        server_settings=None,
        target_session_attrs=None,
        krbsrvname=None,
        gsslib=None,
    )
    return list(addrs), params
