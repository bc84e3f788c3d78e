"""The ingress server in the Rust core, over real connections: Python routes served in batches
(a slow handler holds up only its own request, a raising one answers 500), body limits with and
without Content-Length, unknown paths, header injection both ways, 2,000 idle connections while
webhooks keep answering, readiness pushed from Python, and ``admin_listen`` separation."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from fastconn import Dispatcher, DispatchOptions, testing
from fastconn.http_routes import HttpRequest, HttpResponse, Route, text_response
from fastconn.ingress import Ingress, IngressLimits
from fastconn.testing import DaemonProcess, FunctionDouble, free_port, wait_for
from gateway_double import FunctionSpec, GatewayDouble

if TYPE_CHECKING:
    from conftest import DaemonFactory


@pytest.fixture
async def ingress() -> AsyncIterator[Ingress]:
    """An ingress on a free port of a started dispatcher (no functions), no routes yet."""
    dispatcher = Dispatcher(DispatchOptions())
    await dispatcher.start()
    server = Ingress(dispatcher, "127.0.0.1:0", IngressLimits(header_timeout=5.0, idle_timeout=30.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        await dispatcher.close(1)


async def _raw(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


async def test_python_routes_run_concurrently_in_batches_and_a_raising_handler_answers_500(
    ingress: Ingress, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    seen: list[HttpRequest] = []

    async def slow(request: HttpRequest) -> HttpResponse:
        await release.wait()
        return text_response(200, "slow")

    async def fast(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(201, (("X-Echo", request.header("x-token") or ""),), request.body[::-1])

    async def broken(_: HttpRequest) -> HttpResponse:
        raise ValueError("secret internals")

    ingress.add_route(Route("GET", "/slow", slow, name="t"))
    ingress.add_route(Route("POST", "/fast", fast, max_body_bytes=16, name="t"))
    ingress.add_route(Route("POST", "/broken", broken, name="t"))
    url = ingress.url
    slow_request = asyncio.ensure_future(http.get(f"{url}/slow"))
    await asyncio.sleep(0)  # the slow one is queued first
    started = time.monotonic()
    replies = await asyncio.gather(
        *(
            http.post(f"{url}/fast?a=1&a=2&b=%20", data=b"abc", headers={"X-Token": f"t{i}"})
            for i in range(50)
        )
    )
    for i, reply in enumerate(replies):
        assert (reply.status, reply.headers["X-Echo"], await reply.read()) == (201, f"t{i}", b"cba")
    assert time.monotonic() - started < 5, "the fast requests did not wait for the slow one"
    assert not slow_request.done(), "the slow handler is still running"
    async with http.post(f"{url}/broken", data=b"x") as r:
        assert r.status == 500
        assert "secret internals" not in await r.text()
    release.set()
    async with await slow_request as r:
        assert (r.status, await r.text()) == (200, "slow\n")
    request = seen[0]
    assert (request.method, request.path, request.body) == ("POST", "/fast", b"abc")
    assert request.query == (("a", "1"), ("a", "2"), ("b", " "))
    assert request.remote.startswith("127.0.0.1:")


async def test_python_route_limits_methods_and_unknown_paths(
    ingress: Ingress, http: aiohttp.ClientSession
) -> None:
    calls: list[bytes] = []

    async def hook(request: HttpRequest) -> HttpResponse:
        calls.append(request.body)
        return text_response(200, "ok")

    ingress.add_route(Route("POST", "/hook", hook, max_body_bytes=1000, name="t"))
    url = ingress.url
    async with http.post(f"{url}/hook", data=b"x" * 1001) as r:
        assert r.status == 413 and "over 1000 bytes" in await r.text()

    async def chunks() -> Any:  # no Content-Length: refused while reading
        for _ in range(5):
            yield b"y" * 300

    async with http.post(f"{url}/hook", data=chunks()) as r:
        assert r.status == 413

    async def small_chunks() -> Any:
        for _ in range(4):
            yield b"c" * 250

    async with http.post(f"{url}/hook", data=small_chunks()) as r:
        assert r.status == 200
    async with http.get(f"{url}/hook") as r:
        assert (r.status, r.headers["Allow"]) == (405, "POST")
    async with http.get(f"{url}/nothing/here") as r:
        assert r.status == 404
    async with http.get(f"{url}/healthz") as r:
        assert (r.status, await r.text()) == (200, "ok\n")
    assert calls == [b"c" * 1000]


async def test_readiness_is_what_python_pushed(ingress: Ingress, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{ingress.url}/readyz") as r:
        assert (r.status, await r.text()) == (503, "starting\n")
    ingress.set_ready(True, "ready", True)
    async with http.get(f"{ingress.url}/readyz") as r:
        assert (r.status, await r.text()) == (200, "ready\n")
    ingress.set_ready(False, "source x: broker down", True)
    async with http.get(f"{ingress.url}/readyz") as r:
        assert (r.status, await r.text()) == (503, "source x: broker down\n")


async def test_a_python_answer_cannot_split_the_response(ingress: Ingress) -> None:
    async def evil(_: HttpRequest) -> HttpResponse:
        return HttpResponse(200, (("X-Ok", "1"), ("X-Evil", "a\r\nSet-Cookie: stolen=1")), b"body")

    ingress.add_route(Route("GET", "/evil", evil, name="t"))
    status, headers, body = await _raw(ingress.host, ingress.port, b"GET /evil HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body, headers.get("x-ok")) == (200, b"body", "1")
    assert "set-cookie" not in headers and "x-evil" not in headers


def _webhook_config(function_double: FunctionDouble, **server: Any) -> dict[str, Any]:
    return {
        "functions": [{"name": "echo", "url": function_double.url("/echo"), "topics": ["t"]}],
        "sources": [{"type": "webhook", "max_body_bytes": 1024}],
        "server": server,
    }


async def test_webhook_bodies_over_the_limit_with_and_without_content_length(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_webhook_config(function_double))
    host, _, port = daemon.listen.rpartition(":")
    post = b"POST /webhook/t HTTP/1.1\r\nHost: x\r\n"
    status, _, body = await _raw(host, int(port), post + b"Content-Length: 1025\r\n\r\n" + b"x" * 1025)
    assert status == 413 and b"max_body_bytes" in body
    # Announced as huge, never sent: refused from the header alone.
    status, _, _ = await _raw(host, int(port), post + b"Content-Length: 1000000000\r\n\r\n")
    assert status == 413
    chunk = b"400\r\n" + b"y" * 1024 + b"\r\n"
    status, _, body = await _raw(host, int(port), post + b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3)
    assert status == 413 and b"max_body_bytes" in body
    status, _, _ = await _raw(
        host, int(port), post + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n"
    )
    assert status == 202
    await wait_for(lambda: len(function_double.calls_to("/echo")) == 1, 5, what="the accepted body")
    assert function_double.calls_to("/echo")[0].body == b"y" * 1024


async def test_crlf_in_a_header_value_never_smuggles_a_callback_header_to_a_function(
    daemon_factory: DaemonFactory, function_double: FunctionDouble
) -> None:
    daemon = await daemon_factory(_webhook_config(function_double))
    host, _, port = daemon.listen.rpartition(":")
    for injected, refused in (
        (b"X-Inject: a\rX-Callback-Url: http://evil/\r\n", True),  # a bare CR: unparsable
        (b"X-Inject: a\r\n X-Callback-Url: http://evil/\r\n", True),  # obsolete line folding
        # A bare LF ends a line (RFC 9112 lets a recipient take it so): two header fields, and
        # the second is one only fastconn sets, so it is dropped.
        (b"X-Inject: a\nX-Call-Id: stolen\r\nX-Callback-Url: http://evil/\r\n", False),
    ):
        request = (
            b"POST /webhook/t?wait=true HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + injected + b"\r\nhi"
        )
        status, _, _ = await _raw(host, int(port), request)
        assert status == (400 if refused else 200), injected
    [call] = function_double.calls_to("/echo")
    assert call.headers["X-Inject"] == "a"
    assert "X-Call-Id" not in call.headers and "X-Callback-Url" not in call.headers
    assert "Traceback" not in daemon.output()


async def test_two_thousand_idle_connections_and_webhooks_keep_answering(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(
        _webhook_config(function_double, max_connections=4096, header_timeout="60s", idle_timeout="60s")
    )
    host, _, port = daemon.listen.rpartition(":")
    idle = []
    try:
        for _ in range(2000):
            idle.append(await asyncio.open_connection(host, int(port)))
        for i in range(20):
            started = time.monotonic()
            async with http.post(f"{daemon.url}/webhook/t", data=f"m{i}".encode()) as r:
                assert r.status == 202
            assert time.monotonic() - started < 2.0
        await wait_for(lambda: len(function_double.calls_to("/echo")) == 20, 10, what="20 deliveries")
        # The idle ones are still open (nothing closed them: under the cap, within the timeout).
        reader, _ = idle[0]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
    finally:
        for _, writer in idle:
            writer.close()


async def test_admin_listen_takes_metrics_off_the_public_listener(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    admin_port = free_port()
    daemon = await daemon_factory(_webhook_config(function_double, admin_listen=str(admin_port)))
    async with http.get(f"{daemon.url}/metrics") as r:
        assert r.status == 404
    async with http.get(f"{daemon.url}/healthz") as r:
        assert r.status == 200
    async with http.post(f"{daemon.url}/webhook/t", data=b"x") as r:
        assert r.status == 202
    async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as r:
        assert r.status == 200
        assert "fastconn_messages_received_total" in await r.text()
    async with http.post(f"http://127.0.0.1:{admin_port}/webhook/t", data=b"x") as r:
        assert r.status == 404, "events are not served on the admin listener"


def test_free_port_never_hands_out_a_port_twice() -> None:
    picks = [free_port() for _ in range(200)]
    assert len(set(picks)) == len(picks)


async def test_the_daemon_harness_picks_another_port_when_its_pick_was_taken(
    function_double: FunctionDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked for a test daemon can be taken before the daemon binds it (by any
    process's outgoing connection); the harness then starts it on another, instead of failing
    the test that needed a daemon."""
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        taken = thief.getsockname()[1]
        picks = iter([taken])
        pick = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(picks, None) or pick())
        daemon = DaemonProcess(_webhook_config(function_double), tmp_path)
        assert daemon.listen == f"127.0.0.1:{taken}"
        try:
            await daemon.start()
            assert daemon.listen != f"127.0.0.1:{taken}"
            async with aiohttp.ClientSession() as http, http.get(f"{daemon.url}/healthz") as r:
                assert r.status == 200
        finally:
            assert await daemon.stop() == 0


