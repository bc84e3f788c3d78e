"""fastconn._compat: each use of a library's private parts works with the installed release.
These fail when a library update renames or drops what fastconn relies on."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from fastconn._compat import nats_can_write_raw, nats_write_raw, raise_client_max_size
from fastconn.testing import free_port
from nats_fixtures import NatsServer, connected, nats_server, unique

__all__ = ["nats_server"]  # the fixture is used by name


async def test_nats_raw_write_delivers_each_publish(nats_server: NatsServer) -> None:
    subject = unique("compat.raw")
    async with connected(nats_server.url) as nc:
        assert nats_can_write_raw(nc)
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_msg(msg: object) -> None:
            await got.put(msg.data)  # type: ignore[attr-defined]

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        blob = b"".join(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(p), p) for p in (b"a", b"", b"ccc"))
        await nats_write_raw(nc, blob)
        received = [await asyncio.wait_for(got.get(), 5) for _ in range(3)]
    assert received == [b"a", b"", b"ccc"]


def test_raw_write_needs_the_command_buffer() -> None:
    assert not nats_can_write_raw(object())


async def test_raised_client_max_size_accepts_a_larger_body() -> None:
    async def echo_size(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = web.Application()  # default limit: 1 MiB
    app.router.add_post("/", echo_size)
    raise_client_max_size(app, 3 * 1024 * 1024)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        body = b"x" * (2 * 1024 * 1024)
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://127.0.0.1:{port}/", data=body) as response,
        ):
            assert response.status == 200
            assert await response.text() == str(len(body))
    finally:
        await runner.cleanup()
