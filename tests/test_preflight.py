"""The start-up checks `check` and `run` share (:mod:`fastconn.preflight`), and the daemon's own
report when the listen address is taken between the check and the bind."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from fastconn.config import Config, validate_config
from fastconn.daemon import Daemon
from fastconn.errors import ConfigError
from fastconn.preflight import preflight


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def config_listening_on(listen: str) -> Config:
    function = {"name": "f", "url": "http://127.0.0.1:9/f", "topics": ["t"]}
    return validate_config({"functions": [function], "server": {"listen": listen}})


def test_preflight_accepts_a_free_address_and_lets_it_go() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = config_listening_on(f"127.0.0.1:{port}")
    preflight(config)
    preflight(config)  # the test bind was released: a second check (and the daemon) can bind


def test_preflight_reports_a_busy_address(busy_port: int) -> None:
    with pytest.raises(ConfigError) as caught:
        preflight(config_listening_on(f"127.0.0.1:{busy_port}"))
    [problem] = caught.value.problems
    assert problem.location == "server.listen"
    assert problem.message.startswith("address already in use")
    assert problem.value == f"127.0.0.1:{busy_port}"


async def test_an_address_taken_after_preflight_fails_start_with_the_same_problem(busy_port: int) -> None:
    config = config_listening_on(f"127.0.0.1:{busy_port}")
    with pytest.raises(ConfigError) as from_preflight:
        preflight(config)
    daemon = Daemon(config)
    with pytest.raises(ConfigError) as from_start:
        await daemon.start()
    assert from_start.value.problems == from_preflight.value.problems
    await daemon.shutdown()  # nothing half-started is left behind
