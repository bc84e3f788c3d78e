"""fastconn._compat: each use of a library's private parts works with the installed release.
These fail when a library update renames or drops what fastconn relies on."""

from __future__ import annotations

import asyncio
import collections

from fastconn._compat import asyncpg_connect_params, nats_can_write_raw, nats_write_raw
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


def test_asyncpg_connect_params_reads_the_dsn_as_asyncpg_does() -> None:
    addrs, params = asyncpg_connect_params("postgresql://alice:s%20cret@db.example:6543/app?sslmode=disable")
    assert addrs == [("db.example", 6543)]
    assert (params.user, params.password, params.database) == ("alice", "s cret", "app")
    assert not params.ssl
    assert params.sslmode.name == "disable"
    _, preferred = asyncpg_connect_params("postgresql://alice@db.example/app")
    assert preferred.ssl and preferred.sslmode.name == "prefer"


def test_paho_keeps_what_the_mqtt_client_overrides() -> None:
    """sources/mqtt/client.py's ``_Client`` reads 64 KiB per recv (``_sock_recv``, reset in
    ``_sock_close``), builds its own records of QoS 0/1 PUBLISHes (``_handle_publish`` with
    ``_packet.decode_publish`` on ``_in_packet``) and queues PUBACKs as one blob
    (``_out_packet`` + ``_call_socket_register_write``)."""
    import inspect

    import paho.mqtt._packet as paho_packet
    import paho.mqtt.client as paho

    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    for name in (
        "_sock_recv",
        "_sock_close",
        "_handle_publish",
        "_call_socket_register_write",
        "_send_puback",
    ):
        assert callable(getattr(client, name)), name
    assert isinstance(client._out_packet, collections.deque)
    assert {"command", "packet"} <= set(client._in_packet)
    assert list(inspect.signature(paho_packet.decode_publish).parameters) == ["header", "packet", "protocol"]
    decoded = paho_packet.decode_publish(0x32, b"\x00\x01t\x00\x07payload", paho.MQTTv311)
    assert (decoded.topic, decoded.mid, decoded.qos, decoded.payload) == (b"t", 7, 1, b"payload")
    assert (decoded.dup, decoded.retain, decoded.properties) == (False, False, None)
    source = inspect.getsource(paho.Client._packet_write)
    assert 'packet["packet"]' in source or "packet['packet']" in source


def test_aiormq_has_the_private_parts_the_rabbitmq_frame_reader_replaces() -> None:
    """``fastconn.sources.rabbitmq.frames`` swaps aiormq's frame receiver class and wraps a
    channel's delivery handler; an aiormq without them would silently keep its slow path."""
    import aiormq.channel
    import aiormq.connection

    from fastconn.sources.rabbitmq.frames import BufferedFrameReceiver

    receiver = aiormq.connection.FrameReceiver
    assert receiver is BufferedFrameReceiver or issubclass(BufferedFrameReceiver, receiver)
    for name in ("get_frame", "__anext__"):
        assert callable(getattr(receiver, name, None)), f"aiormq FrameReceiver.{name}"
    for name in ("_on_deliver_frame", "_get_frame"):
        assert callable(getattr(aiormq.channel.Channel, name, None)), f"aiormq Channel.{name}"
