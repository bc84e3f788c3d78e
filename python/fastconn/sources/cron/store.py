"""Where replicas agree which of them fires a slot, and where the last fired slot is kept.

:class:`LocalStore` is one process's memory: right for a single replica, and it forgets
everything on restart (so no catch-up). :class:`JetStreamKVStore` keeps one key per function in
a JetStream key-value bucket whose value is the last claimed slot. Claiming slot ``s`` is a
compare-and-set of that key from a smaller slot to ``s`` (``create`` for the first slot ever):
the server accepts exactly one of two concurrent writers, so exactly one replica starts each
slot. One key per function, not one per slot: a bucket of per-slot keys grows by the number of
fires (86 million a day for 1,000 per-second schedules) and per-key TTLs need nats-server 2.11.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Final, Protocol

from fastconn.errors import SourceError
from fastconn.health import ConnectionHealth
from fastconn.sources._nats_common import connect, connection_health

if TYPE_CHECKING:
    from fastconn.sources.cron.config import JetStreamKVStoreConfig

__all__ = ["JetStreamKVStore", "LocalStore", "SlotStore", "store_key"]

log = logging.getLogger("fastconn.source.cron")

# Key characters nats-py accepts; anything else in a function name is escaped as =XX.
_KEY_SAFE: Final = re.compile(r"[^A-Za-z0-9_\-/.]")


def store_key(function: str) -> str:
    """The bucket key of ``function``: its name, other characters escaped (``=`` + hex)."""
    return _KEY_SAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), function)


class SlotStore(Protocol):
    async def open(self, source: str) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, function: str, slot: float) -> bool:
        """True for exactly one caller per ``(function, slot)``, and never for a slot at or
        before one already claimed."""
        ...

    async def last_fired(self, function: str) -> float | None:
        """The newest slot claimed for ``function``, or None when unknown."""
        ...


class LocalStore:
    """One replica, in memory: nothing survives a restart."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    async def open(self, source: str) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(self, function: str, slot: float) -> bool:
        if self._last.get(function, float("-inf")) >= slot:
            return False
        self._last[function] = slot
        return True

    async def last_fired(self, function: str) -> float | None:
        return self._last.get(function)


class JetStreamKVStore:
    """Claims through compare-and-set on a JetStream key-value bucket (see the module docstring)."""

    def __init__(self, config: JetStreamKVStoreConfig) -> None:
        self.config = config
        self._client: Any = None
        self._kv: Any = None
        self.health: ConnectionHealth | None = None

    async def open(self, source: str) -> None:
        from nats.js.errors import BucketNotFoundError

        name = f"{source}-store"
        self.health = connection_health(self.config, name, log)

        async def on_error(exc: Exception) -> None:
            log.warning("source %s: NATS error: %r", name, exc)

        self._client = await connect(self.config, name=name, log=log, error_cb=on_error, health=self.health)
        js = self._client.jetstream()
        try:
            self._kv = await js.key_value(self.config.bucket)
        except BucketNotFoundError:
            if not self.config.create_bucket:
                await self.close()
                raise SourceError(
                    f"source {source!r}: store bucket {self.config.bucket!r} does not exist; "
                    "create it or set store.create_bucket = true"
                ) from None
            self._kv = await js.create_key_value(bucket=self.config.bucket, history=1)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def claim(self, function: str, slot: float) -> bool:
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        key, value = store_key(function), str(int(slot)).encode()
        while True:
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:  # also a deleted key
                try:
                    await self._kv.create(key, value)
                except KeyWrongLastSequenceError:
                    continue  # another replica created it first: compare with its slot
                return True
            if _slot(entry.value) >= slot:
                return False
            try:
                await self._kv.update(key, value, last=entry.revision)
            except KeyWrongLastSequenceError:
                continue  # another replica moved it meanwhile: compare again
            return True

    async def last_fired(self, function: str) -> float | None:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(store_key(function))
        except KeyNotFoundError:
            return None
        return float(_slot(entry.value))


def _slot(value: bytes | None) -> int:
    """A stored slot; anything unreadable counts as "long ago" (a claim then overwrites it)."""
    try:
        return int(value or b"")
    except ValueError:
        return -1
