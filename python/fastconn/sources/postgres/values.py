"""Column values from pgoutput's text format to JSON, typed by the column's type OID.

pgoutput (protocol 1, no ``binary`` option) sends every value as its type's text output in the
decoding session's settings; the source sets ``DateStyle = ISO``, ``TimeZone = UTC``,
``bytea_output = hex`` and ``extra_float_digits = 3`` on its connection so the text is
predictable. Mapping: integers and booleans become JSON numbers/booleans, ``numeric`` stays a
string (JSON numbers lose precision in most readers), ``json``/``jsonb`` are embedded as JSON,
timestamps become ISO 8601, ``bytea`` base64, arrays of these types JSON arrays; anything else
is the text as a string. Pure functions, tested without a server.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from typing import Any, Final

import orjson

__all__ = ["ARRAY_ELEMENT", "PgValueError", "convert", "converter", "parse_array"]


class PgValueError(ValueError):
    """A value whose text does not parse as its type says (an array literal cut short...)."""


def _int(text: str) -> Any:
    return int(text)


def _float(text: str) -> Any:
    value = float(text)
    # NaN and Infinity have no JSON form: keep PostgreSQL's spelling.
    return value if math.isfinite(value) else text


def _bool(text: str) -> Any:
    return text == "t"


def _json(text: str) -> Any:
    # Embedded as is: the server already validated it, and re-parsing would cost per row.
    return orjson.Fragment(text.encode())


def _bytea(text: str) -> Any:
    if not text.startswith("\\x"):
        raise PgValueError("bytea value not in hex format (the connection sets bytea_output = hex)")
    try:
        return base64.b64encode(bytes.fromhex(text[2:])).decode()
    except (ValueError, binascii.Error):
        raise PgValueError("bytea value is not valid hex") from None


def _timestamptz(text: str) -> Any:
    """``2024-05-01 12:00:00.5+00`` (ISO DateStyle) → ``2024-05-01T12:00:00.5+00:00``."""
    if text in ("infinity", "-infinity"):
        return text
    iso = text.replace(" ", "T", 1)
    sign = max(iso.rfind("+"), iso.rfind("-"))
    if sign > iso.find("T") > 0:
        offset = iso[sign + 1 :]
        if len(offset) == 2:  # hours only
            iso += ":00"
        elif len(offset) == 8 and offset[2] == ":":  # +05:30:15 (historic offsets): keep hh:mm
            iso = iso[: sign + 6]
    return iso


def _timestamp(text: str) -> Any:
    return text if text in ("infinity", "-infinity") else text.replace(" ", "T", 1)


_SCALARS: Final[dict[int, Callable[[str], Any]]] = {
    16: _bool,
    20: _int,
    21: _int,
    23: _int,
    26: _int,
    700: _float,
    701: _float,
    114: _json,
    3802: _json,
    17: _bytea,
    1114: _timestamp,
    1184: _timestamptz,
}

ARRAY_ELEMENT: Final[dict[int, int]] = {
    1000: 16,  # bool[]
    1001: 17,  # bytea[]
    1005: 21,  # int2[]
    1007: 23,  # int4[]
    1016: 20,  # int8[]
    1028: 26,  # oid[]
    1021: 700,  # float4[]
    1022: 701,  # float8[]
    1231: 1700,  # numeric[]
    1009: 25,  # text[]
    1015: 1043,  # varchar[]
    1014: 1042,  # bpchar[]
    199: 114,  # json[]
    3807: 3802,  # jsonb[]
    1115: 1114,  # timestamp[]
    1185: 1184,  # timestamptz[]
    1182: 1082,  # date[]
    2951: 2950,  # uuid[]
}
"""Array type OID → element type OID, for the built-in arrays converted element by element."""


def convert(type_oid: int, raw: bytes) -> Any:
    """One non-NULL column value (pgoutput text bytes) as a JSON-ready Python value."""
    text = raw.decode("utf-8", "replace")
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        return _convert_array(parse_array(text), element)
    scalar = _SCALARS.get(type_oid)
    return text if scalar is None else scalar(text)


def _text_bytes(raw: bytes) -> Any:
    return raw.decode("utf-8", "replace")


def _float_bytes(raw: bytes) -> Any:
    value = float(raw)
    return value if math.isfinite(value) else raw.decode()


_BYTES_SCALARS: Final[dict[int, Callable[[bytes], Any]]] = {
    # int() and float() parse ASCII bytes as they parse the decoded text: no str in between.
    20: int,
    21: int,
    23: int,
    26: int,
    700: _float_bytes,
    701: _float_bytes,
    16: (b"t").__eq__,
}
"""The hot scalar types, converted from the bytes as they come (what :func:`convert` gives)."""


def converter(type_oid: int) -> Callable[[bytes], Any]:
    """The function :func:`convert` applies to a column of this type, chosen once per column
    (the source builds one per column of a relation, not one lookup per value). On bad input it
    raises ``ValueError`` (a message may read differently from :func:`convert`'s: call that for
    the error to report)."""
    fast = _BYTES_SCALARS.get(type_oid)
    if fast is not None:
        return fast
    element = ARRAY_ELEMENT.get(type_oid)
    if element is not None:
        return lambda raw: _convert_array(parse_array(raw.decode("utf-8", "replace")), element)
    scalar = _SCALARS.get(type_oid)
    if scalar is None:
        return _text_bytes
    return lambda raw: scalar(raw.decode("utf-8", "replace"))


def _convert_array(items: list[Any], element: int) -> list[Any]:
    scalar = _SCALARS.get(element)
    out: list[Any] = []
    for item in items:
        if isinstance(item, list):
            out.append(_convert_array(item, element))
        elif item is None or scalar is None:
            out.append(item)
        else:
            out.append(scalar(item))
    return out


def parse_array(text: str) -> list[Any]:
    """A PostgreSQL array literal (``{1,2,NULL}``, ``{"a b","c\\"d"}``, ``{{1,2},{3,4}}``) as
    nested lists of element texts (``None`` for an unquoted NULL). A leading dimension
    decoration (``[0:1]={...}``) is skipped."""
    if text.startswith("["):
        eq = text.find("=")
        if eq < 0:
            raise PgValueError(f"array literal with dimensions but no '=': {text[:40]!r}")
        text = text[eq + 1 :]
    value, end = _parse_level(text, 0)
    if end != len(text):
        raise PgValueError(f"unexpected text after the array literal at {end}: {text[:40]!r}")
    return value


def _parse_level(text: str, pos: int) -> tuple[list[Any], int]:
    if pos >= len(text) or text[pos] != "{":
        raise PgValueError(f"array literal must start with '{{' at {pos}: {text[:40]!r}")
    pos += 1
    items: list[Any] = []
    if pos < len(text) and text[pos] == "}":
        return items, pos + 1
    while True:
        if pos >= len(text):
            raise PgValueError(f"array literal cut short: {text[:40]!r}")
        char = text[pos]
        if char == "{":
            nested, pos = _parse_level(text, pos)
            items.append(nested)
        elif char == '"':
            buf: list[str] = []
            pos += 1
            while True:
                if pos >= len(text):
                    raise PgValueError(f"unterminated quoted array element: {text[:40]!r}")
                c = text[pos]
                if c == "\\" and pos + 1 < len(text):
                    buf.append(text[pos + 1])
                    pos += 2
                elif c == '"':
                    pos += 1
                    break
                else:
                    buf.append(c)
                    pos += 1
            items.append("".join(buf))
        else:
            start = pos
            while pos < len(text) and text[pos] not in ",}":
                pos += 1
            token = text[start:pos]
            items.append(None if token == "NULL" else token)
        if pos >= len(text):
            raise PgValueError(f"array literal cut short: {text[:40]!r}")
        if text[pos] == ",":
            pos += 1
        elif text[pos] == "}":
            return items, pos + 1
        else:
            raise PgValueError(f"unexpected {text[pos]!r} in array literal at {pos}: {text[:40]!r}")
