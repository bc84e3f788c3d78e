"""The one header policy, shared by every source: which headers of an incoming message may
reach a function.

The names come from the native core (``fastconn._core``), which applies the same rule to every
message it sends, so the Python sources and the core cannot disagree:

* **reserved** names only fastconn sets (``X-Topic``, ``X-Message-Id``, ``X-Callback-Url``,
  ``X-Call-Id``...): a publisher who could set ``X-Callback-Url`` would receive a function's
  asynchronous result instead of fastconn;
* **hop-by-hop** names describe one HTTP connection (``Host``, ``Content-Length``,
  ``Transfer-Encoding``...) and would break or redirect the request;
* **credentials** (``Authorization``...) authenticate the sender *to fastconn* (webhooks): they
  are dropped by the sources whose senders authenticate that way.

A source adds its own coordinates (``X-Nats-Sequence``, ``X-Kafka-Partition``...) as
``source_reserved``: a message must not spoof them either.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from fastconn import _core

__all__ = ["CREDENTIALS", "HOP_BY_HOP", "RESERVED", "forwardable", "passthrough", "valid_value"]

RESERVED: Final = frozenset(_core.RESERVED_HEADERS)
HOP_BY_HOP: Final = frozenset(_core.HOP_BY_HOP_HEADERS)
CREDENTIALS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})

_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def forwardable(lower_name: str, source_reserved: frozenset[str] = frozenset()) -> bool:
    """Whether a header of this lower-case name may be passed on to a function."""
    return lower_name not in RESERVED and lower_name not in HOP_BY_HOP and lower_name not in source_reserved


def valid_value(value: object) -> bool:
    """Whether HTTP/1.1 can carry this value (text without control characters but tab) and the
    core can take it: aiohttp decodes bytes that are not UTF-8 to lone surrogates, which no
    UTF-8 encoder accepts."""
    return isinstance(value, str) and _BAD_VALUE.search(value) is None and _SURROGATE.search(value) is None


def passthrough(
    headers: Iterable[tuple[str, object]],
    *,
    source_reserved: frozenset[str] = frozenset(),
    drop_credentials: bool = False,
) -> list[tuple[str, str]]:
    """The headers of an incoming message that go on to its functions: names that are reserved
    (by fastconn or the source), hop-by-hop, credentials (when asked), or not HTTP tokens, and
    values HTTP cannot carry, are left out."""
    out: list[tuple[str, str]] = []
    for name, value in headers:
        lower = name.lower()
        if not forwardable(lower, source_reserved) or (drop_credentials and lower in CREDENTIALS):
            continue
        if not _TOKEN.fullmatch(name) or not isinstance(value, str) or not valid_value(value):
            continue
        out.append((name, value))
    return out
