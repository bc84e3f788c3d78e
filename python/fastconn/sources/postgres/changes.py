"""From decoded pgoutput messages to row-change events: transactions, topics, bodies, ids.

:class:`Assembler` is fed the rows of one peek in order and returns the complete transactions
(Begin ... Commit) it saw. It caches relations by OID (pgoutput re-sends them in every decoding
session). Pure: tested with byte fixtures, no server.

Each :class:`Change` carries what a function receives: topic ``<table>:<action>``
(``<schema>.<table>:<action>`` outside ``public``), a JSON body ``{id, schema, table, action,
data, dataOld, commitTime, lsn, xid}`` and the ``X-Event-*`` headers. ``id`` is
``<commit LSN>:<n>`` (n = the change's position in its transaction), so a change decoded again
after a restart has the same id. A column whose value is an unchanged TOASTed one is left out
of ``data`` and listed in ``unchangedToast``: never confused with NULL (which is ``null``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from fastconn.sources.postgres.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    PgOutputError,
    Relation,
    Truncate,
    TupleValue,
    Update,
    decode,
    format_lsn,
)
from fastconn.sources.postgres.values import PgValueError, convert

__all__ = ["ACTIONS", "Assembler", "Change", "Transaction", "topic_of"]

ACTIONS: Final = ("insert", "update", "delete", "truncate")
_CHANGE_TAGS: Final = frozenset((b"I", b"U", b"D", b"T"))


def topic_of(schema: str, table: str, action: str) -> str:
    """``customer:insert`` for ``public``, ``sales.customer:insert`` elsewhere."""
    return f"{table}:{action}" if schema == "public" else f"{schema}.{table}:{action}"


@dataclass(slots=True)
class Change:
    id: str
    schema: str
    table: str
    action: str
    topic: str
    body: bytes
    identity: bytes | None
    """The row's replica identity (key columns) as bytes, the per-row ordering key; None for a
    truncate or a table without one."""
    lsn: int


@dataclass(slots=True)
class Transaction:
    xid: int
    commit_lsn: int
    end_lsn: int
    """Confirm this (``pg_replication_slot_advance``) once every change is done."""
    commit_time: datetime.datetime
    changes: list[Change] = field(default_factory=list)


@dataclass(slots=True)
class _Open:
    begin: Begin
    skipped: bool
    changes: list[Change] = field(default_factory=list)


class Assembler:
    """Turns peeked rows into transactions. ``skip_through``: transactions whose commit LSN is
    at or below it were handed out already (a peek starts at the slot's confirmed position, so
    it re-reads what is still in flight); they are decoded for their relations but not
    returned."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._open: _Open | None = None
        self.key_columns: dict[int, tuple[int, ...]] = {}
        """Per relation OID, the column indexes ordering uses (set by the source from the
        primary key when the table has one; else the replica identity flags)."""

    def reset(self) -> None:
        """A new peek starts: any transaction left open by the last one is dropped (peek never
        splits a transaction, so this only happens after an error)."""
        self._open = None

    def feed(self, lsn: int, data: bytes, skip_through: int | None) -> Transaction | None:
        """One row; returns a transaction when this row was its Commit."""
        current = self._open
        if current is not None and current.skipped and data[:1] in _CHANGE_TAGS:
            return None  # handed out already: not worth decoding again (a peek re-reads it all)
        message = decode(data)
        if isinstance(message, Begin):
            skipped = skip_through is not None and message.final_lsn <= skip_through
            self._open = _Open(message, skipped)
            return None
        if isinstance(message, Relation):
            self.relations[message.oid] = message
            return None
        if isinstance(message, Commit):
            current, self._open = self._open, None
            if current is None:
                raise PgOutputError(f"Commit at {format_lsn(lsn)} without a Begin")
            if skip_through is not None and message.commit_lsn <= skip_through:
                return None
            return Transaction(
                current.begin.xid, message.commit_lsn, message.end_lsn, message.commit_time, current.changes
            )
        if isinstance(message, (Insert, Update, Delete, Truncate)):
            current = self._open
            if current is None:
                raise PgOutputError(f"{type(message).__name__} at {format_lsn(lsn)} outside a transaction")
            if skip_through is not None and current.begin.final_lsn <= skip_through:
                return None
            current.changes.extend(self._changes(message, current, lsn))
        return None  # Origin, Type: nothing to deliver

    def _relation(self, oid: int) -> Relation:
        relation = self.relations.get(oid)
        if relation is None:
            raise PgOutputError(f"change for relation OID {oid} before its Relation message")
        return relation

    def _changes(self, message: Insert | Update | Delete | Truncate, txn: _Open, lsn: int) -> list[Change]:
        begin = txn.begin
        if isinstance(message, Truncate):
            out: list[Change] = []
            for oid in message.relation_oids:
                rel = self._relation(oid)
                out.append(
                    self._change(rel, "truncate", None, None, (), begin, len(txn.changes) + len(out), lsn)
                )
            return out
        rel = self._relation(message.relation_oid)
        if isinstance(message, Insert):
            return [self._change(rel, "insert", message.new, None, message.new, begin, len(txn.changes), lsn)]
        if isinstance(message, Update):
            identity_row = message.old if message.old_is_key and message.old is not None else message.new
            return [
                self._change(
                    rel, "update", message.new, message.old, identity_row, begin, len(txn.changes), lsn
                )
            ]
        return [self._change(rel, "delete", None, message.old, message.old, begin, len(txn.changes), lsn)]

    def _change(
        self,
        rel: Relation,
        action: str,
        new: tuple[TupleValue, ...] | None,
        old: tuple[TupleValue, ...] | None,
        identity_row: tuple[TupleValue, ...],
        begin: Begin,
        position: int,
        lsn: int,
    ) -> Change:
        change_id = f"{format_lsn(begin.final_lsn)}:{position}"
        unchanged: list[str] = []
        body: dict[str, Any] = {
            "id": change_id,
            "schema": rel.schema,
            "table": rel.name,
            "action": action,
            "data": None if new is None else self._row(rel, new, unchanged),
            "dataOld": None if old is None else self._row(rel, old, None),
            "commitTime": begin.commit_time.isoformat().replace("+00:00", "Z"),
            "lsn": format_lsn(lsn),
            "xid": begin.xid,
        }
        if unchanged:
            body["unchangedToast"] = unchanged
        return Change(
            change_id,
            rel.schema,
            rel.name,
            action,
            topic_of(rel.schema, rel.name, action),
            orjson.dumps(body),
            self._identity(rel, identity_row) if action != "truncate" else None,
            lsn,
        )

    def _row(
        self, rel: Relation, values: tuple[TupleValue, ...], unchanged: list[str] | None
    ) -> dict[str, Any]:
        if len(values) != len(rel.columns):
            raise PgOutputError(
                f"tuple of {rel.schema}.{rel.name} has {len(values)} columns, its Relation {len(rel.columns)}"
            )
        row: dict[str, Any] = {}
        for column, value in zip(rel.columns, values, strict=True):
            if value is UNCHANGED:
                if unchanged is not None:
                    unchanged.append(column.name)
                continue
            if value is None:
                row[column.name] = None
                continue
            assert isinstance(value, bytes)
            try:
                row[column.name] = convert(column.type_oid, value)
            except (PgValueError, ValueError) as exc:
                raise PgOutputError(f"{rel.schema}.{rel.name}.{column.name}: {exc}") from None
        return row

    def _identity(self, rel: Relation, row: tuple[TupleValue, ...]) -> bytes | None:
        indexes = self.key_columns.get(rel.oid)
        if indexes is None:
            indexes = tuple(i for i, c in enumerate(rel.columns) if c.key)
        if not indexes or len(row) != len(rel.columns):
            return None
        parts = [f"{rel.schema}.{rel.name}".encode()]
        for i in indexes:
            value = row[i]
            parts.append(value if isinstance(value, bytes) else b"\x01null" if value is None else b"\x01u")
        return b"\x00".join(parts)
