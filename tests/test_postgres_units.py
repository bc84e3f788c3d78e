"""The pgoutput decoder, value typing and transaction assembly, from byte fixtures (no server)."""

from __future__ import annotations

import base64
import datetime
import re
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from fastconn.errors import SourceError
from fastconn.sources.postgres.changes import Assembler, topic_of
from fastconn.sources.postgres.config import PostgresConfig, read_dsn
from fastconn.sources.postgres.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    PgOutputError,
    Relation,
    Truncate,
    Type,
    Update,
    decode,
    format_lsn,
    parse_lsn,
)
from fastconn.sources.postgres.values import PgValueError, convert, converter, parse_array

# -- byte builders (the layouts of "Logical Replication Message Formats") ------------------------


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(*values: bytes | str | None) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v == "u":
            out += b"u"
        else:
            assert isinstance(v, bytes)
            out += b"t" + struct.pack("!i", len(v)) + v
    return out


MICROS_2024 = int(
    (
        datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
        - datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    )
    / datetime.timedelta(microseconds=1)
)


def begin(final_lsn: int = 0x16B374D848, xid: int = 777) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, MICROS_2024, xid)


def commit(commit_lsn: int = 0x16B374D848, end_lsn: int = 0x16B374D878) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, commit_lsn, end_lsn, MICROS_2024)


def relation(oid: int = 16400, schema: str = "public", name: str = "customer", full: bool = False) -> bytes:
    """``full``: REPLICA IDENTITY FULL, where every column is flagged as part of the identity."""
    cols = [(1, "id", 23), (0, "name", 25), (0, "balance", 1700), (0, "meta", 3802), (0, "doc", 25)]
    if full:
        cols = [(1, col, oid_) for _, col, oid_ in cols]
    identity = b"f" if full else b"d"
    out = b"R" + struct.pack("!I", oid) + _s(schema) + _s(name) + identity + struct.pack("!h", len(cols))
    for flags, col, type_oid in cols:
        out += bytes([flags]) + _s(col) + struct.pack("!Ii", type_oid, -1)
    return out


def insert(oid: int = 16400, *values: bytes | str | None) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + _tuple(*values)


ROW = (b"1", b"Ada", b"12345678901234567890.123456789", b'{"a": [1, 2]}', b"long text")


# -- decoder --------------------------------------------------------------------------------------


def test_decodes_every_message_type() -> None:
    b = decode(begin())
    assert isinstance(b, Begin)
    assert (b.final_lsn, b.xid) == (0x16B374D848, 777)
    assert b.commit_time == datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    c = decode(commit())
    assert isinstance(c, Commit) and c.end_lsn == 0x16B374D878
    r = decode(relation())
    assert isinstance(r, Relation)
    assert (r.schema, r.name, r.replica_identity) == ("public", "customer", "d")
    assert [(col.name, col.type_oid, col.key) for col in r.columns][:2] == [
        ("id", 23, True),
        ("name", 25, False),
    ]
    y = decode(b"Y" + struct.pack("!I", 90000) + _s("") + _s("mood"))
    assert y == Type(90000, "pg_catalog", "mood")
    i = decode(insert(16400, *ROW))
    assert isinstance(i, Insert) and i.new == ROW
    u = decode(
        b"U" + struct.pack("!I", 16400) + b"O" + _tuple(*ROW) + b"N" + _tuple(b"1", None, "u", b"x", b"y")
    )
    assert isinstance(u, Update) and u.old == ROW and not u.old_is_key
    assert u.new == (b"1", None, UNCHANGED, b"x", b"y")
    u2 = decode(b"U" + struct.pack("!I", 16400) + b"N" + _tuple(b"1"))
    assert isinstance(u2, Update) and u2.old is None
    d = decode(b"D" + struct.pack("!I", 16400) + b"K" + _tuple(b"1", None, None, None, None))
    assert isinstance(d, Delete) and d.old_is_key and d.old[0] == b"1"
    t = decode(b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 1, 2))
    assert t == Truncate((1, 2), cascade=True, restart_identity=True)


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"", "empty"),
        (b"Z123", "unknown pgoutput message type b'Z'"),
        (begin()[:5], "Begin message truncated reading final LSN"),
        (commit() + b"x", "1 unexpected trailing byte"),
        (b"R" + struct.pack("!I", 1) + b"public", "no terminating NUL"),
        (b"I" + struct.pack("!I", 1) + b"X" + _tuple(b"1"), "expected new tuple marker b'N'"),
        (b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"q", "unknown tuple kind b'q'"),
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", 50) + b"ab",
            "truncated",
        ),
        (
            b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"t" + struct.pack("!i", -5),
            "negative length",
        ),
        (b"D" + struct.pack("!I", 1) + b"N" + _tuple(b"1"), "expected tuple marker b'K' or b'O'"),
        (b"T" + struct.pack("!iB", -1, 0), "negative relation count"),
        (b"B" + struct.pack("!QqI", 1, 2**62, 1), "out of range"),
    ],
)
def test_bad_input_is_a_clear_error(data: bytes, complaint: str) -> None:
    with pytest.raises(PgOutputError, match=complaint.replace("(", r"\(").replace("[", r"\[")):
        decode(data)


