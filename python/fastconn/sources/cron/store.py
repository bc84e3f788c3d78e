"""Where replicas agree which of them fires a slot, and where the last fired slot is kept.

:class:`LocalStore` is one process's memory: right for a single replica, and it forgets
everything on restart (so no catch-up, no take-over). :class:`JetStreamKVStore` keeps one key per
function in a JetStream key-value bucket. Its value (:class:`SlotRecord`) is the last claimed
slot plus the **pending** claims: slots claimed but not yet done, each with a lease (an expiry
time and the claiming replica). A fire is claim → call → done:

- **claim** slot ``s``: a compare-and-set of the key moving ``last`` to ``s`` and adding ``s`` to
  the pending claims (``create`` for the first slot ever). The server accepts exactly one of two
  concurrent writers, so exactly one replica starts each slot.
- while the call runs, its replica **renews** the lease (every third of it);
- **done** (the call settled): the slot leaves the pending claims — in the same write as the
  function's next claim when that comes within two seconds (a per-second schedule then costs one
  write per fire, not two), else on its own.
- a pending claim whose lease **expired** belongs to a replica that died between claim and done
  (kill -9 included): the next replica that reads the key (its own claim of a later slot, or the
  periodic sweep) takes it over with a compare-and-set — one taker — and fires it, once.

So no slot is lost to a crash (at least once per slot), and two live replicas fire each slot
exactly once. One key per function, not one per slot: a bucket of per-slot keys grows by the
number of fires (86 million a day for 1,000 per-second schedules) and per-key TTLs need
nats-server 2.11. Every read-modify-write of a key runs under a per-key lock in this process and
starts from the revision this process wrote last, so an uncontended claim or done is one round
trip.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from fastconn.errors import SourceError
from fastconn.health import ConnectionHealth
from fastconn.sources._nats_common import connect, connection_health, key_value_bucket

if TYPE_CHECKING:
    from fastconn.sources.cron.config import JetStreamKVStoreConfig

__all__ = ["Claimed", "JetStreamKVStore", "LocalStore", "SlotRecord", "SlotStore", "store_key"]

log = logging.getLogger("fastconn.source.cron")

# Key characters nats-py accepts; anything else in a function name is escaped as =XX.
_KEY_SAFE: Final = re.compile(r"[^A-Za-z0-9_\-/.]")

T = TypeVar("T")


def store_key(function: str) -> str:
    """The bucket key of ``function``: its name, other characters escaped (``=`` + hex)."""
    return _KEY_SAFE.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), function)


@dataclass(frozen=True, slots=True)
class Claimed:
    """The answer to a claim: whether this replica won the slot, and the slots of dead
    replicas' expired claims on the same key it took over (to fire now)."""

    won: bool
    taken_over: tuple[float, ...] = ()


@dataclass(slots=True)
class SlotRecord:
    """One function's key: ``last`` claimed slot and ``pending`` claims
    (slot → (lease expiry, owner))."""

    last: int = -1
    pending: dict[int, tuple[float, str]] = field(default_factory=dict)

    def encode(self) -> bytes:
        pending = {str(slot): [round(expiry, 3), owner] for slot, (expiry, owner) in self.pending.items()}
        return json.dumps({"last": self.last, "pending": pending}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes | None) -> SlotRecord:
        """A stored record; a bare integer is the last slot (the format before leases); anything
        unreadable counts as "long ago, nothing pending" (a claim then overwrites it)."""
        text = (value or b"").strip()
        try:
            if text[:1] != b"{":
                return cls(int(text))
            data = json.loads(text)
            pending = {int(slot): (float(lease[0]), str(lease[1])) for slot, lease in data["pending"].items()}
            return cls(int(data["last"]), pending)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return cls()

    def copy(self) -> SlotRecord:
        return SlotRecord(self.last, dict(self.pending))

    def take_expired(self, now: float, lease: float, owner: str) -> tuple[float, ...]:
        """Re-leases every expired claim to ``owner``; returns their slots."""
        expired = sorted(slot for slot, (expiry, _) in self.pending.items() if expiry <= now)
        for slot in expired:
            self.pending[slot] = (now + lease, owner)
        return tuple(float(slot) for slot in expired)


class SlotStore(Protocol):
    durable: bool
    """Claims outlive this process: take-over, leases and done markers apply."""

    async def open(self, source: str) -> None: ...

    async def close(self) -> None: ...

    async def claim(self, function: str, slot: float, now: float, done: tuple[float, ...] = ()) -> Claimed:
        """Won for exactly one caller per ``(function, slot)``, and never for a slot at or
        before one already claimed; also takes over the key's expired claims, and marks the
        earlier fires ``done`` in the same write."""
        ...

    async def done(self, function: str, slots: tuple[float, ...]) -> None:
        """The fires of ``slots`` settled: their claims are no longer pending."""
        ...

    async def renew(self, function: str, slots: tuple[float, ...], now: float) -> tuple[float, ...]:
        """Extends this replica's leases of ``slots``; returns those it no longer holds."""
        ...

    async def take_over(self, function: str, now: float) -> tuple[float, ...]:
        """Takes over the function's expired claims; returns their slots (to fire)."""
        ...

    async def last_fired(self, function: str) -> float | None:
        """The newest slot claimed for ``function``, or None when unknown."""
        ...


