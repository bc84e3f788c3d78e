"""Shared fixtures for fastconn's tests.

* ``gateway``: a started :class:`GatewayDouble` (no functions, no auth; configure it in the test).
* ``function_double``: a started :class:`fastconn.testing.FunctionDouble` (static URLs).
* ``http``: an ``aiohttp.ClientSession``.
* ``daemon_factory``: ``await daemon_factory(config)`` starts ``python -m fastconn run`` as a
  subprocess (a :class:`fastconn.testing.DaemonProcess`) and waits for ``/readyz`` (or
  ``wait="health"``, or ``wait=None`` to return as soon as it is spawned). Every daemon it started
  is stopped at teardown (SIGTERM, then kill); when the test failed, their output is printed so it
  shows up in pytest's report.
* ``fast_dispatch``: a ``[dispatch]`` table with short timings, to merge into test configs.
* ``secrets_dir``: ``secrets_dir(user, password)`` writes OpenFaaS basic-auth secret files into a
  temporary directory (``[gateway] secret_mount_path``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from fastconn.testing import DaemonProcess, FunctionDouble, to_toml
from gateway_double import GatewayDouble

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Remembers on the item whether setup or the test body failed (for teardown-time dumps)."""
    report = yield
    if report.when in ("setup", "call") and report.failed:
        item.stash[_FAILED] = True
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """Whether the test that ``request`` belongs to has failed so far."""
    return request.node.stash.get(_FAILED, False)


@pytest.fixture
async def gateway() -> AsyncIterator[GatewayDouble]:
    """A started OpenFaaS gateway double on 127.0.0.1 with no functions deployed."""
    double = GatewayDouble()
    await double.start()
    try:
        yield double
    finally:
        await double.stop()


@pytest.fixture
async def function_double() -> AsyncIterator[FunctionDouble]:
    """A started recording HTTP function double (every path answers 200 with the echoed body)."""
    async with FunctionDouble() as double:
        yield double


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def fast_dispatch() -> dict[str, Any]:
    """``[dispatch]`` settings that keep retries and shutdown fast in tests."""
    return {"backoff_initial": "10ms", "backoff_max": "2s", "shutdown_timeout": "5s"}


class DaemonFactory(Protocol):
    def __call__(
        self,
        config: Mapping[str, Any],
        *,
        wait: str | None = "ready",
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> Awaitable[DaemonProcess]: ...


@pytest.fixture
async def daemon_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DaemonFactory]:
    """Starts fastconn daemons as subprocesses; stops them all at teardown."""
    started: list[DaemonProcess] = []

    async def start(
        config: Mapping[str, Any],
        *,
        wait: str | None = "ready",
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> DaemonProcess:
        daemon = DaemonProcess(config, tmp_path, env=env, args=args)
        started.append(daemon)
        if wait is None:
            _spawn_only(daemon)
        else:
            await daemon.start(wait=wait, timeout=timeout)
        return daemon

    try:
        yield start
    finally:
        problems: list[str] = []
        for daemon in started:
            code: int | str
            try:
                code = await daemon.stop(signal.SIGTERM, timeout=10.0)
            except TimeoutError:
                code = "killed: no exit within 10s of SIGTERM"
            if failed(request):
                problems.append(f"--- fastconn {daemon.listen} (exit {code}) ---\n{daemon.output()}")
        if problems:
            print("\n".join(problems))


def _spawn_only(daemon: DaemonProcess) -> None:
    """Like ``DaemonProcess.start`` without waiting for any endpoint (for start-up failure tests)."""
    daemon.config_path.write_text(to_toml(daemon.config))
    env = {**os.environ, **daemon.env}
    env.pop("FASTCONN_CONFIG", None)
    with daemon.log_path.open("ab") as log:
        daemon.process = subprocess.Popen(
            [sys.executable, "-m", "fastconn", "run", "--config", str(daemon.config_path), *daemon.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Callable[[str, str], Path]:
    """``secrets_dir(user, password)`` writes OpenFaaS basic-auth secret files; returns the directory."""

    def write(user: str, password: str) -> Path:
        directory = tmp_path / "secrets"
        directory.mkdir(exist_ok=True)
        (directory / "basic-auth-user").write_text(user + "\n")
        (directory / "basic-auth-password").write_text(password + "\n")
        return directory

    return write
