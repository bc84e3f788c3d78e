"""Fixtures for the vcenter tests: govmomi's simulator (``tests/vcsim/main.go``, built once with
Debian's Go, see :mod:`fastconn.testing_vcsim`) on a free port, a pyvmomi driver that makes
events, and the daemon's config.

Import explicitly: ``from vcsim_fixtures import vcsim  # noqa: F401``. A missing Go toolchain or
govmomi source is a failure, not a skip (``scripts/setup.sh`` installs them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastconn.testing import FunctionDouble
from fastconn.testing_vcsim import Vcsim, VcsimDriver, driver

T = TypeVar("T")


@pytest.fixture
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vcsim]:
    """A simulator of the test's own (tests restart it)."""
    try:
        sim = Vcsim(tmp_path_factory.mktemp("vcsim"))
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield sim
    sim.stop()


async def drive(sim: Vcsim, action: Callable[[VcsimDriver], T]) -> T:
    """Runs ``action(driver)`` in a thread (pyvmomi blocks) with a session of its own."""

    def run() -> T:
        with driver(sim.url, sim.username or "user", sim.password or "pass") as d:
            return action(d)

    return await asyncio.to_thread(run)


def vcenter_source(sim: Vcsim, state: Path, **keys: Any) -> dict[str, Any]:
    """A ``[[sources]]`` table for ``sim`` with its checkpoint file in ``state``."""
    return {**vcenter_source_at(sim.url, state, sim.username or "user", sim.password or "pass"), **keys}


def vcenter_source_at(
    url: str, state: Path, username: str = "user", password: str = "pass", **keys: Any
) -> dict[str, Any]:
    return {
        "type": "vcenter",
        "url": url,
        "username": username,
        "password": password,
        "poll_interval": "100ms",
        "retry_initial": "100ms",
        "retry_max": "1s",
        "checkpoint": {"type": "file", "path": str(state / "vcenter.checkpoint")},
        **keys,
    }


def daemon_config(
    double: FunctionDouble, functions: dict[str, Sequence[str]], sources: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Static functions ``name -> topics`` served by ``double`` at ``/<name>``, fast retries."""
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s"},
        "functions": [
            {"name": name, "url": double.url(f"/{name}"), "topics": list(topics)}
            for name, topics in functions.items()
        ],
        "sources": list(sources),
    }
