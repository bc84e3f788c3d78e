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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from fastconn.sources.postgres.pgoutput import (
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
from fastconn.sources.postgres.values import PgValueError, convert, converter

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
    lsn_text: str
    """``lsn`` as PostgreSQL writes it (``16/B374D848``): in the body and a header."""


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
    id_prefix: str
    """``<commit LSN>:``, the stable ids' common part."""
    commit_time: str
    """ISO 8601, ``Z`` for UTC: every change of the transaction has it."""
    changes: list[Change] = field(default_factory=list)


class _Table:
    """What every change of one relation shares, worked out once from its Relation message:
    the column names, each column's value converter, the topics, the ordering key's prefix."""

    __slots__ = ("converters", "flagged", "identity_prefix", "names", "relation", "topics")

    def __init__(self, relation: Relation) -> None:
        self.relation = relation
        self.names = tuple(c.name for c in relation.columns)
        self.converters: tuple[Callable[[bytes], Any], ...] = tuple(
            converter(c.type_oid) for c in relation.columns
        )
        self.topics = {action: topic_of(relation.schema, relation.name, action) for action in ACTIONS}
        self.identity_prefix = f"{relation.schema}.{relation.name}".encode()
        self.flagged = tuple(i for i, c in enumerate(relation.columns) if c.key)
        """The replica identity's columns (ordering uses the primary key instead when set)."""


class Assembler:
    """Turns peeked rows into transactions. ``skip_through``: transactions whose commit LSN is
    at or below it were handed out already (a peek starts at the slot's confirmed position, so
    it re-reads what is still in flight); they are decoded for their relations but not
    returned."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self._tables: dict[int, _Table] = {}
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
        # Most rows are changes: tested first.
        if isinstance(message, (Insert, Update, Delete, Truncate)):
            if current is None:
                raise PgOutputError(f"{type(message).__name__} at {format_lsn(lsn)} outside a transaction")
            if skip_through is not None and current.begin.final_lsn <= skip_through:
                return None
            self._changes(message, current, lsn)
            return None
        if isinstance(message, Begin):
            skipped = skip_through is not None and message.final_lsn <= skip_through
            commit_time = message.commit_time.isoformat().replace("+00:00", "Z")
            self._open = _Open(message, skipped, f"{format_lsn(message.final_lsn)}:", commit_time)
            return None
        if isinstance(message, Relation):
            self.relations[message.oid] = message
            self._tables[message.oid] = _Table(message)
            return None
        if isinstance(message, Commit):
            self._open = None
            if current is None:
                raise PgOutputError(f"Commit at {format_lsn(lsn)} without a Begin")
            if skip_through is not None and message.commit_lsn <= skip_through:
                return None
            return Transaction(
                current.begin.xid, message.commit_lsn, message.end_lsn, message.commit_time, current.changes
            )
        return None  # Origin, Type: nothing to deliver

    def _table(self, oid: int) -> _Table:
        table = self._tables.get(oid)
        if table is None:
            raise PgOutputError(f"change for relation OID {oid} before its Relation message")
        return table

    def _changes(self, message: Insert | Update | Delete | Truncate, txn: _Open, lsn: int) -> None:
        """Appends the changes of one message to its transaction."""
        out = txn.changes
        if isinstance(message, Truncate):
            for oid in message.relation_oids:
                out.append(self._change(self._table(oid), "truncate", None, None, None, txn, lsn))
            return
        table = self._table(message.relation_oid)
        if isinstance(message, Insert):
            out.append(self._change(table, "insert", message.new, None, message.new, txn, lsn))
        elif isinstance(message, Update):
            identity_row = message.old if message.old_is_key and message.old is not None else message.new
            out.append(self._change(table, "update", message.new, message.old, identity_row, txn, lsn))
        else:
            out.append(self._change(table, "delete", None, message.old, message.old, txn, lsn))

    def _change(
        self,
        table: _Table,
        action: str,
        new: tuple[TupleValue, ...] | None,
        old: tuple[TupleValue, ...] | None,
        identity_row: tuple[TupleValue, ...] | None,
        txn: _Open,
        lsn: int,
    ) -> Change:
        rel = table.relation
        change_id = f"{txn.id_prefix}{len(txn.changes)}"
        lsn_text = format_lsn(lsn)
        unchanged: list[str] = []
        body: dict[str, Any] = {
            "id": change_id,
            "schema": rel.schema,
            "table": rel.name,
            "action": action,
            "data": None if new is None else self._row(table, new, unchanged),
            "dataOld": None if old is None else self._row(table, old, None),
            "commitTime": txn.commit_time,
            "lsn": lsn_text,
            "xid": txn.begin.xid,
        }
        if unchanged:
            body["unchangedToast"] = unchanged
        return Change(
            change_id,
            rel.schema,
            rel.name,
            action,
            table.topics[action],
            orjson.dumps(body),
            None if identity_row is None else self._identity(table, identity_row),
            lsn,
            lsn_text,
        )

    def _row(
        self, table: _Table, values: tuple[TupleValue, ...], unchanged: list[str] | None
    ) -> dict[str, Any]:
        if len(values) != len(table.names):
            rel = table.relation
            raise PgOutputError(
                f"tuple of {rel.schema}.{rel.name} has {len(values)} columns, its Relation {len(table.names)}"
            )
        row: dict[str, Any] = {}
        try:
            for name, convert_value, value in zip(table.names, table.converters, values, strict=True):
                if isinstance(value, bytes):
                    row[name] = convert_value(value)
                elif value is None:
                    row[name] = None
                elif unchanged is not None:
                    unchanged.append(name)
        except ValueError as exc:
            raise _bad_value(table.relation, values, exc) from None
        return row

    def _identity(self, table: _Table, row: tuple[TupleValue, ...]) -> bytes | None:
        rel = table.relation
        indexes = self.key_columns.get(rel.oid, table.flagged)
        if not indexes or len(row) != len(rel.columns):
            return None
        parts = [table.identity_prefix]
        for i in indexes:
            value = row[i]
            parts.append(value if isinstance(value, bytes) else b"\x01null" if value is None else b"\x01u")
        return b"\x00".join(parts)


def _bad_value(rel: Relation, values: tuple[TupleValue, ...], exc: ValueError) -> PgOutputError:
    """The clear error for a value that does not parse as its column's type: the column found
    again with :func:`convert`, whose message shows the text (a fast converter's shows bytes)."""
    for column, value in zip(rel.columns, values, strict=True):
        if isinstance(value, bytes):
            try:
                convert(column.type_oid, value)
            except (PgValueError, ValueError) as error:
                return PgOutputError(f"{rel.schema}.{rel.name}.{column.name}: {error}")
    return PgOutputError(f"{rel.schema}.{rel.name}: {exc}")
