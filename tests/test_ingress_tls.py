"""HTTPS and HTTP/2 on the ingress listener (``[server] tls_cert`` / ``tls_key`` / ``http2``):
real daemons with certificates from a private CA (``trustme``), real clients (aiohttp for
HTTP/1.1 over TLS, httpx and the ``h2`` library for HTTP/2), raw sockets for the abuse cases
(plain HTTP to the TLS port, handshakes that never finish)."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
import trustme

from fastconn.config import validate_config
from fastconn.errors import ConfigError
from fastconn.testing import DaemonProcess, FunctionDouble, to_toml, wait_for
from gateway_double import FunctionSpec, GatewayDouble

if TYPE_CHECKING:
    from conftest import DaemonFactory


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def listener_pair(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """The listener's certificate (for 127.0.0.1 and localhost) and key, as PEM files."""
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "listener.crt", tmp_path / "listener.key"
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    yield str(path)


def _config(fn: FunctionDouble, pair: tuple[str, str], **server: Any) -> dict[str, Any]:
    return {
        "functions": [
            {"name": "echo", "url": fn.url("/echo"), "topics": ["t"]},
            {"name": "pushes", "url": fn.url("/pushes"), "topics": ["com.example.*"]},
        ],
        "sources": [{"type": "webhook", "max_body_bytes": 1024}, {"type": "cloudevents"}],
        "server": {"tls_cert": pair[0], "tls_key": pair[1], **server},
    }


def _host_port(daemon: DaemonProcess) -> tuple[str, int]:
    host, _, port = daemon.listen.rpartition(":")
    return host, int(port)


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closed the connection (EOF or reset) within ``timeout``; any bytes
    it sends first (a TLS alert) are read past."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            data = await asyncio.wait_for(reader.read(4096), left)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        if data == b"":
            return True


# ---------------------------------------------------------------------------- HTTPS, HTTP/1.1