async def test_without_admin_listen_metrics_answer_on_listen(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(_webhook_config(function_double))
    async with http.get(f"{daemon.url}/metrics") as r:
        assert r.status == 200 and "fastconn_" in await r.text()


async def test_callbacks_through_the_ingress_settle_exactly_once(
    gateway: GatewayDouble, daemon_factory: DaemonFactory, http: aiohttp.ClientSession
) -> None:
    gateway.set_functions([FunctionSpec("later", topic="jobs")])
    gateway.script("later", statuses=[200], callback_copies=0)  # the test is the gateway here
    config = {
        "gateway": {"url": gateway.url, "rebuild_interval": "200ms"},
        "sources": [{"type": "webhook", "asynchronous_invocation": True}],
    }
    daemon = await daemon_factory(config)
    async with http.post(f"{daemon.url}/webhook/jobs", data=b"job") as r:
        assert r.status == 202
    await wait_for(lambda: gateway.calls("later") == 1, 5, what="the async call")
    [request] = gateway.requests_for("later")
    url, call_id = request.headers["X-Callback-Url"], request.headers["X-Call-Id"]
    assert url.startswith(daemon.url + "/callback/")

    async def callback(target: str, cid: str) -> int:
        headers = {"X-Call-Id": cid, "X-Function-Status": "200"}
        async with http.post(target, data=b"result", headers=headers) as reply:
            return reply.status

    assert await callback(url + "0", call_id) == 401, "a forged token"
    assert await callback(url, call_id + "x") == 401, "a token of another call id"
    statuses = await asyncio.gather(*(callback(url, call_id) for _ in range(4)))
    assert sorted(statuses) == [200, 409, 409, 409], "one copy settles, the others are duplicates"
    acked = 'fastconn_messages_acked_total{source="webhook"}'
    deadline = time.monotonic() + 5
    while (await daemon.metrics()).get(acked) != 1:
        assert time.monotonic() < deadline, "the message was not acknowledged once"
        await asyncio.sleep(0.05)


def test_admin_listen_alone_as_a_port_means_loopback() -> None:
    from fastconn.config import ServerConfig

    assert ServerConfig(admin_listen="9090").admin_listen == "127.0.0.1:9090"
    assert ServerConfig(admin_listen=":9090").admin_listen == "127.0.0.1:9090"
    assert ServerConfig(admin_listen="0.0.0.0:9090").admin_listen == "0.0.0.0:9090"
    assert ServerConfig().admin_listen is None
    with pytest.raises(ValueError, match="host:port"):
        ServerConfig(admin_listen="nope")


async def test_webhook_messages_accepted_in_the_core_reach_pythons_metrics_and_request_log(
    daemon_factory: DaemonFactory, function_double: FunctionDouble, http: aiohttp.ClientSession
) -> None:
    config = _webhook_config(function_double)
    config["dispatch"] = {"print_request_body": True}
    daemon = await daemon_factory(config)
    for body in (b"first", b"second"):
        async with http.post(f"{daemon.url}/webhook/t", data=body) as r:
            assert r.status == 202 and len(r.headers["X-Message-Id"]) == 32
    await wait_for(lambda: "t => b'second'" in daemon.output(), 5, what="the request log line")
    assert "t => b'first'" in daemon.output()
    received = 'fastconn_messages_received_total{source="webhook",topic="t"}'
    acked = 'fastconn_messages_acked_total{source="webhook"}'
    deadline = time.monotonic() + 5
    while (samples := await daemon.metrics()).get(acked) != 2:
        assert time.monotonic() < deadline, samples.get(acked)
        await asyncio.sleep(0.05)
    assert samples[received] == 2
