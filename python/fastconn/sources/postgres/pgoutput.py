"""A decoder for PostgreSQL's ``pgoutput`` logical replication messages, protocol version 1.

Pure: bytes in, dataclasses out, no I/O. Every message the server sends through
``pg_logical_slot_peek_binary_changes`` is one ``bytea`` row; :func:`decode` turns one row into
one message. Malformed input (a truncated row, an unknown message type or tuple kind) raises
:class:`PgOutputError` naming what is wrong and where, never an ``IndexError`` or
``struct.error``: the bytes come from a server, and a decoding bug must read as one.

Layouts: PostgreSQL docs "Logical Replication Message Formats" and ``proto.c``. Integers are
big-endian; strings are NUL-terminated in the server encoding (UTF-8 assumed, invalid bytes
replaced); timestamps are microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PG_EPOCH",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Origin",
    "PgOutputError",
    "PgOutputMessage",
    "Relation",
    "Truncate",
    "TupleValue",
    "Type",
    "Unchanged",
    "Update",
    "decode",
    "format_lsn",
    "parse_lsn",
    "timestamp",
]

PG_EPOCH: Final = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


class PgOutputError(ValueError):
    """A pgoutput message that cannot be decoded (truncated, unknown type, bad tuple kind)."""


class Unchanged:
    """An unchanged TOASTed value (tuple kind ``u``): the server did not send it. Distinct from
    NULL (``None``): the column has a value, it just is not in this message."""

    _instance: Unchanged | None = None

    def __new__(cls) -> Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

TupleValue = bytes | None | Unchanged
"""One column of TupleData: the text (or binary) bytes, ``None`` for NULL, or
:data:`UNCHANGED`."""


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    """The LSN of the transaction's commit record (its identity in the log)."""
    commit_time: datetime.datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    """Where the transaction ends: the position to confirm once it is processed."""
    commit_time: datetime.datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    key: bool
    """Part of the replica identity (flag bit 1)."""


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    """``pg_catalog`` when the server sent an empty namespace."""
    name: str
    replica_identity: str
    """``d`` default, ``n`` nothing, ``f`` full, ``i`` index."""
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    oid: int
    schema: str
    name: str


# Insert, Update and Delete are not frozen: one is built per change, and a frozen dataclass's
# __init__ sets each field through object.__setattr__ (several times slower). Nothing mutates them.
@dataclass(slots=True)
class Insert:
    relation_oid: int
    new: tuple[TupleValue, ...]


@dataclass(slots=True)
class Update:
    relation_oid: int
    old: tuple[TupleValue, ...] | None
    """The old key (``old_is_key``) or the whole old row (REPLICA IDENTITY FULL), when sent."""
    old_is_key: bool
    new: tuple[TupleValue, ...]


@dataclass(slots=True)
class Delete:
    relation_oid: int
    old: tuple[TupleValue, ...]
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


PgOutputMessage = Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate


def timestamp(micros: int) -> datetime.datetime:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    try:
        return PG_EPOCH + datetime.timedelta(microseconds=micros)
    except OverflowError:
        raise PgOutputError(f"timestamp {micros} (microseconds since 2000-01-01) is out of range") from None


def parse_lsn(text: str) -> int:
    """``16/B374D848`` → int. Raises ValueError on anything else."""
    hi, sep, lo = text.partition("/")
    if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
        raise ValueError(f"not an LSN (expected X/Y in hex): {text!r}")
    try:
        return (int(hi, 16) << 32) | int(lo, 16)
    except ValueError:
        raise ValueError(f"not an LSN (expected X/Y in hex): {text!r}") from None


