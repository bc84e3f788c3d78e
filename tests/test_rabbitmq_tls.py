"""RabbitMQ over TLS (``amqps://``, ``tls_ca``/``tls_cert``/``tls_key``) and credentials from
files (``username_file``/``password_file``).

The machine's broker has no TLS listener, so a TLS terminator in the test process stands in
for one: it accepts TLS with a certificate from a private ``trustme`` CA (and requires a client
certificate from the same CA: mutual TLS) and pipes the plain bytes to the real broker on
127.0.0.1:5672. The AMQP session is the broker's own, end to end through a real handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from fastconn.errors import SourceError
from fastconn.sources.rabbitmq import RabbitMQConfig
from fastconn.testing import DaemonProcess, FunctionDouble, free_port, wait_for
from rabbitmq_fixtures import Broker, daemon_config, drained, rabbit, rabbit_source

__all__ = ["rabbit"]  # fixtures, used by name

BROKER = ("127.0.0.1", 5672)


@dataclass
class TlsTerminator:
    """TLS on ``port``, plain TCP to the broker behind it."""

    context: ssl.SSLContext
    port: int = 0
    handshakes_failed: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> TlsTerminator:
        self.port = free_port()
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.context)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*BROKER)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@dataclass
class Pki:
    ca_file: Path
    other_ca_file: Path
    client_cert: Path
    client_key: Path
    server_context: ssl.SSLContext


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("fastconn-client")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a client certificate from our CA
    files = Pki(
        tmp_path / "ca.pem",
        tmp_path / "other-ca.pem",
        tmp_path / "client.pem",
        tmp_path / "client.key",
        context,
    )
    ca.cert_pem.write_to_path(str(files.ca_file))
    other.cert_pem.write_to_path(str(files.other_ca_file))
    client.cert_chain_pems[0].write_to_path(str(files.client_cert))
    client.private_key_pem.write_to_path(str(files.client_key))
    return files


@pytest.fixture
async def terminator(pki: Pki) -> AsyncIterator[TlsTerminator]:
    proxy = await TlsTerminator(pki.server_context).start()
    try:
        yield proxy
    finally:
        await proxy.close()


def secret(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def test_amqps_with_mutual_tls_and_credentials_from_files(
    rabbit: Broker, function_double: FunctionDouble, terminator: TlsTerminator, pki: Pki, tmp_path: Path
) -> None:
    queue = rabbit.names.queue()
    source = rabbit_source(
        rabbit.names.prefix,
        [queue],
        url=f"amqps://127.0.0.1:{terminator.port}/",  # no credentials in the URL
        username_file=secret(tmp_path, "user", "guest\n"),
        password_file=secret(tmp_path, "password", "guest\n"),
        tls_ca=str(pki.ca_file),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
    )
    config = daemon_config(function_double, {"fn": [queue]}, [source])
    async with DaemonProcess(config, tmp_path):
        await rabbit.publish_many(queue, [f"m{i}".encode() for i in range(20)])
        await wait_for(lambda: len(function_double.calls) == 20, 15, 0.05, "every message over amqps")
        await drained(rabbit.channel, queue)
    assert sorted(c.body for c in function_double.calls) == sorted(f"m{i}".encode() for i in range(20))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tls_ca": "other"}, "certificate verify failed"),  # the broker's certificate is not trusted
        ({"tls_cert": None, "tls_key": None}, "cannot connect to RabbitMQ"),  # no client certificate
        ({"password": "wrong\n"}, "access_refused"),
    ],
)
async def test_a_refused_connection_stops_the_start_with_the_reason(
    rabbit: Broker,
    function_double: FunctionDouble,
    terminator: TlsTerminator,
    pki: Pki,
    tmp_path: Path,
    change: dict[str, str | None],
    expected: str,
) -> None:
    queue = rabbit.names.queue()
    options: dict[str, str] = {
        "url": f"amqps://127.0.0.1:{terminator.port}/",
        "username_file": secret(tmp_path, "user", "guest"),
        "password_file": secret(tmp_path, "password", change.get("password") or "guest"),
        "tls_ca": str(pki.other_ca_file if change.get("tls_ca") == "other" else pki.ca_file),
    }
    if "tls_cert" not in change:
        options |= {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    source = rabbit_source(rabbit.names.prefix, [queue], startup_timeout="5s", **options)
    config = daemon_config(function_double, {"fn": [queue]}, [source])
    daemon = DaemonProcess(config, tmp_path)
    with pytest.raises(RuntimeError, match="fastconn exited") as failed:
        await daemon.start()
    output = str(failed.value)
    assert expected in output and rabbit.names.prefix in output, output
    assert "Traceback" not in output, output
    assert function_double.calls == []


# -- configuration (no broker) ------------------------------------------------------------------


def rabbit_config(**keys: object) -> RabbitMQConfig:
    return RabbitMQConfig.model_validate({"url": "amqp://127.0.0.1/", "queues": ["q"], **keys})


@pytest.mark.parametrize(
    ("keys", "fragment"),
    [
        ({"tls_ca": "/ca.pem"}, "need an amqps:// url"),
        ({"url": "amqps://h/", "tls_cert": "/c.pem"}, "tls_cert and tls_key go together"),
        ({"password_file": "/p"}, "password_file needs a user"),
    ],
)
def test_tls_and_secret_file_keys_are_checked(keys: dict[str, str], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        rabbit_config(**keys)


def test_credentials_come_from_their_files_and_replace_the_urls(tmp_path: Path) -> None:
    config = rabbit_config(
        url="amqp://old:old@h:5673/vhost",
        username_file=secret(tmp_path, "u", "  alice\n"),
        password_file=secret(tmp_path, "p", "s3cret/with@odd:chars\n"),
    )
    url = config.connection_url()
    assert (url.user, url.password, url.host, url.port, url.path) == (
        "alice",
        "s3cret/with@odd:chars",
        "h",
        5673,
        "/vhost",
    )
    assert config.ssl_context() is None  # amqp:// is plain TCP
    assert (
        rabbit_config(url="amqp://u@h/", password_file=secret(tmp_path, "p2", "x")).connection_url().user
        == "u"
    )


def test_unreadable_secret_and_tls_files_are_clear_errors(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(SourceError, match=r"source 'rabbitmq': cannot read username_file from '.*missing'"):
        rabbit_config(username_file=str(tmp_path / "missing")).connection_url()
    with pytest.raises(SourceError, match=r"password_file file .* is empty"):
        rabbit_config(url="amqp://u@h/", password_file=secret(tmp_path, "empty", "\n")).connection_url()
    bad = secret(tmp_path, "bad.pem", "not a certificate")
    with pytest.raises(
        SourceError, match=r"source 'rabbitmq': cannot load the TLS files \(tls_ca/tls_cert/tls_key\)"
    ):
        rabbit_config(url="amqps://h/", tls_ca=bad).ssl_context()
    context = rabbit_config(
        url="amqps://h/", tls_ca=str(pki.ca_file), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)
    ).ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert len(context.get_ca_certs()) == 1