async def test_webhooks_cloudevents_and_probes_over_https(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    daemon = await daemon_factory(_config(function_double, listener_pair))
    assert daemon.url.startswith("https://")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http:
        for path in ("/healthz", "/readyz"):
            async with http.get(daemon.url + path) as r:
                assert r.status == 200, path
        async with http.post(f"{daemon.url}/webhook/t", data=b"over tls", headers={"X-Shop": "7"}) as r:
            assert r.status == 202, await r.text()
            message_id = r.headers["X-Message-Id"]
        async with http.post(f"{daemon.url}/webhook/t?wait=true", data=b"and back") as r:
            assert r.status == 200, await r.text()
        async with http.post(f"{daemon.url}/webhook/t", data=b"x" * 1025) as r:
            assert r.status == 413
        event = {"specversion": "1.0", "id": "e-1", "source": "/s", "type": "com.example.push", "data": 1}
        headers = {"Content-Type": "application/cloudevents+json"}
        async with http.post(f"{daemon.url}/cloudevents", data=json.dumps(event), headers=headers) as r:
            assert r.status == 202, await r.text()
        async with http.get(daemon.url + "/metrics") as r:
            assert r.status == 200
    await wait_for(lambda: len(function_double.calls_to("/echo")) == 2, 10, what="two webhook deliveries")
    await wait_for(lambda: len(function_double.calls_to("/pushes")) == 1, 10, what="the cloudevent")
    [first] = [c for c in function_double.calls_to("/echo") if c.body == b"over tls"]
    assert (first.body, first.headers["X-Shop"], first.headers["X-Message-Id"]) == (
        b"over tls",
        "7",
        message_id,
    )
    assert function_double.calls_to("/pushes")[0].headers["ce-id"] == "e-1"


async def test_async_callbacks_come_back_over_https_to_a_derived_https_public_url(
    gateway: GatewayDouble,
    daemon_factory: DaemonFactory,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    gateway.set_functions([FunctionSpec("later", topic="jobs")])
    gateway.script("later", statuses=[200], callback_copies=0)  # the test plays the gateway's callback
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "sources": [{"type": "webhook", "asynchronous_invocation": True}],
        "server": {"tls_cert": listener_pair[0], "tls_key": listener_pair[1]},
    }
    daemon = await daemon_factory(config)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http:
        async with http.post(f"{daemon.url}/webhook/jobs", data=b"job") as r:
            assert r.status == 202
        await wait_for(lambda: gateway.calls("later") == 1, 5, what="the async call")
        [request] = gateway.requests_for("later")
        url, call_id = request.headers["X-Callback-Url"], request.headers["X-Call-Id"]
        assert url.startswith(f"https://{daemon.listen}/callback/"), url
        headers = {"X-Call-Id": call_id, "X-Function-Status": "200"}
        async with http.post(url, data=b"result", headers=headers) as r:
            assert r.status == 200, await r.text()
        async with http.post(url, data=b"result", headers=headers) as r:
            assert r.status == 409, "settled once"
    acked = 'fastconn_messages_acked_total{source="webhook"}'
    deadline = time.monotonic() + 5
    while (await daemon.metrics()).get(acked) != 1:
        assert time.monotonic() < deadline, "the message was not acknowledged"
        await asyncio.sleep(0.05)


async def test_plain_http_to_the_tls_port_is_closed_and_the_listener_keeps_serving(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    daemon = await daemon_factory(_config(function_double, listener_pair, header_timeout="30s"))
    host, port = _host_port(daemon)
    for _ in range(3):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /webhook/t HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
        try:
            # Long before header_timeout: the handshake fails on the first bytes.
            assert await _closed_by_server(reader, 5.0)
        finally:
            writer.close()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http,
        http.get(daemon.url + "/healthz") as r,
    ):
        assert r.status == 200
    assert function_double.calls_to("/echo") == [], "nothing of the cleartext request was served"
    output = daemon.output()
    assert "panick" not in output and "Traceback" not in output, output


async def test_stalled_handshakes_are_closed_within_header_timeout_and_count_against_the_cap(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    daemon = await daemon_factory(
        _config(function_double, listener_pair, header_timeout="1s", idle_timeout="30s", max_connections=50)
    )
    host, port = _host_port(daemon)
    started = time.monotonic()
    stalled = []
    # 80 connections that start a TLS record and never finish the ClientHello: past the cap
    # of 50 the oldest are evicted, the rest time out with the header deadline.
    for _ in range(80):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x16\x03\x01\x02\x00\x01")
        stalled.append((reader, writer))
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context)) as http,
            http.get(daemon.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            assert r.status == 200, "a real client gets in past the stalled handshakes"
        deadline = started + 1.0 + 4.0  # header_timeout + margin
        closed = await asyncio.gather(
            *(_closed_by_server(r, max(0.1, deadline - time.monotonic())) for r, _ in stalled)
        )
        assert all(closed), f"{len(closed) - sum(closed)} stalled handshake(s) still open"
    finally:
        for _, writer in stalled:
            writer.close()


# ---------------------------------------------------------------------------- configuration


def _server_problem(**server: str) -> tuple[str, str]:
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"functions": [{"name": "f", "url": "http://f", "topics": ["t"]}], "server": server})
    [problem] = excinfo.value.problems
    return problem.location, problem.message


