"""``[[sources]] type = "postgres"``: the configuration model."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fastconn.durations import Duration
from fastconn.record_split import Decode
from fastconn.secret_files import secret_or_file
from fastconn.sources.postgres.changes import ACTIONS

__all__ = ["PostgresConfig", "read_dsn"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_TABLE = re.compile(rf"(?:{_IDENTIFIER.pattern}\.)?{_IDENTIFIER.pattern}")


def _split_list(value: object) -> object:
    """``"customer:insert, customer:update"`` (the OpenFaaS env form) as well as a list."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value


_List = Annotated[tuple[str, ...], BeforeValidator(_split_list)]
_PositiveDuration = Annotated[Duration, Field(gt=0)]


class PostgresConfig(BaseModel):
    """``[[sources]] type = "postgres"``: row changes (or NOTIFY payloads) to functions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["postgres"] = "postgres"
    name: Annotated[str, Field(min_length=1)] = "postgres"
    mode: Literal["wal", "notify"] = "wal"
    """``wal``: row changes from a logical replication slot (at least once). ``notify``:
    LISTEN on ``channels`` (at most once: NOTIFY is not stored)."""
    dsn: str | None = None
    """libpq connection string or URL (``postgresql://user:pass@host:5432/db``). Unset: asyncpg
    reads the ``PG*`` environment variables."""
    dsn_file: str | None = None
    """A file holding the DSN (a mounted secret)."""
    slot: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,63}$")] = "fastconn"
    """The logical replication slot (lower-case letters, digits, underscores)."""
    publication: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")] = "fastconn"
    create_slot: bool = True
    create_publication: bool = True
    """Create the publication when missing: ``FOR TABLE`` the ``tables``, or ``FOR ALL TABLES``
    (superuser) when ``tables`` is empty."""
    tables: _List = ()
    """``schema.table`` or ``table`` (schema ``public``)."""
    filters: _List = ()
    """Topics to deliver, ``table:action`` (``schema.table:action`` outside ``public``); empty:
    every change of the published tables. Other changes are confirmed without a call."""
    read: Literal["stream", "peek"] = "stream"
    """``stream``: the streaming replication protocol (each change decoded once on the server
    and pushed as it commits; needs a ``replication`` line in ``pg_hba.conf`` for the role).
    ``peek``: SQL peeks of the slot (no replication connection; every peek decodes again what is
    not confirmed yet, so it is slower and later)."""
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 4000
    """How many changes may be read and not yet confirmed before reading waits; with ``peek``
    also the rows asked for per peek (a transaction is never split, so a peek may return more)."""
    poll_interval: _PositiveDuration = 0.2
    """Wait between peeks when the last one found nothing new; with ``stream``, how long reading
    waits for data before it confirms and checks the slot's lag again."""
    ordering: Literal["key", "transaction", "none"] = "key"
    """``key``: changes to the same row (its primary key, else its replica identity) in commit
    order, other rows in parallel; ``transaction``: one change at a time in commit order;
    ``none``: everything in parallel."""
    dead_letter_table: str | None = None
    """A table (created when missing) for changes that failed for good; unset: retried forever."""
    max_slot_lag_bytes: Annotated[int, Field(ge=0)] = 1 << 30
    """Log loudly (every minute) while the slot holds back more WAL than this; 0 = never."""
    retry_backoff_initial: _PositiveDuration = 1.0
    retry_backoff_max: _PositiveDuration = 60.0
    standby_poll: _PositiveDuration = 1.0
    """How often a replica without the slot's lock tries to take it."""
    reconnect_max: _PositiveDuration = 5.0
    """Longest wait between reconnection attempts after the connection drops."""
    asynchronous_invocation: bool = False
    """Invoke functions through ``/async-function/``; a change counts as done (and the slot
    advances past it) only after its callbacks."""
    decode: Decode = "none"
    """``s3`` (with ``mode = "notify"``): every payload is an S3/MinIO bucket notification (a
    trigger on MinIO's PostgreSQL target table sending ``pg_notify`` of the event): each record
    is delivered on its own (see :mod:`fastconn.record_split`)."""
    startup_timeout: Duration = 30.0
    """How long start-up keeps trying to reach the server."""
    channels: _List = ()
    """``notify`` mode: the channels to LISTEN on (topic = channel name)."""

    @field_validator("tables", mode="after")
    @classmethod
    def _check_tables(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for table in value:
            if not _TABLE.fullmatch(table):
                raise ValueError(f"expected table or schema.table (plain identifiers), got {table!r}")
        return value

    @field_validator("filters", mode="after")
    @classmethod
    def _check_filters(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            table, sep, action = item.rpartition(":")
            if not sep or not _TABLE.fullmatch(table) or action not in ACTIONS:
                raise ValueError(
                    f"expected table:action with action one of {', '.join(ACTIONS)}, got {item!r}"
                )
        return value

    @field_validator("dead_letter_table")
    @classmethod
    def _check_dead_letter_table(cls, value: str | None) -> str | None:
        if value is not None and not _TABLE.fullmatch(value):
            raise ValueError(f"expected table or schema.table (plain identifiers), got {value!r}")
        return value

    @field_validator("retry_backoff_max")
    @classmethod
    def _backoff_ordered(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("retry_backoff_initial")
        if initial is not None and value < initial:
            raise ValueError(f"must be >= retry_backoff_initial ({initial:g}s)")
        return value

    @model_validator(mode="after")
    def _mode_keys(self) -> PostgresConfig:
        if self.dsn is not None and self.dsn_file is not None:
            raise ValueError("set dsn or dsn_file, not both")
        if self.mode == "notify" and not self.channels:
            raise ValueError("mode = 'notify' needs channels (the LISTEN channel names)")
        if self.mode == "wal" and self.channels:
            raise ValueError("channels is for mode = 'notify'; the WAL mode reads tables")
        if self.mode == "wal" and self.decode != "none":
            raise ValueError(
                "decode = 's3' is for mode = 'notify' (WAL changes are rows, not bucket notifications)"
            )
        return self

    @property
    def topic_filter(self) -> frozenset[str]:
        return frozenset(self.filters)


def read_dsn(config: PostgresConfig) -> str | None:
    """The DSN from ``dsn`` or ``dsn_file`` (None: asyncpg's ``PG*`` environment defaults)."""
    return secret_or_file(config.dsn, config.dsn_file, "dsn_file", f"postgres source {config.name!r}")
