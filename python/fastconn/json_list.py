"""Decoding a large JSON array without holding the interpreter for the whole document.

``json.loads`` is one C call that keeps the GIL until it returns, so running it in a worker
thread still stalls the event loop for the whole parse (1.7 s for a 300 MB function listing).
:func:`decode_json_list` decodes the array one element at a time instead: between elements the
interpreter can switch threads, so in a worker thread (``asyncio.to_thread``) the event loop gets
its turns every switch interval.

An ``each`` function may reduce every element as soon as it is decoded: what is kept is then
a fraction of the document, which also keeps the garbage collector's full passes (which stall
every thread, and grow with the number of live objects) short.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable
from typing import Any, Final

__all__ = ["decode_json_list", "utf8_text"]

_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")
_DECODER: Final = json.JSONDecoder()


def decode_json_list(text: str, each: Callable[[Any], Any] | None = None) -> Any:
    """``json.loads(text)``, decoding a top-level array element by element, each element passed
    through ``each`` when given. Raises ValueError (``json.JSONDecodeError``) for text that is
    not JSON."""
    index = _skip(text, 0)
    if not text.startswith("[", index):
        return json.loads(text)  # not an array: nothing to split
    items: list[Any] = []
    index = _skip(text, index + 1)
    if text.startswith("]", index):
        return _end(text, index, items)
    while True:
        item, index = _DECODER.raw_decode(text, index)
        items.append(item if each is None else each(item))
        index = _skip(text, index)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
        elif text.startswith("]", index):
            return _end(text, index, items)
        else:
            raise json.JSONDecodeError("expected ',' or ']'", text, index)


def utf8_text(data: bytes | bytearray, piece: int = 1 << 20) -> str:
    """``data.decode("utf-8")`` a piece at a time (one call on 30 MB holds the GIL ~30 ms)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    view = memoryview(data)
    parts = [decoder.decode(view[start : start + piece]) for start in range(0, len(data), piece)]
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    return match.end() if match else index


def _end(text: str, index: int, items: list[Any]) -> list[Any]:
    rest = _skip(text, index + 1)
    if rest != len(text):
        raise json.JSONDecodeError("extra data", text, rest)
    return items
