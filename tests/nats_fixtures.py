"""Fixtures for the NATS and JetStream tests: a real ``nats-server`` (JetStream on, store in a
temp folder) on a free port, shared by the session; one with token auth;
helpers to build daemon configs and JetStream state.

Import the fixtures explicitly in a test module::

    from nats_fixtures import nats_server  # noqa: F401

(the ``function_double`` fixture comes from ``conftest.py``).

A missing ``nats-server`` binary is a failure, not a skip (set-up installs it).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from fastconn.testing import FunctionDouble, ServerProcess, free_port, nats_server_command

TOKEN = "s3cret-token"


class NatsServer(ServerProcess):
    """A running ``nats-server -js``; ``url`` is its client URL."""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


def start_nats_server(workdir: Path, *args: str, port: int | None = None) -> NatsServer:
    """Starts ``nats-server -js`` on a free port (or ``port``) with its store in ``workdir``;
    waits until it accepts connections. The same ``workdir`` again restarts with the same store."""
    port = port or free_port()
    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    try:
        argv = nats_server_command(port, store, *args)
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    return NatsServer("nats-server", argv, port, workdir / "nats-server.log")


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats_server(tmp_path_factory.mktemp("nats-auth"), "--auth", TOKEN)
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def connected(url: str, **options: Any) -> AsyncIterator[Client]:
    client = await nats.connect(url, **options)
    try:
        yield client
    finally:
        await client.close()


def unique(prefix: str) -> str:
    """A name no other test uses (the server is shared by the session)."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def daemon_config(
    double: FunctionDouble,
    functions: Mapping[str, Sequence[str]],
    sources: Sequence[Mapping[str, Any]],
    **dispatch: Any,
) -> dict[str, Any]:
    """A daemon config with static functions ``name -> topics`` served by ``double`` at
    ``/<name>``, fast retries, and the given sources."""
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s", **dispatch},
        "functions": [
            {"name": name, "url": double.url(f"/{name}"), "topics": list(topics)}
            for name, topics in functions.items()
        ],
        "sources": list(sources),
    }
