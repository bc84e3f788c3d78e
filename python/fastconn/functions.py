"""Function targets: what the registry resolves and the Rust router routes to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FunctionTarget:
    """One invocable function and the topics it subscribes to.

    ``name`` is the label used in metrics, logs and ``X-Function-Name`` (``fn`` or
    ``fn.namespace``). ``url`` is the full synchronous invoke URL; ``async_url`` the
    ``/async-function/`` one (None for static URLs, which have no async form).
    """

    name: str
    topics: tuple[str, ...]
    url: str
    async_url: str | None = None
    max_inflight: int | None = None
    """Per-function in-flight bound; the dispatcher default applies when None."""
    timeout: float | None = None
    """Per-request timeout in seconds; the dispatcher default applies when None."""
    asynchronous: bool = False
    """Invoke through ``async_url`` (OpenFaaS async) instead of ``url``."""
    headers: tuple[tuple[str, str], ...] = ()
    """Extra headers on every call (e.g. the gateway's basic auth, never sent to static URLs)."""
    schedule: str | None = None
    """Cron schedule (``schedule`` annotation or static key), fired by a ``cron`` source when
    the function subscribes to ``cron-function``."""
    timezone: str | None = None
    """IANA zone of ``schedule`` (``timezone`` annotation or static key); the source's default when None."""
    cron_policy: tuple[tuple[str, str], ...] = ()
    """``fastconn.cron.<key>`` annotations as ``(key, value)``, checked by the cron source."""