def format_lsn(lsn: int) -> str:
    """int → ``16/B374D848`` (PostgreSQL's text form, what ``pg_lsn`` parses)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


_I16: Final = struct.Struct("!h").unpack_from
_I32: Final = struct.Struct("!i").unpack_from
_U32: Final = struct.Struct("!I").unpack_from


class _Reader:
    """A cursor over one message that raises :class:`PgOutputError` when it runs short."""

    __slots__ = ("_data", "_kind", "_pos")

    def __init__(self, data: bytes, kind: str) -> None:
        self._data = data
        self._pos = 1
        self._kind = kind

    def _take(self, n: int, what: str) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise PgOutputError(
                f"{self._kind} message truncated reading {what} at byte {self._pos} "
                f"(needs {n}, {len(self._data) - self._pos} left)"
            )
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def i16(self, what: str) -> int:
        value: int = struct.unpack("!h", self._take(2, what))[0]
        return value

    def i32(self, what: str) -> int:
        value: int = struct.unpack("!i", self._take(4, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = struct.unpack("!I", self._take(4, what))[0]
        return value

    def i64(self, what: str) -> int:
        value: int = struct.unpack("!q", self._take(8, what))[0]
        return value

    def u64(self, what: str) -> int:
        value: int = struct.unpack("!Q", self._take(8, what))[0]
        return value

    def string(self, what: str) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise PgOutputError(f"{self._kind} message: {what} at byte {self._pos} has no terminating NUL")
        text = self._data[self._pos : end].decode("utf-8", "replace")
        self._pos = end + 1
        return text

    def tuple_data(self, what: str) -> tuple[TupleValue, ...]:
        """TupleData. Every change carries one or two, so well-formed ones are read in one tight
        loop; anything odd (short, negative, unknown kind) is read again by
        :meth:`_checked_tuple_data`, which names what is wrong."""
        data = self._data
        size = len(data)
        pos = self._pos
        count = _I16(data, pos)[0] if pos + 2 <= size else -1
        if count >= 0:
            pos += 2
            values: list[TupleValue] = []
            append = values.append
            for _ in range(count):
                if pos >= size:
                    break
                kind = data[pos]
                pos += 1
                if kind in (116, 98):  # t, b
                    if pos + 4 > size:
                        break
                    (length,) = _I32(data, pos)
                    end = pos + 4 + length
                    if length < 0 or end > size:
                        break
                    append(data[pos + 4 : end])
                    pos = end
                elif kind == 110:  # n
                    append(None)
                elif kind == 117:  # u
                    append(UNCHANGED)
                else:
                    break
            else:
                self._pos = pos
                return tuple(values)
        return self._checked_tuple_data(what)

    def _checked_tuple_data(self, what: str) -> tuple[TupleValue, ...]:
        count = self.i16(f"{what} column count")
        if count < 0:
            raise PgOutputError(f"{self._kind} message: negative column count {count} in {what}")
        values: list[TupleValue] = []
        for i in range(count):
            kind = self._take(1, f"{what} column {i} kind")
            if kind == b"n":
                values.append(None)
            elif kind == b"u":
                values.append(UNCHANGED)
            elif kind in (b"t", b"b"):
                length = self.i32(f"{what} column {i} length")
                if length < 0:
                    raise PgOutputError(
                        f"{self._kind} message: negative length {length} in {what} column {i}"
                    )
                values.append(self._take(length, f"{what} column {i} value"))
            else:
                raise PgOutputError(
                    f"{self._kind} message: unknown tuple kind {kind!r} in {what} column {i} "
                    "(expected n, u, t or b)"
                )
        return tuple(values)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise PgOutputError(
                f"{self._kind} message has {len(self._data) - self._pos} unexpected trailing byte(s)"
            )


def decode(data: bytes) -> PgOutputMessage:
    """One pgoutput message (one row of ``pg_logical_slot_peek_binary_changes``)."""
    if not data:
        raise PgOutputError("empty pgoutput message")
    tag = data[:1]
    decoder = _DECODERS.get(tag)
    if decoder is None:
        raise PgOutputError(
            f"unknown pgoutput message type {tag!r} (protocol version 1 sends B, C, O, R, Y, I, U, D, T)"
        )
    reader = _Reader(bytes(data), _NAMES[tag])
    message = decoder(reader)
    reader.end()
    return message


def _begin(r: _Reader) -> Begin:
    final_lsn = r.u64("final LSN")
    micros = r.i64("commit timestamp")
    xid = r.u32("xid")
    return Begin(final_lsn, timestamp(micros), xid)


def _commit(r: _Reader) -> Commit:
    flags = r.u8("flags")
    commit_lsn = r.u64("commit LSN")
    end_lsn = r.u64("end LSN")
    micros = r.i64("commit timestamp")
    return Commit(flags, commit_lsn, end_lsn, timestamp(micros))


def _origin(r: _Reader) -> Origin:
    return Origin(r.u64("origin commit LSN"), r.string("origin name"))


def _relation(r: _Reader) -> Relation:
    oid = r.u32("relation OID")
    schema = r.string("namespace") or "pg_catalog"
    name = r.string("relation name")
    identity = chr(r.u8("replica identity"))
    count = r.i16("column count")
    if count < 0:
        raise PgOutputError(f"Relation message: negative column count {count}")
    columns = []
    for i in range(count):
        flags = r.u8(f"column {i} flags")
        column_name = r.string(f"column {i} name")
        type_oid = r.u32(f"column {i} type OID")
        modifier = r.i32(f"column {i} type modifier")
        columns.append(Column(column_name, type_oid, modifier, bool(flags & 1)))
    return Relation(oid, schema, name, identity, tuple(columns))


def _type(r: _Reader) -> Type:
    oid = r.u32("type OID")
    return Type(oid, r.string("namespace") or "pg_catalog", r.string("type name"))


def _insert(r: _Reader) -> Insert:
    data = r._data
    if len(data) > 5 and data[5] == 78:  # b"N" after the OID: the common case, read directly
        r._pos = 6
        return Insert(_U32(data, 1)[0], r.tuple_data("new tuple"))
    oid = r.u32("relation OID")
    marker = r._take(1, "new tuple marker")
    if marker != b"N":
        raise PgOutputError(f"Insert message: expected new tuple marker b'N', got {marker!r}")
    return Insert(oid, r.tuple_data("new tuple"))


def _update(r: _Reader) -> Update:
    oid = r.u32("relation OID")
    marker = r._take(1, "tuple marker")
    old: tuple[TupleValue, ...] | None = None
    old_is_key = False
    if marker in (b"K", b"O"):
        old_is_key = marker == b"K"
        old = r.tuple_data("old key" if old_is_key else "old tuple")
        marker = r._take(1, "new tuple marker")
    if marker != b"N":
        raise PgOutputError(f"Update message: expected tuple marker b'K', b'O' or b'N', got {marker!r}")
    return Update(oid, old, old_is_key, r.tuple_data("new tuple"))


def _delete(r: _Reader) -> Delete:
    oid = r.u32("relation OID")
    marker = r._take(1, "old tuple marker")
    if marker not in (b"K", b"O"):
        raise PgOutputError(f"Delete message: expected tuple marker b'K' or b'O', got {marker!r}")
    is_key = marker == b"K"
    return Delete(oid, r.tuple_data("old key" if is_key else "old tuple"), is_key)


def _truncate(r: _Reader) -> Truncate:
    count = r.i32("relation count")
    if count < 0:
        raise PgOutputError(f"Truncate message: negative relation count {count}")
    options = r.u8("options")
    oids = tuple(r.u32(f"relation OID {i}") for i in range(count))
    return Truncate(oids, bool(options & 1), bool(options & 2))


_DECODERS: Final[dict[bytes, Callable[[_Reader], PgOutputMessage]]] = {
    b"B": _begin,
    b"C": _commit,
    b"O": _origin,
    b"R": _relation,
    b"Y": _type,
    b"I": _insert,
    b"U": _update,
    b"D": _delete,
    b"T": _truncate,
}
_NAMES = {
    b"B": "Begin",
    b"C": "Commit",
    b"O": "Origin",
    b"R": "Relation",
    b"Y": "Type",
    b"I": "Insert",
    b"U": "Update",
    b"D": "Delete",
    b"T": "Truncate",
}
