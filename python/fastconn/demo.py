"""``fastconn demo``: a working pipeline on a bare machine, no broker and no gateway.

It serves a sample function (``shout``: upper-cases the body) in-process, runs the daemon with
a webhook source and a static function bound to ``demo.*``, feeds it events over HTTP, and
prints what flows and the live rate. Swap the ``[[functions]]``/``[[sources]]`` for a real
gateway and broker to go further (see the README's configuration reference).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from fastconn.config import validate_config
from fastconn.daemon import Daemon


async def _start_sample_function() -> tuple[web.AppRunner, int, list[int]]:
    calls = [0]

    async def shout(request: web.Request) -> web.Response:
        calls[0] += 1
        body = await request.read()
        return web.Response(body=body.upper(), content_type="text/plain")

    app = web.Application()
    app.router.add_post("/function/shout", shout)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port, calls


async def demo(seconds: float = 5.0, listen: str = "127.0.0.1:0") -> int:
    function_runner, port, calls = await _start_sample_function()
    config = validate_config(
        {
            "server": {"listen": listen},
            "functions": [
                {"name": "shout", "url": f"http://127.0.0.1:{port}/function/shout", "topics": ["demo.*"]}
            ],
            "sources": [{"type": "webhook"}],
        }
    )
    daemon = Daemon(config)
    await daemon.start()
    base = daemon.ingress.url
    print(f"fastconn demo: webhook source at {base}/webhook/<topic>, function 'shout' on demo.*")
    print(f"  try: curl -d 'hello' '{base}/webhook/demo.greeting?wait=true'")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/webhook/demo.greeting?wait=true", data=b"hello fastconn") as r:
                print(f"  demo.greeting 'hello fastconn' -> shout [{r.status}] {(await r.read()).decode()!r}")
            sent = await _feed(http, base, seconds)
        print(f"done: {sent} events sent, {calls[0]} function calls, metrics at {base}/metrics")
    finally:
        await daemon.shutdown()
        await function_runner.cleanup()
    return 0


async def _feed(http: aiohttp.ClientSession, base: str, seconds: float) -> int:
    """Posts events from 32 concurrent senders, printing the rate once a second."""
    sent = 0
    deadline = time.monotonic() + seconds

    async def sender(worker: int) -> None:
        nonlocal sent
        i = 0
        while time.monotonic() < deadline:
            async with http.post(f"{base}/webhook/demo.orders", data=f"order {worker}-{i}".encode()) as r:
                if r.status == 202:
                    sent += 1
                else:
                    await asyncio.sleep(0.05)  # 503 under backpressure: back off as told
            i += 1

    async def reporter() -> None:
        last, last_t = 0, time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            print(f"  {sent - last:6d} events in the last second ({(sent - last) / (now - last_t):,.0f}/s)")
            last, last_t = sent, now

    await asyncio.gather(reporter(), *(sender(w) for w in range(32)))
    return sent