class LocalStore:
    """One replica, in memory: nothing survives a restart, so there is nothing to take over."""

    durable = False

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    async def open(self, source: str) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(
        self, function: str, slot: float, now: float = 0.0, done: tuple[float, ...] = ()
    ) -> Claimed:
        if self._last.get(function, float("-inf")) >= slot:
            return Claimed(False)
        self._last[function] = slot
        return Claimed(True)

    async def done(self, function: str, slots: tuple[float, ...]) -> None:
        return None

    async def renew(self, function: str, slots: tuple[float, ...], now: float) -> tuple[float, ...]:
        return ()

    async def take_over(self, function: str, now: float) -> tuple[float, ...]:
        return ()

    async def last_fired(self, function: str) -> float | None:
        return self._last.get(function)


class JetStreamKVStore:
    """Leased claims in a JetStream key-value bucket (see the module docstring)."""

    durable = True

    def __init__(self, config: JetStreamKVStoreConfig, *, owner: str | None = None) -> None:
        self.config = config
        self.lease = config.lease
        self.owner = owner or secrets.token_hex(6)
        """This replica in the pending claims (a fresh one per process)."""
        self._client: Any = None
        self._kv: Any = None
        self._known: dict[str, tuple[int, SlotRecord]] = {}
        """Per key, the revision and record this process wrote or read last."""
        self._locks: dict[str, asyncio.Lock] = {}
        self.health: ConnectionHealth | None = None

    async def open(self, source: str) -> None:

        name = f"{source}-store"
        self.health = connection_health(self.config, name, log)

        async def on_error(exc: Exception) -> None:
            log.warning("source %s: NATS error: %r", name, exc)

        self._client = await connect(self.config, name=name, log=log, error_cb=on_error, health=self.health)
        try:
            self._kv = await key_value_bucket(
                self._client,
                self.config.bucket,
                create=self.config.create_bucket,
                key_name="store.create_bucket",
            )
        except SourceError as exc:
            await self.close()
            raise SourceError(f"source {source!r}: {exc}") from None

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def claim(self, function: str, slot: float, now: float, done: tuple[float, ...] = ()) -> Claimed:
        wanted = int(slot)

        def change(record: SlotRecord) -> Claimed:
            for finished in done:
                record.pending.pop(int(finished), None)
            taken = record.take_expired(now, self.lease, self.owner)
            if record.last >= wanted:
                return Claimed(False, taken)
            record.last = wanted
            record.pending[wanted] = (now + self.lease, self.owner)
            return Claimed(True, taken)

        return await self._modify(function, change, changed=lambda c: c.won or bool(c.taken_over))

    async def done(self, function: str, slots: tuple[float, ...]) -> None:
        def change(record: SlotRecord) -> bool:
            return sum(record.pending.pop(int(slot), None) is not None for slot in slots) > 0

        await self._modify(function, change, changed=bool)

    async def renew(self, function: str, slots: tuple[float, ...], now: float) -> tuple[float, ...]:
        def change(record: SlotRecord) -> tuple[float, ...]:
            lost: list[float] = []
            for slot in slots:
                lease = record.pending.get(int(slot))
                if lease is None or lease[1] != self.owner:
                    lost.append(slot)
                else:
                    record.pending[int(slot)] = (now + self.lease, self.owner)
            return tuple(lost)

        return await self._modify(function, change, changed=lambda lost: len(lost) < len(slots))

    async def take_over(self, function: str, now: float) -> tuple[float, ...]:
        def change(record: SlotRecord) -> tuple[float, ...]:
            return record.take_expired(now, self.lease, self.owner)

        return await self._modify(function, change, changed=bool, fresh=True)

    async def last_fired(self, function: str) -> float | None:
        revision, record = await self._read(store_key(function))
        return None if revision is None else float(record.last)

    async def record(self, function: str) -> SlotRecord | None:
        """The stored record of ``function`` as the server has it now (None: no key)."""
        revision, record = await self._read(store_key(function))
        return None if revision is None else record

    async def _modify(
        self,
        function: str,
        change: Callable[[SlotRecord], T],
        *,
        changed: Callable[[T], bool],
        fresh: bool = False,
    ) -> T:
        """Applies ``change`` to the key's record with compare-and-set; writes only when
        ``changed(result)``. Starts from the revision known here (one round trip when no other
        replica wrote since); a conflict re-reads and applies ``change`` again."""
        from nats.js.errors import KeyWrongLastSequenceError

        key = store_key(function)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            known = None if fresh else self._known.get(key)
            while True:
                revision, stored = known if known is not None else await self._read(key)
                record = stored.copy()
                result = change(record)
                if not changed(result):
                    if known is not None and not _final(result):
                        known = None  # decided on what this process knew: check the server
                        continue
                    return result
                try:
                    if revision is None:
                        revision = await self._kv.create(key, record.encode())
                    else:
                        revision = await self._kv.update(key, record.encode(), last=revision)
                except KeyWrongLastSequenceError:
                    known = None  # another replica wrote meanwhile: read and decide again
                    continue
                self._known[key] = (revision, record)
                return result

    async def _read(self, key: str) -> tuple[int | None, SlotRecord]:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:  # also a deleted key
            self._known.pop(key, None)
            return None, SlotRecord()
        record = SlotRecord.decode(entry.value)
        self._known[key] = (entry.revision, record)
        return entry.revision, record


def _final(result: object) -> bool:
    """A no-write decision that a newer revision cannot change: a lost claim (``last`` only
    grows, so a slot at or before a known ``last`` stays lost)."""
    return isinstance(result, Claimed)
