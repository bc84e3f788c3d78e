"""The fastconn exception tree.

Every error fastconn raises on purpose derives from :class:`FastconnError`, so callers can
catch "anything fastconn-specific" in one place while still telling the kinds apart::

    FastconnError(Exception)
    ├── ConfigError         invalid configuration; carries .problems: list[ConfigProblem]
    ├── DispatcherClosed    submit after close
    ├── DispatcherFull      the core refused a batch over its bound (a bug: capacity is reserved first)
    ├── ForkError           runtime used in a forked child (pid differs)
    ├── InternalError       a bug in fastconn's native core (a caught panic); the process lives on
    ├── RegistryError       gateway listing failed (carries url, status)
    └── SourceError         a source failed to connect / is misconfigured at runtime

This module must stay dependency-free (stdlib and the stdlib-only :mod:`fastconn.redact`): it
is imported by everything else, including code that runs before the native extension is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from fastconn.redact import redact_text, redact_value

__all__ = [
    "MISSING",
    "ConfigError",
    "ConfigProblem",
    "DispatcherClosed",
    "DispatcherFull",
    "FastconnError",
    "ForkError",
    "InternalError",
    "RegistryError",
    "SourceError",
]


class _Missing:
    """Type of :data:`MISSING`; a sentinel distinct from ``None`` (which can be a real bad value)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        # A singleton so ``is MISSING`` keeps working after copy/pickle round-trips.
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<missing>"

    def __reduce__(self) -> tuple[type[_Missing], tuple[()]]:
        return (_Missing, ())


MISSING: Final = _Missing()
"""``ConfigProblem.value`` for problems that have no offending value (a required key that is absent,
an unreadable file). Such problems render without the ``(got ...)`` suffix."""


class FastconnError(Exception):
    """Base class of every exception fastconn raises deliberately."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration.

    ``location`` says where, in the same spelling the user wrote it: a dotted path with ``[i]`` for
    array elements (``"dispatch.max_inflight"``, ``"sources[1].auth_token"``), ``"env:<NAME>"`` for an
    environment override, or a file path for problems reading the file itself.
    ``message`` says what was expected; ``value`` is the offending value (or :data:`MISSING`).
    Both are redacted on construction (:mod:`fastconn.redact`): the value of a secret key shows as
    ``<redacted>``, credentials in URLs as ``***``.
    """

    location: str
    message: str
    value: object = MISSING

    def __post_init__(self) -> None:
        # Errors are printed and logged: a secret the user mistyped must not be quoted back.
        object.__setattr__(self, "message", redact_text(self.message))
        if self.value is not MISSING:
            object.__setattr__(self, "value", redact_value(self.value, self.location))

    def __str__(self) -> str:
        if self.value is MISSING:
            return f"{self.location}: {self.message}"
        return f"{self.location}: {self.message} (got {self.value!r})"


class ConfigError(FastconnError):
    """The configuration is invalid.

    All problems found are reported at once (not just the first) so a user can fix a config file in
    one edit-run cycle; ``str()`` renders one line per problem.
    """

    problems: list[ConfigProblem]

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems = list(problems)
        # Pass the list through so the default pickling (cls(*args)) reconstructs the error.
        super().__init__(self.problems)

    @classmethod
    def single(cls, location: str, message: str, value: object = MISSING) -> ConfigError:
        """Shorthand for an error with exactly one problem."""
        return cls([ConfigProblem(location, message, value)])

    def __str__(self) -> str:
        if not self.problems:
            return "invalid configuration"
        return "\n".join(str(problem) for problem in self.problems)


class DispatcherClosed(FastconnError):
    """A message was submitted after the dispatcher was closed (during or after shutdown)."""


class DispatcherFull(FastconnError):
    """The core refused a batch that would exceed its queue bound.

    :class:`~fastconn.dispatcher.Dispatcher` reserves capacity before submitting, so seeing this
    means a caller bypassed it and talked to the native runtime directly.
    """


class ForkError(FastconnError):
    """The runtime was used in a forked child process.

    The native runtime's threads do not survive ``fork()``; using it from a child (whose pid differs
    from the one that created it) would deadlock, so it fails loudly instead. Create a new runtime in
    the child.
    """


class InternalError(FastconnError):
    """A bug in fastconn's native core, caught at the boundary (a Rust panic). The call that hit
    it failed; the runtime and every other message are unaffected. Please report it."""


class RegistryError(FastconnError):
    """Listing functions from the gateway failed.

    ``url`` is the URL that was requested; ``status`` the HTTP status, or ``None`` when no response
    was received (connection refused, timeout, undecodable body).
    """

    url: str
    status: int | None

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status

    def __reduce__(self) -> tuple[type[RegistryError], tuple[str, str, int | None]]:
        return (type(self), (str(self.args[0]) if self.args else "", self.url, self.status))


class SourceError(FastconnError):
    """A source failed to connect, or its configuration turned out unusable at runtime."""
