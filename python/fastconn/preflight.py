"""Checks of a valid configuration against this machine: what ``run`` needs from the OS.

``python -m fastconn check`` and ``run`` both call :func:`preflight` after loading the
configuration, so whatever ``run`` would refuse at start-up ``check`` reports first, with the
same key path and message (exit 2): they agree by construction, not by keeping two lists in
step. The checks here are the ones a schema cannot make: the listen address must resolve and
be free, the gateway's basic-auth secrets must be readable.

``run`` still binds for real later; if the address is taken in between, the daemon reports it
through :func:`listen_problem` too, so the message is the same either way.
"""

from __future__ import annotations

import errno
import socket

from fastconn.admin import bind_listener
from fastconn.config import Config, ServerConfig
from fastconn.errors import ConfigError, ConfigProblem

__all__ = ["listen_problem", "preflight"]

_LOCATION = "server.listen"


def preflight(config: Config) -> None:
    """Raises :class:`ConfigError` listing every problem ``run`` would hit at start-up."""
    problems: list[ConfigProblem] = []
    problem = _check_listen(config.server)
    if problem is not None:
        problems.append(problem)
    if config.gateway is not None:
        try:
            config.gateway.credentials()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)


def listen_problem(listen: str, exc: OSError) -> ConfigProblem:
    """The problem to report when ``listen`` cannot be resolved or bound."""
    if isinstance(exc, socket.gaierror):
        message = f"cannot resolve the listen host ({exc.strerror or exc}): use an IP address or a known name"
    elif exc.errno == errno.EADDRINUSE:
        message = "address already in use: another process listens there; choose another port"
    elif exc.errno == errno.EADDRNOTAVAIL:
        message = "address not available: it is not an address of this host (0.0.0.0 listens on all)"
    elif exc.errno == errno.EACCES:
        message = "permission denied: ports below 1024 need privileges; choose a port >= 1024"
    else:
        message = f"cannot listen there ({exc.strerror or exc})"
    return ConfigProblem(_LOCATION, message, listen)


def _check_listen(server: ServerConfig) -> ConfigProblem | None:
    """Binds the listen address exactly as the admin server will (the same function), then
    lets go: resolution, "in use" and "not an address of this host" all show up here."""
    try:
        bind_listener(server.host, server.port).close()
    except OSError as exc:
        return listen_problem(server.listen, exc)
    return None
