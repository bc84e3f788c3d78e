"""Secrets kept in files (``*_file`` configuration keys: ``password_file``, ``dsn_file``, ...).

One rule for every source: a Kubernetes/Docker secret is mounted as a file, read at start, its
surrounding whitespace (the trailing newline editors and ``echo`` add) stripped; a missing,
unreadable or empty file is a :class:`SourceError` naming the key, the path and the fix, never a
traceback, and the secret itself never appears in a message.
"""

from __future__ import annotations

from pathlib import Path

from fastconn.errors import SourceError

__all__ = ["read_secret", "secret_or_file"]


def read_secret(path: str, what: str, owner: str) -> str:
    """The secret in file ``path``, stripped. ``what`` names the key (``password_file``),
    ``owner`` the source (``mqtt``, ``source 'orders'``) for the error message."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SourceError(f"{owner}: cannot read {what} from {path!r}: {why}") from None
    if not text:
        raise SourceError(f"{owner}: {what} file {path!r} is empty: put the secret in it")
    return text


def secret_or_file(value: str | None, path: str | None, what: str, owner: str) -> str | None:
    """``value`` when set, else the secret in ``path`` (``what``: the file key), else None."""
    if value is not None:
        return value
    return read_secret(path, what, owner) if path is not None else None