def test_every_truncation_of_valid_messages_is_a_pgoutput_error() -> None:
    """No IndexError/struct.error leaks out, whatever prefix of a real message arrives."""
    upd = b"U" + struct.pack("!I", 16400) + b"O" + _tuple(*ROW) + b"N" + _tuple(b"1", None, "u", b"x", b"y")
    for message in (begin(), commit(), relation(), insert(16400, *ROW), upd):
        for cut in range(len(message)):
            with pytest.raises(PgOutputError):
                decode(message[:cut])


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert format_lsn(0) == "0/0"
    for bad in ("", "16", "x/1", "1/", "123456789/0"):
        with pytest.raises(ValueError, match="not an LSN"):
            parse_lsn(bad)


# -- values ---------------------------------------------------------------------------------------


def test_values_are_typed_from_the_column_type() -> None:
    assert convert(23, b"42") == 42
    assert convert(20, b"-9223372036854775808") == -9223372036854775808
    assert convert(16, b"t") is True and convert(16, b"f") is False
    assert convert(1700, b"12345678901234567890.123456789") == "12345678901234567890.123456789"
    assert convert(701, b"1.5") == 1.5 and convert(701, b"NaN") == "NaN"
    assert orjson.dumps(convert(3802, b'{"a": [1, 2]}')) == b'{"a": [1, 2]}'
    assert convert(17, b"\\x00ff10") == base64.b64encode(b"\x00\xff\x10").decode()
    assert convert(1184, b"2024-05-01 12:00:00.5+00") == "2024-05-01T12:00:00.5+00:00"
    assert convert(1184, b"2024-05-01 12:00:00-05:30") == "2024-05-01T12:00:00-05:30"
    assert convert(1114, b"2024-05-01 12:00:00") == "2024-05-01T12:00:00"
    assert convert(1007, b"{1,2,NULL}") == [1, 2, None]
    assert convert(1009, b'{"a b","c\\"d",NULL,"NULL"}') == ["a b", 'c"d', None, "NULL"]
    assert convert(1007, b"{{1,2},{3,4}}") == [[1, 2], [3, 4]]
    assert convert(1007, b"[0:1]={5,6}") == [5, 6]
    assert convert(1007, b"{}") == []
    assert convert(2950, b"8f4c...") == "8f4c..."  # anything else stays text


@pytest.mark.parametrize("literal", ["{1,2", '{"a', "1,2}", "{1,2}x", '{"a"b}', "[0:1]{1}"])
def test_bad_array_literals_are_clear_errors(literal: str) -> None:
    with pytest.raises(PgValueError, match=r"array literal|quoted array element"):
        parse_array(literal)


def test_bad_bytea_is_a_clear_error() -> None:
    with pytest.raises(PgValueError, match="bytea"):
        convert(17, b"abc")
    with pytest.raises(PgValueError, match="not valid hex"):
        convert(17, b"\\xzz")


# -- assembly -------------------------------------------------------------------------------------


