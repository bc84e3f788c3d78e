"""Where a polling source keeps its resume point (vCenter's last event key, Pushbullet's
``modified_after``): one short string per source, read at start, written after progress.

Three stores, chosen with ``checkpoint = { type = ... }`` in the source's table:

* ``file`` (the default): a small local file, written atomically (a temporary file, fsynced,
  renamed over the old one, the folder fsynced), so a crash at any point leaves either the old
  or the new value, never a torn one. Right for one replica with a persistent volume.
* ``jetstream_kv``: one key in a JetStream key-value bucket (replicas and restarts on other
  machines see the same value).
* ``postgres``: one row in a table (``key`` primary key, ``value``, ``updated_at``), created
  when missing.

A checkpoint only moves forward in the source's own order: the source decides what "after"
means (an event key, a timestamp) and saves a value only once every message up to it is
settled, so a restart resumes after the last fully delivered point: nothing skipped, at most
the in-flight ones delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from fastconn.errors import SourceError
from fastconn.sources._nats_common import NatsConnectionConfig, connect, connection_health, key_value_bucket

__all__ = [
    "DEFAULT_STATE_DIR",
    "CheckpointConfig",
    "CheckpointStore",
    "FileCheckpointConfig",
    "JetStreamCheckpointConfig",
    "PostgresCheckpointConfig",
    "checkpoint_store",
]

log = logging.getLogger("fastconn.checkpoint")

DEFAULT_STATE_DIR: Final = ".fastconn-state"
"""Where ``file`` checkpoints go when no ``path`` is given (relative to the working directory;
env ``FASTCONN_STATE_DIR`` overrides it)."""

_SAFE_NAME: Final = re.compile(r"[^A-Za-z0-9_.-]")
_TABLE_NAME: Final = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$"


class FileCheckpointConfig(BaseModel):
    """``checkpoint = { type = "file", path = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["file"] = "file"
    path: str | None = None
    """The file; default ``$FASTCONN_STATE_DIR/<source>.checkpoint``."""


class JetStreamCheckpointConfig(NatsConnectionConfig):
    """``checkpoint = { type = "jetstream_kv", servers = [...], bucket = "..." }``."""

    type: Literal["jetstream_kv"]
    bucket: str = Field(default="fastconn-checkpoints", pattern=r"^[A-Za-z0-9_-]+$")
    create_bucket: bool = True


class PostgresCheckpointConfig(BaseModel):
    """``checkpoint = { type = "postgres", dsn = "...", table = "..." }``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["postgres"]
    dsn: str | None = None
    """libpq DSN; asyncpg's ``PG*`` environment variables fill in what is missing."""
    table: str = Field(default="fastconn_checkpoints", pattern=_TABLE_NAME)
    """``name`` or ``schema.name`` (plain identifiers: it is spliced into SQL)."""


def _kind(value: Any) -> str | None:
    """The ``type`` of a checkpoint table; ``file`` when it has none (the default store)."""
    if isinstance(value, dict):
        kind = value.get("type", "file")
        return kind if isinstance(kind, str) else None
    kind = getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


CheckpointConfig = Annotated[
    Annotated[FileCheckpointConfig, Tag("file")]
    | Annotated[JetStreamCheckpointConfig, Tag("jetstream_kv")]
    | Annotated[PostgresCheckpointConfig, Tag("postgres")],
    Discriminator(
        _kind,
        custom_error_type="checkpoint_type",
        custom_error_message="checkpoint.type must be one of: file (default), jetstream_kv, postgres",
    ),
]


class CheckpointStore(Protocol):
    async def open(self) -> None:
        """Connects (and creates the bucket/table when allowed). Raises :class:`SourceError`
        with the reason and the fix."""
        ...

    async def load(self) -> str | None:
        """The saved value, or None when nothing was saved yet."""
        ...

    async def save(self, value: str) -> None:
        """Stores ``value`` durably before returning (raises on failure: the caller keeps its
        old checkpoint and tries again later)."""
        ...

    async def close(self) -> None: ...


def checkpoint_store(config: CheckpointConfig | None, key: str) -> CheckpointStore:
    """The store for ``config`` (``None``: a file), holding the value under ``key`` (the
    source's name, or one the source derives from it)."""
    if config is None or isinstance(config, FileCheckpointConfig):
        path = config.path if config is not None and config.path else None
        if path is None:
            state_dir = os.environ.get("FASTCONN_STATE_DIR", DEFAULT_STATE_DIR)
            path = str(Path(state_dir) / f"{_SAFE_NAME.sub('_', key)}.checkpoint")
        return FileCheckpoint(Path(path))
    if isinstance(config, JetStreamCheckpointConfig):
        return JetStreamCheckpoint(config, key)
    return PostgresCheckpoint(config, key)


class FileCheckpoint:
    """A local file replaced atomically (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(
                f"checkpoint folder {str(self.path.parent)!r} cannot be created ({exc.strerror}): "
                "set checkpoint.path to a writable location"
            ) from None
        if not os.access(self.path.parent, os.W_OK):
            raise SourceError(
                f"checkpoint folder {str(self.path.parent)!r} is not writable: "
                "set checkpoint.path to a writable location"
            )

    async def load(self) -> str | None:
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(
                f"checkpoint file {str(self.path)!r} cannot be read ({exc}): fix or remove it "
                "(removing it restarts from the source's `begin` setting)"
            ) from None
        return text.strip() or None

    async def save(self, value: str) -> None:
        await asyncio.to_thread(self._write, value)

    def _write(self, value: str) -> None:
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    async def close(self) -> None:
        return None


class JetStreamCheckpoint:
    """One key of a JetStream key-value bucket."""

    def __init__(self, config: JetStreamCheckpointConfig, key: str) -> None:
        self.config = config
        self.key = _SAFE_NAME.sub("_", key)
        self._client: Any = None
        self._kv: Any = None

    async def open(self) -> None:

        name = f"{self.key}-checkpoint"

        async def on_error(exc: Exception) -> None:
            log.warning("checkpoint %s: NATS error: %r", name, exc)

        health = connection_health(self.config, name, log)
        self._client = await connect(self.config, name=name, log=log, error_cb=on_error, health=health)
        try:
            self._kv = await key_value_bucket(
                self._client,
                self.config.bucket,
                create=self.config.create_bucket,
                key_name="checkpoint.create_bucket",
            )
        except SourceError:
            await self.close()
            raise

    async def load(self) -> str | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(self.key)
        except KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        return value.decode() if value else None

    async def save(self, value: str) -> None:
        await self._kv.put(self.key, value.encode())

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


class PostgresCheckpoint:
    """One row of a table (see the module docstring)."""

    def __init__(self, config: PostgresCheckpointConfig, key: str) -> None:
        self.config = config
        self.key = key
        self._conn: Any = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._conn = await asyncpg.connect(self.config.dsn)
            await self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.config.table} "
                "(key text PRIMARY KEY, value text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
            )
        except (OSError, asyncpg.PostgresError) as exc:
            await self.close()
            raise SourceError(
                f"checkpoint table {self.config.table!r}: {type(exc).__name__}: {exc} "
                "(check checkpoint.dsn and that the user may create or write the table)"
            ) from None

    async def _connection(self) -> Any:
        """The connection, opened again when the server closed it (a restart): the next save
        after an outage simply works."""
        if self._conn is None or self._conn.is_closed():
            import asyncpg

            self._conn = await asyncpg.connect(self.config.dsn)
        return self._conn

    async def load(self) -> str | None:
        conn = await self._connection()
        query = f"SELECT value FROM {self.config.table} WHERE key = $1"
        value: str | None = await conn.fetchval(query, self.key)
        return value

    async def save(self, value: str) -> None:
        conn = await self._connection()
        await conn.execute(
            f"INSERT INTO {self.config.table} (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
            self.key,
            value,
        )

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
