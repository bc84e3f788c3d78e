"""The RabbitMQ source's frame reader (:mod:`fastconn.sources.rabbitmq.frames`) against
pamqp's own marshalling and unmarshalling, without a broker."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from fastconn.sources.rabbitmq.frames import BufferedFrameReceiver, parse_frame


def frames() -> list[tuple[int, Any]]:
    """(channel, frame) of every kind the reader meets, the decoded-here ones with edge values."""
    props = spec.Basic.Properties(
        content_type="application/json", headers={"k": "v", "n": 3}, message_id="m-1", delivery_mode=2
    )
    return [
        (1, spec.Basic.Deliver("ctag1.abc", 1, False, "", "q")),
        (1, ContentHeader(0, 5, props)),
        (1, ContentHeader(0, 0, spec.Basic.Properties())),
        (
            4,
            ContentHeader(
                0,
                2**40,
                spec.Basic.Properties(
                    content_type="text/plain",
                    content_encoding="gzip",
                    headers={"x-death": [{"count": 2, "queue": "q.r"}], "n": -7, "t": True},
                    delivery_mode=1,
                    priority=9,
                    correlation_id="c-ü",
                    reply_to="amq.rabbitmq.reply-to",
                    expiration="60000",
                    message_id="m" * 255,
                    timestamp=datetime.datetime(2026, 12, 3, 20, 0, tzinfo=datetime.UTC),
                    message_type="t",
                    user_id="guest",
                    app_id="app",
                ),
            ),
        ),
        (1, ContentHeader(0, 1, spec.Basic.Properties(priority=0, headers={}))),
        (1, ContentBody(b"hello")),
        (2, spec.Basic.Deliver("ctag2.é", 2**62 + 5, True, "ex.change-1", "rk.ünï/" + "x" * 200)),
        (2, spec.Basic.Deliver("", 7, False, "amq.topic", "")),
        (65535, ContentBody(b"x")),
        (3, ContentBody(bytes(range(256)) * 40)),
        (0, Heartbeat()),
        (1, spec.Basic.ConsumeOk("ctag1.abc")),
        (5, spec.Channel.Close(404, "NOT_FOUND - no queue 'q'", 60, 20)),
    ]


def stream() -> bytes:
    return b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in frames())


def same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, ContentBody):
        return bool(a.value == b.value)
    if isinstance(a, ContentHeader):
        props = spec.Basic.Properties.__slots__
        return a.body_size == b.body_size and all(
            getattr(a.properties, p) == getattr(b.properties, p) for p in props
        )
    if isinstance(a, Heartbeat):
        return True
    return bool(dict(a) == dict(b))


def test_parse_frame_gives_what_pamqp_gives_for_every_frame() -> None:
    data = stream()
    pos = 0
    for channel, frame in frames():
        parsed = parse_frame(data, pos, started=True)
        assert parsed is not None
        weight, got_channel, got = parsed
        ref_weight, ref_channel, ref = pamqp.frame.unmarshal(data[pos:])
        assert (weight, got_channel) == (ref_weight, ref_channel) == (weight, channel)
        assert same(got, ref), (got, ref)
        assert same(got, frame), (got, frame)
        pos += weight
    assert pos == len(data)


def test_an_incomplete_frame_waits_for_more() -> None:
    one = pamqp.frame.marshal(spec.Basic.Deliver("t", 1, False, "", "q"), 1)
    for cut in range(len(one)):
        assert parse_frame(one[:cut], 0, started=True) is None
    assert parse_frame(one, 0, started=True) is not None


def test_bad_frames_are_errors() -> None:
    one = bytearray(pamqp.frame.marshal(spec.Basic.Deliver("t", 1, False, "", "q"), 1))
    one[-1] = 0
    with pytest.raises(InvalidFrameError, match="frame-end"):
        parse_frame(one, 0, started=True)
    # A Deliver whose arguments claim more bytes than the frame holds.
    short = bytearray(pamqp.frame.marshal(spec.Basic.Deliver("t", 1, False, "", "q"), 1))
    short[-2] = 40  # the routing key's length (its one byte "q" is at -2; the key is "q")
    short[-3] = 40
    with pytest.raises(InvalidFrameError):
        parse_frame(short, 0, started=True)
    with pytest.raises(ProtocolSyntaxError):
        parse_frame(b"AMQP\x00\x00\x09\x01", 0, started=False)


async def read_all(chunks: list[bytes]) -> list[tuple[int, int, Any]]:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return [frame async for frame in BufferedFrameReceiver(reader)]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1 << 20])
async def test_receiver_reads_the_same_frames_whatever_the_chunks(size: int) -> None:
    data = stream()
    got = await read_all([data[i : i + size] for i in range(0, len(data), size)])
    want = frames()
    assert [c for _, c, _ in got] == [c for c, _ in want]
    assert all(same(g, w) for (_, _, g), (_, w) in zip(got, want, strict=True))
    assert sum(w for w, _, _ in got) == len(data)


async def test_receiver_end_of_stream_within_a_frame_is_a_connection_error() -> None:
    data = stream()
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await read_all([data[:-3]])
