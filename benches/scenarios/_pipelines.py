"""The naive Python pipelines fastconn is compared with: what a competent developer writes
with the usual asyncio libraries in an afternoon. Same in-flight bound as fastconn (a
semaphore of ``--inflight`` calls on the wire), one aiohttp session with a keep-alive pool of
that size, uvloop. Run from ``benches/`` as ``python -m scenarios._pipelines KIND ...``;
prints ``ready`` once it consumes, runs until SIGTERM.

* ``webhook``: an aiohttp server; ``POST /webhook/<topic>`` answers 202 once the call is
  started (waiting for a free slot first, which is its backpressure).
* ``nats``: a nats-py subscription whose callback waits for a slot and starts the call.
* ``jetstream``: a nats-py pull subscription (fetch, call, ack after success).
* ``kafka``: aiokafka ``getmany``, call every record, commit after the batch succeeded.
* ``rabbitmq``: an aio-pika consumer (prefetch = the in-flight bound), ack after success.
* ``mqtt``: paho-mqtt 2 with manual acknowledgement (aiomqtt 2 cannot acknowledge after the
  call), its network thread handing each message to the loop; PUBACK after the call succeeded.
* ``sqs``: aiobotocore long polls (10 messages per receive, enough pollers to keep the
  in-flight bound busy), a call per message, ``DeleteMessageBatch`` of a receive's messages
  once their calls succeeded (failed ones reappear after the visibility timeout).
* ``postgres``: asyncpg peeks a batch of a logical replication slot (pgoutput), decodes it with
  fastconn's decoder (the naive part is the pipeline, not the parsing), calls every change and
  advances the slot after the batch succeeded.
* ``pushbullet``: the OpenFaaS Pushbullet connector's loop, polling instead of the stream: list
  pushes one per request (``limit=1``, following the cursor), look the channel's tag up with
  ``GET /v2/subscriptions`` for every push and call it at once; ``modified_after`` moves to the
  newest push once the listing is read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop


class Forwarder:
    """Calls every function for a message with at most ``inflight`` calls on the wire."""

    def __init__(self, sink: str, inflight: int, fanout: int) -> None:
        self.urls = [f"{sink}/function/f{i}" for i in range(fanout)]
        self.slots = asyncio.Semaphore(inflight)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=inflight))
        self.failed = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def _call(self, url: str, topic: str, body: bytes) -> bool:
        try:
            headers = {"Content-Type": "text/plain", "X-Topic": topic}
            async with self.http.post(url, data=body, headers=headers) as r:
                await r.read()
                return r.status == 200
        finally:
            self.slots.release()

    async def start(
        self, topic: str, body: bytes, done: Callable[[bool], Awaitable[None]] | None = None
    ) -> None:
        """Waits for slots (backpressure), then starts the calls; ``done(ok)`` after all."""
        calls = []
        for url in self.urls:
            await self.slots.acquire()
            calls.append(asyncio.ensure_future(self._call(url, topic, body)))

        async def finish() -> None:
            ok = all(await asyncio.gather(*calls))
            if not ok:
                self.failed += 1
            if done is not None:
                await done(ok)

        task = asyncio.create_task(finish())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)
        await self.http.close()


async def webhook(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    from aiohttp import web

    accepted = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal accepted
        body = await request.read()
        await fwd.start(request.match_info["topic"], body)
        accepted += 1
        return web.Response(status=202, text="accepted\n")

    async def count(_request: web.Request) -> web.Response:
        return web.Response(text=str(accepted))

    app = web.Application()
    app.router.add_post("/webhook/{topic}", handle)
    app.router.add_get("/count", count)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    ready()
    await stop.wait()
    await runner.cleanup()


async def nats_core(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    import nats

    nc = await nats.connect(args.server)

    async def on_message(msg: Any) -> None:
        await fwd.start(msg.subject, msg.data)

    await nc.subscribe(args.subject, queue="baseline", cb=on_message)
    await nc.flush()
    ready()
    await stop.wait()
    await nc.close()


async def jetstream(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import ConsumerConfig, DeliverPolicy

    nc = await nats.connect(args.server)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        args.subject,
        durable=args.group,
        stream=args.stream,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, max_ack_pending=1000),
    )
    ready()
    while not stop.is_set():
        try:
            messages = await sub.fetch(args.inflight, timeout=0.5)
        except NatsTimeout:
            continue
        for msg in messages:

            async def settle(ok: bool, msg: Any = msg) -> None:
                await (msg.ack() if ok else msg.nak())

            await fwd.start(msg.subject, msg.data, settle)
    await nc.close()


async def kafka(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        *args.topic,
        bootstrap_servers=args.server,
        group_id=args.group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    ready()
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=500)
            records = [record for part in batch.values() for record in part]
            if not records:
                continue
            tracker = BatchTracker(len(records))
            for record in records:
                await fwd.start(record.topic, record.value, tracker.settle)
            await tracker.finished.wait()
            if tracker.ok:  # commit only what succeeded: a failure is read again
                await consumer.commit()
    finally:
        await consumer.stop()


async def rabbitmq(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    import aio_pika

    connection = await aio_pika.connect_robust(args.server)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args.inflight)
    queue = await channel.declare_queue(args.subject, durable=False)

    async def on_message(msg: Any) -> None:
        async def settle(ok: bool) -> None:
            await (msg.ack() if ok else msg.nack(requeue=True))

        await fwd.start(args.subject, msg.body, settle)

    await queue.consume(on_message)
    ready()
    await stop.wait()
    await connection.close()


async def mqtt(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    subscribed = asyncio.Event()
    host, port = args.server.removeprefix("tcp://").rsplit(":", 1)
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=args.group, protocol=paho.MQTTv5, manual_ack=True
    )
    client.on_connect = lambda c, *_: c.subscribe(args.subject, qos=1)
    client.on_subscribe = lambda *_: loop.call_soon_threadsafe(subscribed.set)
    client.on_message = lambda _c, _u, m: loop.call_soon_threadsafe(queue.put_nowait, m)
    client.connect(host, int(port))
    client.loop_start()
    await subscribed.wait()
    ready()

    async def consume() -> None:
        while True:
            message = await queue.get()

            async def settle(ok: bool, m: Any = message) -> None:
                if ok:
                    client.ack(m.mid, m.qos)

            await fwd.start(message.topic, message.payload, settle)

    consumer = asyncio.create_task(consume())
    await stop.wait()
    consumer.cancel()
    client.disconnect()
    client.loop_stop()


async def postgres(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    import asyncpg

    from fastconn.sources.postgres.changes import Assembler
    from fastconn.sources.postgres.pgoutput import format_lsn, parse_lsn

    conn = await asyncpg.connect(args.server)
    peek = (
        "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes"
        "($1, NULL, 1000, 'proto_version', '1', 'publication_names', $2)"
    )
    ready()
    try:
        while not stop.is_set():
            rows = await conn.fetch(peek, args.group, args.stream)
            assembler = Assembler()
            changes, end = [], None
            for lsn, data in rows:
                txn = assembler.feed(parse_lsn(lsn), data, None)
                if txn is not None:
                    changes.extend(txn.changes)
                    end = txn.end_lsn
            if end is None:
                await asyncio.sleep(0.05)
                continue
            tracker = BatchTracker(len(changes))
            for change in changes:
                await fwd.start(change.topic, change.body, tracker.settle)
            if changes:
                await tracker.finished.wait()
            if tracker.ok:
                await conn.execute(
                    "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", args.group, format_lsn(end)
                )
    finally:
        await conn.close()


async def sqs(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("sqs", endpoint_url=args.server) as client:
        url = args.subject

        async def poll() -> None:
            while not stop.is_set():
                response = await client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                )
                messages = response.get("Messages") or []
                if not messages:
                    continue
                tracker = BatchTracker(len(messages))
                done: list[dict[str, str]] = []
                for m in messages:

                    async def settle(
                        ok: bool,
                        m: Any = m,
                        done: list[dict[str, str]] = done,
                        tracker: BatchTracker = tracker,
                    ) -> None:
                        if ok:
                            done.append({"Id": str(len(done)), "ReceiptHandle": m["ReceiptHandle"]})
                        await tracker.settle(ok)

                    await fwd.start(url.rpartition("/")[2], m["Body"].encode(), settle)
                await tracker.finished.wait()
                if done:
                    await client.delete_message_batch(QueueUrl=url, Entries=done)

        pollers = [asyncio.create_task(poll()) for _ in range(max(1, args.inflight // 10))]
        ready()
        await stop.wait()
        for task in pollers:
            task.cancel()
        await asyncio.gather(*pollers, return_exceptions=True)


class BatchTracker:
    """Counts a fetched batch's calls down; the batch is committed once all succeeded."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.ok = True
        self.finished = asyncio.Event()

    async def settle(self, ok: bool) -> None:
        self.ok &= ok
        self.left -= 1
        if self.left == 0:
            self.finished.set()


