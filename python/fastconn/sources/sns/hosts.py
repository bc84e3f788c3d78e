"""Which URLs SNS may make fastconn fetch: a signing certificate or a confirmation link.

Both come from the request body, so an attacker chooses them. A certificate from a host the
attacker controls would "verify" any forged message, and a confirmation link could point
anywhere (server-side request forgery). So a URL must be ``https``, without user info, on a host
matching one of the configured patterns as a whole (``*`` stands for exactly one DNS label,
never a dot: a substring or suffix check would let ``sns.us-east-1.amazonaws.com.evil.example``
or an S3 bucket host through), and on the default port unless the pattern names one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HostPattern", "parse_host_pattern", "url_problem"]

_LABEL: Final = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_HOST_CHARS: Final = re.compile(r"[a-z0-9.-]+")


@dataclass(frozen=True, slots=True)
class HostPattern:
    labels: tuple[str, ...]
    """Lower-case labels; ``*`` matches one label."""
    port: int | None
    """Required port, or None for the scheme's default only."""

    def matches(self, host: str, port: int | None) -> bool:
        if port != self.port and not (self.port is None and port in (None, 443)):
            return False
        labels = host.split(".")
        if len(labels) != len(self.labels):
            return False
        return all(
            (want == "*" and _LABEL.fullmatch(got) is not None) or want == got
            for want, got in zip(self.labels, labels, strict=True)
        )

    def __str__(self) -> str:
        host = ".".join(self.labels)
        return host if self.port is None else f"{host}:{self.port}"


def parse_host_pattern(text: str) -> HostPattern:
    """``sns.*.amazonaws.com`` or ``localhost:8443``; ValueError naming the problem."""
    host, colon, port_text = text.lower().partition(":")
    port: int | None = None
    if colon:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"host pattern {text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    labels = tuple(host.split("."))
    for label in labels:
        if label != "*" and not _LABEL.fullmatch(label):
            raise ValueError(
                f"host pattern {text!r}: {label!r} is not a DNS label (letters, digits, '-'), "
                "and '*' must be a whole label"
            )
    if len(labels) >= 2 and "*" in labels[-2:]:
        raise ValueError(
            f"host pattern {text!r} would match any domain: wildcards are for labels such as the "
            "region, e.g. 'sns.*.amazonaws.com'"
        )
    if labels == ("*",):
        raise ValueError(f"host pattern {text!r} would match any host")
    return HostPattern(labels, port)


def url_problem(url: str, patterns: tuple[HostPattern, ...], *, suffix: str = "") -> str | None:
    """Why ``url`` may not be fetched, or None when it may. ``suffix``: the path must end so."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r} is not a valid URL ({exc})"
    if parts.scheme != "https":
        return f"{url!r} is not https"
    if parts.username is not None or parts.password is not None:
        return f"{url!r} carries user info"
    host = parts.hostname or ""
    if not _HOST_CHARS.fullmatch(host) or not any(p.matches(host, port) for p in patterns):
        allowed = ", ".join(str(p) for p in patterns)
        return f"host of {url!r} is not an allowed SNS host ({allowed}): see signing_cert_hosts"
    if suffix and not parts.path.endswith(suffix):
        return f"{url!r} does not end with {suffix}"
    return None
