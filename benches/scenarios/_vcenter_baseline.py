"""The naive vCenter baseline: what the vcenter-connector does, in Python: pyvmomi polls the
latest page of one event history collector (page 1,000) every ``--poll`` in a thread; each event
above the last key seen becomes JSON through pyVmomi's own ``VmomiJSONEncoder`` and is POSTed
through aiohttp (at most ``--inflight`` calls on the wire, uvloop). No checkpoint, no retry.
Run from ``benches/`` as ``python -m scenarios._vcenter_baseline --sink URL --url SDK
--after-key K``; prints ``ready`` once it polls, runs until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import uvloop
from pyVim import connect
from pyVmomi import vim
from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder


def login(url: str) -> Any:
    parts = urlsplit(url)
    si = connect.SmartConnect(
        protocol=parts.scheme, host=parts.hostname, port=parts.port, path=parts.path, user="u", pwd="p"
    )
    manager = si.RetrieveContent().eventManager
    return manager.CreateCollectorForEvents(filter=vim.event.EventFilterSpec(maxCount=1000))


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    collector = await asyncio.to_thread(login, args.url)
    slots = asyncio.Semaphore(args.inflight)
    tasks: set[asyncio.Task[None]] = set()
    last = args.after_key
    url = f"{args.sink}/function/f0"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.inflight)) as http:

        async def post(body: str, topic: str) -> None:
            try:
                headers = {"Content-Type": "application/json", "X-Topic": topic}
                async with http.post(url, data=body, headers=headers) as r:
                    await r.read()
            finally:
                slots.release()

        print("ready", flush=True)
        while not stop.is_set():
            page = await asyncio.to_thread(lambda: list(collector.latestPage or []))
            for event in sorted((e for e in page if e.key > last), key=lambda e: e.key):
                last = event.key
                body = json.dumps(event, cls=VmomiJSONEncoder)
                await slots.acquire()
                task = asyncio.create_task(post(body, event._wsdlName))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.poll)
        if tasks:
            await asyncio.wait(tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sink", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--after-key", type=int, default=0)
    parser.add_argument("--poll", type=float, default=0.05)
    uvloop.run(main(parser.parse_args()))
