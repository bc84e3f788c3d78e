"""Secrets never appear in errors or logs: config values of secret keys, URL credentials."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fastconn.config import validate_config
from fastconn.errors import ConfigError, ConfigProblem, SourceError
from fastconn.logs import RedactingFilter
from fastconn.redact import REDACTED, redact_text
from fastconn.sources._nats_common import NatsConnectionConfig, connect, connection_health
from fastconn.testing import FunctionDouble, free_port, to_toml, wait_for

if TYPE_CHECKING:
    from conftest import DaemonFactory

SECRET = "hunter2"
FUNCTIONS = [{"name": "a", "url": "http://127.0.0.1:9/", "topics": ["t"]}]


@pytest.mark.parametrize(
    ("config", "shown"),
    [
        (
            {
                "functions": FUNCTIONS,
                "sources": [{"type": "nats", "servers": [f"nats://bob:{SECRET}@h:99999"]}],
            },
            "nats://bob:***@h:99999",
        ),
        (
            {"functions": FUNCTIONS, "sources": [{"type": "nats", "servers": [f"nats://{SECRET}@h:99999"]}]},
            "nats://***@h:99999",
        ),
        (
            {
                "functions": FUNCTIONS,
                "sources": [{"type": "nats", "user": "bob", "password": SECRET, "token": SECRET}],
            },
            f"'password': '{REDACTED}'",
        ),
        ({"functions": FUNCTIONS, "sources": [{"type": "webhook", "auth_token": [SECRET]}]}, REDACTED),
        ({"functions": FUNCTIONS, "sources": [{"type": "webhook", "hmac_secret": {"k": SECRET}}]}, REDACTED),
        ({"functions": FUNCTIONS, "dispatch": {"callback_secret": [SECRET]}}, REDACTED),
        ({"gateway": {"url": f"http://bob:{SECRET}@gw:port"}}, "http://bob:***@gw:port"),
    ],
)
def test_config_errors_do_not_quote_secrets(config: dict[str, Any], shown: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate_config(config)
    text = str(caught.value)
    assert SECRET not in text
    assert shown in text, text
    assert SECRET not in repr([p.value for p in caught.value.problems])


def test_a_config_problem_keeps_what_is_not_secret() -> None:
    problem = ConfigProblem("gateway.secret_mount_path", "cannot be read", "/var/openfaas/secrets")
    assert problem.value == "/var/openfaas/secrets"
    assert ConfigProblem("sources[0].sasl_password", "bad", 5).value == REDACTED


def test_check_prints_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "fastconn.toml"
    path.write_text(
        to_toml(
            {"functions": FUNCTIONS, "sources": [{"type": "webhook", "auth_token": 12345, "hmac_secret": 7}]}
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "fastconn", "check", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done
    assert "auth_token" in done.stderr and "hmac_secret" in done.stderr
    assert "12345" not in done.stderr + done.stdout


async def test_nats_connect_errors_mask_url_credentials() -> None:
    port = free_port()  # nothing listens there
    config = NatsConnectionConfig(servers=(f"nats://bob:{SECRET}@127.0.0.1:{port}",), connect_wait=0.5)
    with pytest.raises(SourceError) as caught:
        log = logging.getLogger("test")
        health = connection_health(config, "n", log)
        await connect(config, name="n", log=log, error_cb=_ignore, health=health)
    assert SECRET not in str(caught.value)
    assert f"nats://bob:***@127.0.0.1:{port}" in str(caught.value)


async def _ignore(_: Exception) -> None:
    return None


async def test_the_daemon_logs_no_url_credentials(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    port = free_port()
    config = {
        "functions": [{"name": "a", "url": function_double.url("/a"), "topics": ["t"]}],
        "sources": [
            {"type": "nats", "servers": [f"nats://bob:{SECRET}@127.0.0.1:{port}"], "connect_wait": "1s"}
        ],
    }
    daemon = await daemon_factory(config, wait=None)
    assert daemon.process is not None
    await wait_for(lambda: daemon.process is not None and daemon.process.poll() is not None, 20, what="exit")
    output = daemon.output()
    assert "cannot connect to NATS" in output, output
    assert SECRET not in output, output


def test_the_log_filter_masks_credentials_from_any_logger() -> None:
    record = logging.LogRecord(
        "nats", logging.WARNING, "x", 1, "connecting to %s", (f"nats://u:{SECRET}@h",), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "connecting to nats://u:***@h"
    assert redact_text("no credentials: http://h/a@b") == "no credentials: http://h/a@b"