def test_bad_listener_tls_files_are_config_errors_at_their_key(
    ca: trustme.CA, listener_pair: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = listener_pair
    other_key = tmp_path / "other.key"
    ca.issue_cert("other").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")

    location, message = _server_problem(tls_cert=str(tmp_path / "absent.pem"), tls_key=key)
    assert location == "server.tls_cert" and message.startswith("cannot read"), message
    assert "point tls_cert at a readable PEM file" in message
    location, message = _server_problem(tls_cert=str(garbage), tls_key=key)
    assert location == "server.tls_cert" and "no certificate found" in message, message
    location, message = _server_problem(tls_cert=cert, tls_key=str(garbage))
    assert location == "server.tls_key" and "no private key found" in message, message
    location, message = _server_problem(tls_cert=cert, tls_key=str(other_key))
    assert location == "server.tls_key" and "is not the private key of the certificate" in message, message
    assert "give tls_key the key" in message
    location, message = _server_problem(tls_cert=cert)
    assert location == "server.tls_key" and "required with tls_cert" in message
    location, message = _server_problem(tls_key=key)
    assert location == "server.tls_cert" and "required with tls_key" in message


def test_a_derived_public_url_says_https_with_a_certificate(listener_pair: tuple[str, str]) -> None:
    cert, key = listener_pair
    functions = [{"name": "f", "url": "http://f", "topics": ["t"]}]
    tls = validate_config(
        {"functions": functions, "server": {"listen": "0.0.0.0:8443", "tls_cert": cert, "tls_key": key}}
    )
    assert (tls.public_url, tls.public_url_derived) == ("https://127.0.0.1:8443", True)
    plain = validate_config({"functions": functions, "server": {"listen": "127.0.0.1:8081"}})
    assert plain.public_url == "http://127.0.0.1:8081"


async def test_check_refuses_a_key_that_does_not_match_the_certificate(
    ca: trustme.CA, listener_pair: tuple[str, str], tmp_path: Path
) -> None:
    other_key = tmp_path / "other.key"
    ca.issue_cert("other").private_key_pem.write_to_path(str(other_key))
    path = tmp_path / "tls.toml"
    config = {
        "server": {"listen": "127.0.0.1:0", "tls_cert": listener_pair[0], "tls_key": str(other_key)},
        "functions": [{"name": "f", "url": "http://127.0.0.1:1/f", "topics": ["t"]}],
    }
    path.write_text(to_toml(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastconn",
        "check",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 2, (out, text)
    assert "server.tls_key" in text and "is not the private key of the certificate" in text, text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------- HTTP/2


async def test_http2_over_tls_by_alpn_and_http1_on_the_same_port(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    daemon = await daemon_factory(_config(function_double, listener_pair, http2=True))
    async with httpx.AsyncClient(http2=True, verify=client_context) as client:
        replies = await asyncio.gather(
            *(client.post(f"{daemon.url}/webhook/t", content=f"h2 {i}".encode()) for i in range(20))
        )
        assert {r.http_version for r in replies} == {"HTTP/2"}
        assert [r.status_code for r in replies] == [202] * 20
        big = await client.post(f"{daemon.url}/webhook/t", content=b"x" * 1025)
        assert (big.http_version, big.status_code) == ("HTTP/2", 413), "the body limit holds per stream"
        health = await client.get(f"{daemon.url}/healthz")
        assert (health.http_version, health.status_code) == ("HTTP/2", 200)
    async with httpx.AsyncClient(http2=False, verify=client_context) as client:
        reply = await client.post(f"{daemon.url}/webhook/t", content=b"h1")
        assert (reply.http_version, reply.status_code) == ("HTTP/1.1", 202)
    await wait_for(lambda: len(function_double.calls_to("/echo")) == 21, 10, what="21 deliveries")
    assert sorted(c.body for c in function_double.calls_to("/echo")) == sorted(
        [f"h2 {i}".encode() for i in range(20)] + [b"h1"]
    )


async def test_without_http2_tls_offers_http1_only(
    daemon_factory: DaemonFactory,
    function_double: FunctionDouble,
    listener_pair: tuple[str, str],
    client_context: ssl.SSLContext,
) -> None:
    daemon = await daemon_factory(_config(function_double, listener_pair))
    async with httpx.AsyncClient(http2=True, verify=client_context) as client:
        reply = await client.post(f"{daemon.url}/webhook/t", content=b"x")
    assert (reply.http_version, reply.status_code) == ("HTTP/1.1", 202)


async def test_cleartext_h2c_prior_knowledge_announces_the_stream_bound(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    config = {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t"]}],
        "sources": [{"type": "webhook"}],
        "server": {"http2": True, "http2_max_concurrent_streams": 7},
    }
    daemon = await daemon_factory(config)
    # httpx speaks prior-knowledge h2c with HTTP/1.1 off.
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        replies = await asyncio.gather(
            *(client.post(f"{daemon.url}/webhook/t", content=f"c{i}".encode()) for i in range(10))
        )
    assert {(r.http_version, r.status_code) for r in replies} == {("HTTP/2", 202)}
    async with httpx.AsyncClient() as client:
        plain = await client.post(f"{daemon.url}/webhook/t", content=b"h1")
    assert (plain.http_version, plain.status_code) == ("HTTP/1.1", 202)
    # The server's SETTINGS carry the bound, read with the h2 library over a raw socket.
    host, port = _host_port(daemon)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bound = None
        deadline = time.monotonic() + 5
        while bound is None:
            data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
            assert data, "the server closed before sending its settings"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    setting = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    bound = setting.new_value if setting else -1
    finally:
        writer.close()
    assert bound == 7
    await wait_for(lambda: len(function_double.calls_to("/echo")) == 11, 10, what="11 deliveries")


async def test_an_http2_connection_that_never_sends_a_request_is_closed_within_header_timeout(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    config = {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t"]}],
        "sources": [{"type": "webhook"}],
        "server": {"http2": True, "header_timeout": "1s", "idle_timeout": "30s"},
    }
    daemon = await daemon_factory(config)
    host, port = _host_port(daemon)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        # The preface and SETTINGS, then nothing: an h2 slowloris.
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        started = time.monotonic()
        assert await _closed_by_server(reader, 5.0), "the silent h2 connection is still open"
        assert time.monotonic() - started < 4.0
    finally:
        writer.close()
