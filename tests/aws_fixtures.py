"""Fixtures for the AWS sources' tests: ``moto`` in server mode (SQS, SNS, S3 with their
notifications in the AWS format) on a free port of 127.0.0.1, one server per test so tests
never see each other's queues, and dummy credentials in the environment (moto accepts any;
the daemon subprocesses inherit them through the standard AWS chain).

Import explicitly: ``from aws_fixtures import moto_server  # noqa: F401``. A missing moto is a
failure, not a skip (``make setup`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fastconn.testing import ServerProcess, free_port, moto_command

REGION = "us-east-1"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


class MotoServer(ServerProcess):
    """A running moto server; :attr:`endpoint_url` is what clients pass as ``endpoint_url``."""

    def __init__(self, workdir: Path, port: int) -> None:
        try:
            argv = moto_command(port)
        except FileNotFoundError as exc:
            pytest.fail(str(exc), pytrace=False)
        super().__init__("moto", argv, port, workdir / "moto.log", timeout=30.0)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Dummy credentials and region in this process's environment (and so the daemon's)."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return dict(AWS_ENV)


@pytest.fixture
def moto_server(tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str]) -> Iterator[MotoServer]:
    """A moto server of the test's own."""
    server = MotoServer(tmp_path_factory.mktemp("moto"), free_port())
    yield server
    server.stop()