def test_a_transaction_becomes_changes_with_topic_body_and_stable_ids() -> None:
    asm = Assembler()
    rows = [
        begin(),
        relation(),
        insert(16400, *ROW),
        b"U" + struct.pack("!I", 16400) + b"N" + _tuple(b"1", None, "u", b"[]", b"z"),
        b"D" + struct.pack("!I", 16400) + b"K" + _tuple(b"1", None, None, None, None),
        commit(),
    ]
    results = [asm.feed(100 + i, row, None) for i, row in enumerate(rows)]
    assert results[:-1] == [None] * 5
    txn = results[-1]
    assert txn is not None
    assert (txn.xid, txn.end_lsn) == (777, 0x16B374D878)
    ins, upd, dele = txn.changes
    assert [c.topic for c in txn.changes] == ["customer:insert", "customer:update", "customer:delete"]
    assert [c.id for c in txn.changes] == ["16/B374D848:0", "16/B374D848:1", "16/B374D848:2"]
    body = orjson.loads(ins.body)
    assert body == {
        "id": "16/B374D848:0",
        "schema": "public",
        "table": "customer",
        "action": "insert",
        "data": {
            "id": 1,
            "name": "Ada",
            "balance": "12345678901234567890.123456789",
            "meta": {"a": [1, 2]},
            "doc": "long text",
        },
        "dataOld": None,
        "commitTime": "2024-05-01T12:00:00Z",
        "lsn": format_lsn(102),
        "xid": 777,
    }
    updated = orjson.loads(upd.body)
    assert updated["data"] == {"id": 1, "name": None, "meta": [], "doc": "z"}
    assert updated["unchangedToast"] == ["balance"]  # not null: unchanged, not sent
    assert orjson.loads(dele.body)["dataOld"]["id"] == 1
    assert ins.identity == upd.identity == dele.identity is not None


def test_transactions_already_handed_out_are_skipped_but_their_relations_kept() -> None:
    asm = Assembler()
    first = [begin(0x100), relation(), insert(16400, *ROW), commit(0x100, 0x110)]
    second = [begin(0x200), insert(16400, *ROW), commit(0x200, 0x210)]
    assert [asm.feed(1, row, 0x100) for row in first] == [None] * 4
    txn = [asm.feed(1, row, 0x100) for row in second][-1]
    assert txn is not None and txn.commit_lsn == 0x200 and len(txn.changes) == 1


def test_schema_outside_public_is_in_the_topic_and_truncate_has_one_change_per_table() -> None:
    assert topic_of("sales", "orders", "insert") == "sales.orders:insert"
    asm = Assembler()
    rows = [
        begin(),
        relation(1, "sales", "orders"),
        relation(2),
        b"T" + struct.pack("!iBII", 2, 0, 1, 2),
        commit(),
    ]
    txn = [asm.feed(1, row, None) for row in rows][-1]
    assert txn is not None
    assert [c.topic for c in txn.changes] == ["sales.orders:truncate", "customer:truncate"]
    assert txn.changes[0].identity is None


def test_changes_before_their_relation_or_outside_a_transaction_are_clear_errors() -> None:
    asm = Assembler()
    with pytest.raises(PgOutputError, match="outside a transaction"):
        asm.feed(1, insert(16400, *ROW), None)
    asm.feed(1, begin(), None)
    with pytest.raises(PgOutputError, match="before its Relation"):
        asm.feed(2, insert(16400, *ROW), None)
    asm.feed(3, relation(), None)
    with pytest.raises(PgOutputError, match="has 1 columns, its Relation 5"):
        asm.feed(4, insert(16400, b"1"), None)
    with pytest.raises(PgOutputError, match=r"public\.customer\.id: invalid literal"):
        asm.feed(4, insert(16400, b"x", None, None, None, None), None)


