"""Secrets kept in files (``password_file``, ``username_file``...): the one way every source
reads them, so the errors say the same thing everywhere."""

from __future__ import annotations

from pathlib import Path

from fastconn.errors import SourceError

__all__ = ["read_secret"]


def read_secret(path: str, what: str, owner: str) -> str:
    """The stripped text of ``path``; :class:`SourceError` naming ``owner`` (``mqtt``,
    ``source vc``) and ``what`` (``password``) when it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{owner}: cannot read {what} from {path!r}: {exc}") from None
    if not text:
        raise SourceError(f"{owner}: {what} file {path!r} is empty")
    return text
