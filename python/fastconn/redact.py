"""Keeping secrets out of logs and error messages.

Two kinds of secret reach text: URLs with credentials (``nats://user:password@host``, a NATS
token as ``nats://token@host``) and config values of keys that hold secrets (``password``,
``auth_token``, ``hmac_secret``...), which a validation error would otherwise quote back.

Stdlib only: :mod:`fastconn.errors` uses it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

__all__ = ["REDACTED", "is_secret_key", "redact_text", "redact_value"]

REDACTED: Final = "<redacted>"

_SECRET_NAMES: Final = frozenset({"password", "passwd", "token", "secret", "nkey_seed", "credentials"})
_SECRET_SUFFIXES: Final = ("_password", "_token", "_secret", "_key")
_KEY_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]+")

# scheme://user:password@ or scheme://user@ (a bare user part may be a token, as in NATS URLs).
_URL_CREDENTIALS: Final = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:'\"]*)(?::(?P<password>[^\s/@'\"]*))?@"
)


def is_secret_key(name: str) -> bool:
    """Whether a config key (or any part of a location such as ``sources[0].auth_token``) names a
    secret."""
    for token in _KEY_TOKEN.findall(name.lower()):
        if token in _SECRET_NAMES or token.endswith(_SECRET_SUFFIXES):
            return True
    return False


def _mask(match: re.Match[str]) -> str:
    if match.group("password") is None:
        return f"{match.group('scheme')}***@"
    return f"{match.group('scheme')}{match.group('user')}:***@"


def redact_text(text: str) -> str:
    """``text`` with the credentials of every URL in it masked (``nats://bob:***@host``)."""
    return _URL_CREDENTIALS.sub(_mask, text) if "@" in text else text


def redact_value(value: object, key: str = "") -> object:
    """A config value safe to show: :data:`REDACTED` under a secret key, URL credentials masked
    in strings, tables and lists redacted key by key."""
    if key and is_secret_key(key) and value is not None:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value
