"""The MQTT source over TLS with username/password, against a mosquitto of the test's own:
a plain listener (anonymous, for the test's publisher) and an ``ssl://`` listener whose
certificate comes from a private ``trustme`` CA, that requires a client certificate from the
same CA (mutual TLS) and a user from a ``mosquitto_passwd`` password file. The daemon reads the
credentials from files (``username_file``/``password_file``) as it does from mounted secrets.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from conftest import DaemonFactory
from fastconn.testing import MOSQUITTO, FunctionDouble, ServerProcess, free_port, wait_for
from mqtt_fixtures import daemon_config, publish, unique

USER, PASSWORD = "fastconn", "s3cret-pass"


@dataclass
class SecureMosquitto:
    server: ServerProcess
    plain_port: int
    tls_port: int
    ca_file: Path
    other_ca_file: Path
    client_cert: Path
    client_key: Path


def mosquitto_passwd(path: Path, user: str, password: str) -> None:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        pytest.fail("mosquitto_passwd not found: run scripts/setup.sh (Debian's mosquitto)", pytrace=False)
    subprocess.run([tool, "-c", "-b", str(path), user, password], check=True, capture_output=True)


@pytest.fixture
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMosquitto]:
    workdir = tmp_path_factory.mktemp("mosquitto-tls")
    ca, other = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fastconn-client")
    files = {name: workdir / name for name in ("ca.pem", "other-ca.pem", "server.pem", "server.key")}
    ca.cert_pem.write_to_path(str(files["ca.pem"]))
    other.cert_pem.write_to_path(str(files["other-ca.pem"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server.pem"]))
    server_cert.private_key_pem.write_to_path(str(files["server.key"]))
    client_cert, client_key = workdir / "client.pem", workdir / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    passwords = workdir / "passwords"
    mosquitto_passwd(passwords, USER, PASSWORD)
    plain_port, tls_port = free_port(), free_port()
    config = workdir / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                "per_listener_settings true",
                f"user {pwd.getpwuid(os.getuid()).pw_name}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                f"listener {plain_port} 127.0.0.1",
                "allow_anonymous true",
                f"listener {tls_port} 127.0.0.1",
                "allow_anonymous false",
                f"password_file {passwords}",
                f"cafile {files['ca.pem']}",
                f"certfile {files['server.pem']}",
                f"keyfile {files['server.key']}",
                "require_certificate true",
                "",
            ]
        )
    )
    server = ServerProcess("mosquitto", [MOSQUITTO, "-c", str(config)], tls_port, workdir / "mosquitto.log")
    try:
        yield SecureMosquitto(
            server, plain_port, tls_port, files["ca.pem"], files["other-ca.pem"], client_cert, client_key
        )
    finally:
        server.stop()


def secret(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def tls_source(broker: SecureMosquitto, directory: Path, **keys: Any) -> dict[str, Any]:
    return {
        "type": "mqtt",
        "broker": f"ssl://127.0.0.1:{broker.tls_port}",
        "client_id": unique("fc-"),
        "topics": ["secure/#"],
        "username_file": secret(directory, "user", f"{USER}\n"),
        "password_file": secret(directory, "password", f"{PASSWORD}\n"),
        "tls_ca": str(broker.ca_file),
        "tls_cert": str(broker.client_cert),
        "tls_key": str(broker.client_key),
        "connect_wait": "3s",
        **keys,
    }


async def test_tls_listener_with_password_and_client_certificate(
    secure_mosquitto: SecureMosquitto,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
) -> None:
    source = tls_source(secure_mosquitto, tmp_path)
    await daemon_factory(daemon_config(function_double, {"f": ["secure/#"]}, [source]))
    payloads = [f"m{i}".encode() for i in range(20)]
    await publish(secure_mosquitto.plain_port, "secure/a", payloads)
    await wait_for(lambda: len(function_double.calls_to("/f")) == 20, what="every message over TLS")
    assert sorted(c.body for c in function_double.calls_to("/f")) == sorted(payloads)
    assert {c.headers["X-Topic"] for c in function_double.calls_to("/f")} == {"secure/a"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"password": "wrong"}, "refused the connection: Not authorized -- check username/password"),
        ({"username_file": None, "password_file": None}, "refused the connection: Not authorized"),
        ({"tls_ca": "other"}, "certificate verify failed"),
        ({"tls_cert": None, "tls_key": None}, "cannot connect to MQTT"),
    ],
    ids=["wrong-password", "anonymous", "untrusted-broker-certificate", "no-client-certificate"],
)
async def test_refused_connections_fail_the_start_with_the_reason(
    secure_mosquitto: SecureMosquitto,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    change: dict[str, str | None],
    expected: str,
) -> None:
    source = tls_source(secure_mosquitto, tmp_path)
    for key, value in change.items():
        if key == "password":
            source["password_file"] = secret(tmp_path, "password", f"{value}\n")
        elif key == "tls_ca":
            source["tls_ca"] = str(secure_mosquitto.other_ca_file)
        elif value is None:
            del source[key]
    daemon = await daemon_factory(daemon_config(function_double, {"f": ["secure/#"]}, [source]), wait=None)
    await wait_for(lambda: daemon.process is not None and daemon.process.poll() is not None, 30, what="exit")
    assert daemon.process is not None and daemon.process.returncode != 0
    output = daemon.output()
    assert expected in output, output
    assert "Traceback" not in output, output
    assert function_double.calls == []