async def pushbullet(args: argparse.Namespace, fwd: Forwarder, stop: asyncio.Event) -> None:
    headers = {"Access-Token": args.subject}
    api = args.server.rstrip("/") + "/v2"
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{api}/pushes", params={"limit": "1"}) as r:
            newest = (await r.json())["pushes"]
        after = newest[0]["modified"] if newest else 0.0
        ready()
        while not stop.is_set():
            params = {"modified_after": repr(after), "active": "true", "limit": "1"}
            newest_seen = after
            while True:
                async with http.get(f"{api}/pushes", params=params) as r:
                    body = await r.json()
                for push in body["pushes"]:
                    async with http.get(f"{api}/subscriptions") as r:
                        subscriptions = (await r.json())["subscriptions"]
                    tags = {s["channel"]["iden"]: s["channel"]["tag"] for s in subscriptions}
                    tag = tags.get(push.get("channel_iden", ""))
                    if tag is not None and not push.get("dismissed"):
                        await fwd.start(tag, json.dumps(push).encode())
                    newest_seen = max(newest_seen, push["modified"])
                if not body.get("cursor"):
                    break
                params = {**params, "cursor": body["cursor"]}
            if newest_seen == after:
                await asyncio.sleep(0.02)
            after = newest_seen


def ready() -> None:
    print("ready", flush=True)


async def main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fwd = Forwarder(args.sink, args.inflight, args.fanout)
    run = {
        "webhook": webhook,
        "nats": nats_core,
        "jetstream": jetstream,
        "kafka": kafka,
        "rabbitmq": rabbitmq,
        "mqtt": mqtt,
        "postgres": postgres,
        "pushbullet": pushbullet,
        "sqs": sqs,
    }[args.kind]
    try:
        await run(args, fwd, stop)
    finally:
        with contextlib.suppress(Exception):
            await fwd.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "kind",
        choices=[
            "webhook",
            "nats",
            "jetstream",
            "kafka",
            "rabbitmq",
            "mqtt",
            "postgres",
            "pushbullet",
            "sqs",
        ],
    )
    parser.add_argument("--sink", required=True)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--server", default="")
    parser.add_argument("--subject", default="")
    parser.add_argument("--stream", default="")
    parser.add_argument("--group", default="baseline")
    parser.add_argument("--topic", action="append", default=[])
    uvloop.run(main(parser.parse_args()))