def test_ordering_key_is_the_primary_key_even_with_replica_identity_full() -> None:
    """REPLICA IDENTITY FULL flags every column: keyed by those, a row's key would change with
    each update and its updates could overtake each other. The source sets the primary key."""
    asm = Assembler()
    asm.feed(1, begin(), None)
    asm.feed(2, relation(full=True), None)
    asm.feed(3, insert(16400, *ROW), None)
    asm.feed(
        4,
        b"U" + struct.pack("!I", 16400) + b"O" + _tuple(*ROW) + b"N" + _tuple(b"1", b"Bo", b"1", b"{}", b"z"),
        None,
    )
    txn = asm.feed(5, commit(), None)
    assert txn is not None
    first, second = txn.changes
    assert first.identity != second.identity, "keyed by every column, the row's key changed"
    asm.key_columns[16400] = (0,)  # what the source sets from the primary key
    asm.feed(1, begin(0x300), None)
    asm.feed(3, insert(16400, *ROW), None)
    asm.feed(
        4,
        b"U" + struct.pack("!I", 16400) + b"O" + _tuple(*ROW) + b"N" + _tuple(b"1", b"Bo", b"1", b"{}", b"z"),
        None,
    )
    txn = asm.feed(5, commit(0x300, 0x310), None)
    assert txn is not None
    first, second = txn.changes
    assert first.identity == second.identity == b"public.customer\x001"


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        ({"filters": "customer:upsert"}, "expected table:action with action one of insert, update"),
        ({"filters": "customer"}, "expected table:action"),
        ({"tables": ["bad-name"]}, "expected table or schema.table"),
        ({"dead_letter_table": "x;drop"}, "expected table or schema.table"),
        ({"dsn": "postgresql://a@b/c", "dsn_file": "/x"}, "set dsn or dsn_file, not both"),
        ({"mode": "notify"}, "needs channels"),
        ({"channels": ["a"]}, "channels is for mode = 'notify'"),
        ({"slot": "Has-Caps"}, "String should match pattern"),
        ({"ordering": "row"}, "'key', 'transaction' or 'none'"),
        ({"retry_backoff_initial": 5, "retry_backoff_max": 1}, "must be >= retry_backoff_initial"),
        ({"batch_sise": 5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_settings_are_clear_errors(settings: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        PostgresConfig.model_validate({"type": "postgres", **settings})


def test_filters_take_the_openfaas_comma_form() -> None:
    config = PostgresConfig.model_validate({"filters": "customer:insert, sales.orders:delete"})
    assert config.topic_filter == {"customer:insert", "sales.orders:delete"}


def test_dsn_file_is_read_and_a_missing_one_is_a_clear_error(tmp_path: Path) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:p@h/d\n")
    assert read_dsn(PostgresConfig(dsn_file=str(secret))) == "postgresql://u:p@h/d"
    with pytest.raises(SourceError, match="cannot read dsn_file"):
        read_dsn(PostgresConfig(dsn_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("")
    with pytest.raises(SourceError, match="is empty"):
        read_dsn(PostgresConfig(dsn_file=str(tmp_path / "empty")))


# -- the per-relation fast path (changes built with converters chosen once per column) -------------

EVERY_TYPE = [
    # (column, type OID, text as pgoutput sends it, the JSON value expected in the body)
    ("b_true", 16, b"t", True),
    ("b_false", 16, b"f", False),
    ("i2", 21, b"-32768", -32768),
    ("i4", 23, b"2147483647", 2147483647),
    ("i8", 20, b"-9223372036854775808", -9223372036854775808),
    ("oid", 26, b"4294967295", 4294967295),
    ("f4", 700, b"1.5", 1.5),
    ("f8", 701, b"-2.25e-05", -2.25e-05),
    ("f8_nan", 701, b"NaN", "NaN"),
    ("f8_inf", 701, b"-Infinity", "-Infinity"),
    ("num", 1700, b"12345678901234567890.123456789", "12345678901234567890.123456789"),
    ("js", 114, b'{"a": [1, "\xc3\xa9"]}', {"a": [1, "\u00e9"]}),
    ("jsb", 3802, b"[true, null]", [True, None]),
    ("raw", 17, b"\\x00ff10", base64.b64encode(b"\x00\xff\x10").decode()),
    ("ts", 1114, b"2024-05-01 12:00:00.5", "2024-05-01T12:00:00.5"),
    ("tstz", 1184, b"2024-05-01 12:00:00+05:30", "2024-05-01T12:00:00+05:30"),
    ("txt", 25, "h\u00e9llo \u2603".encode(), "h\u00e9llo \u2603"),
    ("ints", 1007, b"{{1,NULL},{3,4}}", [[1, None], [3, 4]]),
    ("texts", 1009, b'{"a b","c\\"d",NULL}', ["a b", 'c"d', None]),
    ("bools", 1000, b"{t,f}", [True, False]),
    ("floats", 1022, b"{1.5,NaN}", [1.5, "NaN"]),
    ("uuid", 2950, b"8f4c2a9e-0000-4000-8000-000000000001", "8f4c2a9e-0000-4000-8000-000000000001"),
    ("nothing", 23, None, None),
    ("toasted", 25, "u", None),
]


def _relation_of(columns: list[tuple[str, int]], oid: int = 16500) -> bytes:
    out = b"R" + struct.pack("!I", oid) + _s("public") + _s("every") + b"d" + struct.pack("!h", len(columns))
    for i, (name, type_oid) in enumerate(columns):
        out += bytes([1 if i == 0 else 0]) + _s(name) + struct.pack("!Ii", type_oid, -1)
    return out


def test_every_supported_type_is_typed_in_the_change_body() -> None:
    asm = Assembler()
    asm.feed(1, begin(), None)
    asm.feed(2, _relation_of([(name, oid_) for name, oid_, _, _ in EVERY_TYPE]), None)
    values = tuple(raw for _, _, raw, _ in EVERY_TYPE)
    asm.feed(3, b"I" + struct.pack("!I", 16500) + b"N" + _tuple(*values), None)
    txn = asm.feed(4, commit(), None)
    assert txn is not None
    (change,) = txn.changes
    body = orjson.loads(change.body)
    expected = {name: value for name, _, raw, value in EVERY_TYPE if raw != "u"}
    assert body["data"] == expected
    assert body["unchangedToast"] == ["toasted"]
    assert change.identity == b"public.every\x00t"


@pytest.mark.parametrize(
    ("name", "type_oid", "raw", "value"), [t for t in EVERY_TYPE if isinstance(t[2], bytes)]
)
def test_each_columns_converter_gives_what_convert_gives(
    name: str, type_oid: int, raw: bytes, value: Any
) -> None:
    # through JSON: json/jsonb values are orjson fragments, embedded as sent
    got = orjson.loads(orjson.dumps(converter(type_oid)(raw)))
    assert got == orjson.loads(orjson.dumps(convert(type_oid, raw))) == value, name


def test_a_value_that_does_not_parse_names_its_column_whatever_its_type() -> None:
    asm = Assembler()
    asm.feed(1, begin(), None)
    asm.feed(2, _relation_of([("id", 23), ("f", 701), ("flag", 16), ("arr", 1007)]), None)
    bad_rows = [
        (
            (b"1", b"one point five", b"t", b"{}"),
            r"public\.every\.f: could not convert string to float: 'one",
        ),
        (
            (b"1", b"1.5", b"t", b"{1,x}"),
            r"public\.every\.arr: invalid literal for int\(\) with base 10: 'x'",
        ),
        ((b"1", b"1.5", b"t", b"{1"), r"public\.every\.arr: array literal cut short"),
        (
            (b"\xff", b"1.5", b"t", b"{}"),
            r"public\.every\.id: invalid literal for int\(\) with base 10: '\ufffd'",
        ),
    ]
    for row, complaint in bad_rows:
        with pytest.raises(PgOutputError, match=complaint):
            asm.feed(3, b"I" + struct.pack("!I", 16500) + b"N" + _tuple(*row), None)


def test_tuple_data_fast_reader_agrees_with_the_checked_one() -> None:
    """Well-formed tuples of every kind decode alike through the fast loop and the checked
    reader it falls back to; cut short anywhere, both give a PgOutputError."""
    from fastconn.sources.postgres.pgoutput import _Reader

    shapes = [
        (),
        (None,),
        ("u",),
        (b"",),
        (b"x" * 300, None, "u", b"1"),
        tuple(bytes([i]) * i for i in range(40)),
    ]
    for values in shapes:
        data = b"I" + _tuple(*values)
        fast = _Reader(data, "Insert").tuple_data("t")
        checked = _Reader(data, "Insert")._checked_tuple_data("t")
        assert fast == checked == tuple(UNCHANGED if v == "u" else v for v in values)
        binary = data.replace(b"t", b"b") if values == (b"",) else None
        if binary is not None:
            assert _Reader(binary, "Insert").tuple_data("t") == (b"",)
        for cut in range(1, len(data)):
            reader = _Reader(data[:cut], "Insert")
            try:
                got = reader.tuple_data("t")
            except PgOutputError:
                continue
            pytest.fail(f"{values!r} cut at {cut} decoded as {got!r}")
