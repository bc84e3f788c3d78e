"""A cheaper reader of AMQP frames for aiormq, and a cheaper way from a delivery to the source.

aiormq reads every frame with three ``readexactly`` calls into a ``BytesIO`` under a lock and
hands it to pamqp's generic unmarshaller; a delivery is three frames (Basic.Deliver, content
header, body), then a task per message for the consumer callback. Together that was most of
the CPU the RabbitMQ source spent per message. Here:

- :class:`BufferedFrameReceiver` reads the socket in large chunks and cuts frames out of the
  buffer; a delivery's three frames (Basic.Deliver, content header, body) are decoded
  directly, every other frame by pamqp as before. The frames are the same pamqp objects aiormq expects.
- :func:`deliver_directly` makes a channel hand its deliveries to a plain function instead of
  starting a task per message.

Both replace private parts of aiormq (checked by :func:`install` against the version this was
written for's shape, and covered by tests against the real broker).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from collections.abc import Callable
from typing import Any, Final

import aiormq.connection
import pamqp.decode
import pamqp.frame
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader

__all__ = ["BufferedFrameReceiver", "consume_directly", "deliver_directly", "install", "parse_frame"]

log = logging.getLogger("fastconn.source.rabbitmq")

_READ_SIZE: Final = 1 << 18
"""Bytes asked of the socket at once: a backlog arrives as a stream of small deliveries."""
_HEADER: Final = struct.Struct(">BHI")
_HEADER_SIZE: Final = 7
_FRAME_END: Final = 0xCE
_METHOD, _HEADER_FRAME, _BODY = 1, 2, 3
_DELIVER: Final = spec.Basic.Deliver.index
_DELIVER_INDEX: Final = struct.Struct(">I")
_TAG: Final = struct.Struct(">q")
_CONTENT_HEADER: Final = struct.Struct(">HHQH")
_BASIC_CLASS: Final = spec.Basic.frame_id
_Properties = spec.Basic.Properties
_DEFAULTS: Final = _Properties()
_PROPERTIES: Final = tuple(
    (name, _Properties.flags[name], getattr(_Properties, "_" + name), getattr(_DEFAULTS, name))
    for name in _Properties.__slots__
)
"""(name, flag bit, AMQP type, value when absent) of each message property, in wire order."""
"""Signed, as pamqp decodes it (and encodes it again for the ack)."""

Frame = Any
"""A pamqp frame (method, content header, body, heartbeat)."""


def parse_frame(data: bytes | bytearray, pos: int, started: bool) -> tuple[int, int, Frame] | None:
    """The frame starting at ``data[pos]``: (bytes it takes, channel, frame), or None while it
    is incomplete. ``started``: a frame was read already (before that, an AMQP protocol header
    from the broker means it refused the protocol version)."""
    available = len(data) - pos
    if not started and available >= 4 and data[pos : pos + 4] == b"AMQP":
        raise ProtocolSyntaxError("Unexpected AMQP protocol header")
    if available < _HEADER_SIZE:
        return None
    frame_type, channel, size = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER_SIZE + size
    if end >= len(data):
        return None
    weight = _HEADER_SIZE + size + 1
    if data[end] != _FRAME_END:
        raise InvalidFrameError(f"frame on channel {channel} does not end with the frame-end octet")
    start = pos + _HEADER_SIZE
    if frame_type == _BODY:
        return weight, channel, ContentBody(bytes(data[start:end]))
    if frame_type == _HEADER_FRAME and size >= _CONTENT_HEADER.size:
        try:
            header = _content_header(data, start, end)
        except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidFrameError(f"malformed content header: {exc}") from None
        if header is not None:
            return weight, channel, header
    if frame_type == _METHOD and size >= 4 and _DELIVER_INDEX.unpack_from(data, start)[0] == _DELIVER:
        try:
            return weight, channel, _deliver(data, start + 4, end)
        except (IndexError, struct.error, UnicodeDecodeError) as exc:
            raise InvalidFrameError(f"malformed Basic.Deliver: {exc}") from None
    try:
        _, channel, frame = pamqp.frame.unmarshal(bytes(data[pos : end + 1]))
    except PAMQPException as exc:
        raise InvalidFrameError(str(exc)) from exc
    return weight, channel, frame


def _deliver(data: bytes | bytearray, pos: int, end: int) -> spec.Basic.Deliver:
    """Basic.Deliver's arguments: consumer-tag (shortstr), delivery-tag (longlong),
    redelivered (bit), exchange and routing-key (shortstr)."""
    n = data[pos]
    consumer_tag = bytes(data[pos + 1 : pos + 1 + n]).decode()
    pos += 1 + n
    (tag,) = _TAG.unpack_from(data, pos)
    redelivered = bool(data[pos + 8] & 1)
    pos += 9
    n = data[pos]
    exchange = bytes(data[pos + 1 : pos + 1 + n]).decode()
    pos += 1 + n
    n = data[pos]
    routing_key = bytes(data[pos + 1 : pos + 1 + n]).decode()
    if pos + 1 + n > end:
        raise IndexError("arguments run past the frame")
    # pamqp's constructor re-validates the exchange name with a regular expression: the
    # broker sent it, and pamqp's own unmarshalling does not validate either.
    frame = spec.Basic.Deliver.__new__(spec.Basic.Deliver)
    frame.consumer_tag = consumer_tag
    frame.delivery_tag = tag
    frame.redelivered = redelivered
    frame.exchange = exchange
    frame.routing_key = routing_key
    return frame


def _content_header(data: bytes | bytearray, pos: int, end: int) -> ContentHeader | None:
    """A Basic content header (None: another class, or more than one flag word, for pamqp):
    the fixed fields, then each property whose flag is set, short strings and octets decoded
    here, tables and timestamps by pamqp's decoders."""
    class_id, weight, body_size, flags = _CONTENT_HEADER.unpack_from(data, pos)
    if class_id != _BASIC_CLASS or flags & 1:
        return None
    pos += _CONTENT_HEADER.size
    properties = _Properties.__new__(_Properties)
    for name, flag, kind, default in _PROPERTIES:
        if not flags & flag:
            value = default
        elif kind == "shortstr":
            n = data[pos]
            value = bytes(data[pos + 1 : pos + 1 + n]).decode()
            pos += 1 + n
        elif kind == "octet":
            value = data[pos]
            pos += 1
        else:
            consumed, value = pamqp.decode.by_type(bytes(data[pos:end]), kind)
            pos += consumed
        setattr(properties, name, value)
    if pos > end:
        raise ValueError("properties run past the frame")
    header = ContentHeader.__new__(ContentHeader)
    header.class_id = class_id
    header.weight = weight
    header.body_size = body_size
    header.properties = properties
    return header


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading the socket in large chunks (see the module docstring).
    Same frames, same errors: end of stream between frames ends the iteration, within a frame
    it is an ``AMQPConnectionError``."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._buffer = bytearray()
        self._pos = 0

    async def get_frame(self) -> tuple[int, int, Frame]:
        while True:
            parsed = parse_frame(self._buffer, self._pos, self.started)
            if parsed is not None:
                self.started = True
                self._pos += parsed[0]
                if self._pos == len(self._buffer):
                    self._buffer.clear()
                    self._pos = 0
                return parsed
            await self._fill()

    async def _fill(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        if not self._buffer and self.reader.at_eof():
            raise StopAsyncIteration
        try:
            chunk = await self.reader.read(_READ_SIZE)
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        if not chunk:
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(self._buffer)} bytes of an incomplete frame"
            )
        self._buffer += chunk


