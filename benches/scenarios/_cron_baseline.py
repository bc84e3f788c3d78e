"""The naive cron baseline: one asyncio task per function computing its next fire with
croniter, sleeping until then and POSTing through aiohttp (at most ``--inflight`` calls on the
wire, uvloop), with the same ``X-Cron-Scheduled-Time`` header fastconn sends. Run from
``benches/`` as ``python -m scenarios._cron_baseline --sink URL --functions N --schedule S``;
prints ``ready`` once scheduled, runs until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from datetime import UTC, datetime

import aiohttp
import uvloop
from croniter import croniter


async def fire_forever(
    url: str, schedule: str, http: aiohttp.ClientSession, slots: asyncio.Semaphore
) -> None:
    it = croniter(schedule, datetime.now(UTC), second_at_beginning=len(schedule.split()) == 6)
    while True:
        slot = it.get_next(datetime)
        await asyncio.sleep(max(0.0, slot.timestamp() - time.time()))
        when = slot.isoformat().replace("+00:00", "Z")
        async with slots:
            headers = {"X-Topic": "cron-function", "X-Cron-Scheduled-Time": when}
            try:
                async with http.post(url, data=b"", headers=headers) as r:
                    await r.read()
            except aiohttp.ClientError:
                pass


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    slots = asyncio.Semaphore(args.inflight)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.inflight)) as http:
        tasks = [
            asyncio.create_task(fire_forever(f"{args.sink}/function/f{i}", args.schedule, http, slots))
            for i in range(args.functions)
        ]
        print("ready", flush=True)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sink", required=True)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--functions", type=int, default=1000)
    parser.add_argument("--schedule", default="* * * * * *")
    uvloop.run(main(parser.parse_args()))
