"""A source's own HTTP route served on the admin server: plain data in and out, body limits,
method check, and a failing handler answered 500 without taking the server down."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from fastconn.http_routes import HttpRequest, HttpResponse, Route, add_to_aiohttp, text_response
from fastconn.testing import free_port


async def _serve(*routes: Route) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for route in routes:
        add_to_aiohttp(app, route)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_handler_sees_plain_request_and_its_answer_is_sent() -> None:
    seen: list[HttpRequest] = []

    async def echo(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return HttpResponse(201, (("X-Echo", request.header("x-token") or ""),), request.body[::-1])

    runner, url = await _serve(Route("POST", "/hook", echo, max_body_bytes=16, name="t"))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/hook?a=1&a=2&b=3", data=b"abc", headers={"X-Token": "t0"}) as r:
                assert (r.status, r.headers["X-Echo"], await r.read()) == (201, "t0", b"cba")
            async with http.post(f"{url}/hook", data=b"x" * 17) as r:
                assert r.status == 413
                assert "over 16 bytes" in await r.text()

            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(5):
                    yield b"xxxx"

            async with http.post(f"{url}/hook", data=chunks()) as r:
                assert r.status == 413
            async with http.get(f"{url}/hook") as r:
                assert (r.status, r.headers["Allow"]) == (405, "POST")
    finally:
        await runner.cleanup()
    assert len(seen) == 1
    request = seen[0]
    assert (request.method, request.path, request.body) == ("POST", "/hook", b"abc")
    assert request.query == (("a", "1"), ("a", "2"), ("b", "3"))
    assert request.query_value("a") == "1" and request.query_value("c") is None
    assert request.header("X-TOKEN") == "t0"
    assert request.remote.startswith("127.0.0.1:")


async def test_a_failing_handler_answers_500_and_the_server_keeps_serving() -> None:
    async def broken(_: HttpRequest) -> HttpResponse:
        raise ValueError("bug")

    async def fine(_: HttpRequest) -> HttpResponse:
        return text_response(200, "fine")

    runner, url = await _serve(Route("POST", "/broken", broken), Route("POST", "/fine", fine))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/broken", data=b"x") as r:
                assert r.status == 500
                assert "bug" not in await r.text()  # no internals to the client
            async with http.post(f"{url}/fine", data=b"x") as r:
                assert (r.status, await r.text()) == (200, "fine\n")
    finally:
        await runner.cleanup()