def install() -> None:
    """Makes aiormq connections opened from now on use :class:`BufferedFrameReceiver`."""
    current = aiormq.connection.FrameReceiver
    if current is BufferedFrameReceiver:
        return
    if not hasattr(current, "get_frame") or not hasattr(current, "__anext__"):
        return  # an aiormq this was not written for: keep its own receiver
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]


def deliver_directly(channel: Any, consumer_tag: str, consumer: Callable[[DeliveredMessage], None]) -> None:
    """Makes the aiormq ``channel`` call ``consumer(message)`` for each delivery to
    ``consumer_tag``, in the channel's own reader (in order, no task per message); deliveries to
    other consumers take aiormq's own way. Call it before ``basic_consume`` with that tag, so
    that no delivery takes the other way first (it would run later, out of order). ``consumer``
    must not block (it only queues work)."""
    direct: dict[str, Callable[[DeliveredMessage], None]] | None = getattr(channel, "_fastconn_direct", None)
    if direct is not None:
        direct[consumer_tag] = consumer
        return
    direct = channel._fastconn_direct = {consumer_tag: consumer}
    original = channel._on_deliver_frame
    get_frame = channel._get_frame

    async def on_deliver_frame(frame: spec.Basic.Deliver) -> None:
        consumer = direct.get(frame.consumer_tag or "")
        if consumer is None:
            await original(frame)
            return
        header = await get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
        size = header.body_size
        parts: list[bytes] = []
        received = 0
        while received < size:
            content = await get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r} instead of ContentBody", content)
            parts.append(content.value)
            received += len(content.value)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            consumer(DeliveredMessage(delivery=frame, header=header, body=body, channel=channel))
        except Exception:
            # As aiormq does for a failing consumer task: an error in one message's intake
            # must not close the channel (and with it every unacknowledged delivery).
            log.exception("consumer %s failed on delivery %s", frame.consumer_tag, frame.delivery_tag)

    channel._on_deliver_frame = on_deliver_frame


async def consume_directly(
    channel: Any, queue: str, consumer: Callable[[DeliveredMessage], None]
) -> spec.Basic.ConsumeOk:
    """``basic_consume`` (manual acks) of ``queue`` on the aiormq ``channel``, its deliveries
    handed to ``consumer`` by :func:`deliver_directly`."""
    tag = f"ctag{channel.number}.{uuid.uuid4().hex}"
    deliver_directly(channel, tag, consumer)

    async def by_task(message: DeliveredMessage) -> None:
        consumer(message)  # not taken: deliver_directly handles this tag

    ok: spec.Basic.ConsumeOk = await channel.basic_consume(queue, by_task, no_ack=False, consumer_tag=tag)
    return ok
