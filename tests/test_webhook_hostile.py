"""The webhook source against malformed requests, sent as raw bytes over real connections: a clear
4xx naming the problem, one rate-limited log line, never a traceback or a silent drop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from gateway_double import GatewayDouble

if TYPE_CHECKING:
    from conftest import DaemonFactory


def _config(function_double: FunctionDouble, **source: Any) -> dict[str, Any]:
    return {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t", "a.>", "a/#"]}],
        "sources": [{"type": "webhook", **source}],
    }


async def _raw(daemon: DaemonProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends ``request`` as is; returns status, headers (lower-case names) and body."""
    host, _, port = daemon.listen.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


def _post(path: str, body: bytes = b"hi", extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: fastconn\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


async def test_a_header_value_that_is_not_utf8_is_dropped_not_a_500(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double))
    status, _, body = await _raw(
        daemon, _post("/webhook/t?wait=true", extra=b"X-Bad: \xff\xfe\r\nX-Good: yes\r\n")
    )
    assert (status, body) == (200, b"hi")
    call = function_double.calls_to("/echo")[0]
    assert call.headers["X-Good"] == "yes"
    assert "X-Bad" not in call.headers
    assert "Traceback" not in daemon.output()


async def test_a_non_utf8_bearer_token_is_a_401_not_a_500(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double, auth_token="s3cret", hmac_secret="k"))
    status, _, _ = await _raw(daemon, _post("/webhook/t", extra=b"Authorization: Bearer \xff\r\n"))
    assert status == 401
    status, _, _ = await _raw(
        daemon, _post("/webhook/t", extra=b"Authorization: Bearer s3cret\r\nX-Hub-Signature-256: \xff\r\n")
    )
    assert status == 401
    assert "Traceback" not in daemon.output()


@pytest.mark.parametrize(
    ("path", "named"),
    [
        ("/webhook/a%00b", "U+0000"),
        ("/webhook/a%0Ab", "U+000A"),
        ("/webhook/a.*", "'*'"),
        ("/webhook/a.%3E", "'>'"),
        ("/webhook/a/%23", "'#'"),
        ("/webhook/a/+/b", "'+'"),
    ],
)
async def test_topics_that_are_not_concrete_get_a_clear_400(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, path: str, named: str
) -> None:
    daemon = await daemon_factory(_config(function_double))
    status, _, body = await _raw(daemon, _post(path + "?wait=true"))
    assert status == 400, body
    error = json.loads(body)["error"]
    assert named in error, error
    assert "wildcard" in error or "control character" in error
    assert function_double.calls_to("/echo") == []
    await wait_for(lambda: "bad request" in daemon.output(), 5, what="the log line")
    assert "Traceback" not in daemon.output()


async def test_bad_requests_are_logged_rate_limited(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double))
    for _ in range(20):
        status, _, _ = await _raw(daemon, _post("/webhook/a.*"))
        assert status == 400
    # A plus sign inside a token is a literal, as in the router: accepted.
    status, _, _ = await _raw(daemon, _post("/webhook/c++"))
    assert status == 202
    await wait_for(lambda: "bad request" in daemon.output(), 5, what="the log line")
    assert daemon.output().count("bad request") == 1


async def test_a_webhook_request_before_the_first_topic_map_gets_503_at_once(
    gateway: GatewayDouble, daemon_factory: DaemonFactory
) -> None:
    gateway.set_down()  # /system/* answers 500: no topic map
    config = {"gateway": {"url": gateway.url, "startup_wait": "30s"}, "sources": [{"type": "webhook"}]}
    daemon = await daemon_factory(config, wait="health")
    started = time.monotonic()
    status, headers, body = await _raw(daemon, _post("/webhook/t"))
    assert time.monotonic() - started < 1.0
    assert (status, headers.get("retry-after")) == (503, "1"), body
    assert b"topic map not loaded" in body


async def test_unparsable_requests_get_400_and_one_line_without_traceback(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double))
    for request in (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",  # header too long
        b"POST /webhook/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk
    ):
        status, _, _ = await _raw(daemon, request)
        assert status == 400
    await wait_for(lambda: "malformed HTTP request" in daemon.output(), 5, what="the log line")
    assert daemon.output().count("malformed HTTP request") == 1, "rate-limited"
    assert "Traceback" not in daemon.output()


async def test_a_body_cut_short_is_one_line_without_traceback(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double))
    host, _, port = daemon.listen.rpartition(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /webhook/t HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this")
    await writer.drain()
    writer.close()  # the sender goes away mid-body
    await wait_for(lambda: "did not arrive whole" in daemon.output(), 5, what="the log line")
    assert "Traceback" not in daemon.output()
    assert function_double.calls_to("/echo") == []


async def test_a_callback_with_an_undecodable_call_id_is_refused_without_traceback(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_config(function_double))
    status, _, _ = await _raw(daemon, _post("/callback/abc", extra=b"X-Call-Id: \xff\xfe\r\n"))
    assert status == 401
    assert "Traceback" not in daemon.output()
