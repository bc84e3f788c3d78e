"""paho-mqtt 2 driven by the asyncio event loop.

Why paho: paho 2 is the Python MQTT client with manual acknowledgement (``manual_ack=True`` +
``ack(mid, qos)``), which acknowledge-after-success needs; aiomqtt 2 acknowledges on receipt.

Why on the event loop rather than in paho's network thread: with ``loop_start`` every packet
crosses threads, and each blocking call of paho's thread (``select``, ``recv``) has to win the
GIL back from a busy event loop (up to the 5 ms switch interval each time): that capped intake
at a few thousand messages per second with both threads mostly idle. Here paho's external-loop
API is used: the socket is watched with ``add_reader``/``add_writer`` and ``loop_read`` /
``loop_write`` / ``loop_misc`` run on the loop, so packets, acknowledgements and callbacks never
cross a thread. Only what blocks runs in the default executor: ``reconnect()`` (name
resolution, TCP and TLS handshakes), after which reading and writing are non-blocking.
Reconnection (doubling backoff from ``reconnect_wait`` to ``reconnect_wait_max``) is this
module's loop, :meth:`MqttBridge._run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fastconn.backoff import doubling
from fastconn.errors import SourceError
from fastconn.health import ConnectionHealth, describe_error
from fastconn.sources.mqtt import fast_properties
from fastconn.sources.mqtt.config import MAX_RECEIVE, MqttConfig
from fastconn.tls_config import client_tls_context

__all__ = ["MAX_QOS0_BACKLOG", "MqttBridge", "Received", "new_properties"]

_READS_PER_WAKEUP = 512
_CLOSE_TIMEOUT = 5.0
MAX_QOS0_BACKLOG = 65536
"""QoS 0 messages waiting for the loop beyond which new ones are dropped (counted): the broker
bounds unacknowledged QoS 1/2 messages (receive maximum), not QoS 0 ones."""

Received = tuple["paho.MQTTMessage | InboundMessage", int]
"""A message and the connection generation it arrived on."""

# CONNACK reason codes that no retry fixes (MQTT 5 0x84..0x8C, 3.1.1 return codes 1-5).
_REFUSED = frozenset(
    {
        "Not authorized",
        "Bad user name or password",
        "Client identifier not valid",
        "Unsupported protocol version",
        "Banned",
        "Bad authentication method",
    }
)


def new_properties(packet_type: int) -> Properties:
    """Empty MQTT 5 properties for a packet (paho's constructor is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class InboundMessage:
    """A received QoS 0 or 1 PUBLISH: what the source reads of paho's MQTTMessage."""

    __slots__ = ("_topic", "dup", "mid", "payload", "properties", "qos", "retain")

    def __init__(
        self,
        mid: int,
        topic: bytes,
        payload: bytes | bytearray,
        qos: int,
        retain: bool,
        dup: bool,
        properties: Any,
    ) -> None:
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.dup = dup
        self.properties = properties

    @property
    def topic(self) -> str:
        return self._topic.decode("utf-8")  # raises on invalid UTF-8, as paho's does


_RECV_CHUNK = 65536
_PUBACK = struct.Struct("!BBH")
_PUBACK_HEADER = 0x40


class _Client(paho.Client):
    """paho's client, answering a PUBREL for a message it does not hold.

    At QoS 2 paho hands a message over on PUBREL and, with manual acknowledgement, leaves the
    PUBCOMP to ``ack()``. A PUBREL for a packet id paho does not hold comes after a crash or a
    reconnect (the broker re-sends PUBREL, not the message, for what the old connection had
    received): paho then sends nothing, and the broker keeps that message in the session's
    receive window until the session ends, so every crash or reconnect at QoS 2 would shrink
    the window for good. The message itself cannot be had again (the broker handed it over at
    PUBREC); completing the exchange frees the slot.
    """

    _recv_data = b""
    _recv_pos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho reads a packet in three or more recv calls (the type byte, each length byte,
        # the body): one system call each. Reading 64 KiB at a time and handing paho its slices
        # is one call per burst. The loop must not wait for the socket while bytes wait here:
        # see :meth:`buffered` and ``MqttBridge._readable``.
        data, pos = self._recv_data, self._recv_pos
        if pos >= len(data):
            data = super()._sock_recv(_RECV_CHUNK)  # raises BlockingIOError when there is none
            pos = 0
            if len(data) <= bufsize:
                self._recv_data, self._recv_pos = b"", 0
                return data
        end = pos + bufsize
        self._recv_data, self._recv_pos = data, end
        return data[pos:end]

    def buffered(self) -> bool:
        """Whether received bytes wait in this client (the socket will not wake the loop)."""
        return self._recv_pos < len(self._recv_data)

    def _sock_close(self) -> None:
        self._recv_data, self._recv_pos = b"", 0  # a new connection starts a new byte stream
        super()._sock_close()

    def _handle_publish(self) -> MQTTErrorCode:
        # paho builds an MQTTMessage per PUBLISH, and with it an MQTTMessageInfo holding a
        # threading.Condition (for waiting on publishes it *sends*): 13 % of the source's CPU
        # (py-spy, 3,000 msg/s). QoS 0 and 1 messages get a plain record of what the source
        # reads; QoS 2 stays with paho, which keeps the message until PUBREL.
        command = self._in_packet["command"]
        if (command & 0x06) >> 1 == 2:
            return super()._handle_publish()
        result = paho_packet.decode_publish(command, self._in_packet["packet"], self._protocol)
        if result.qos > 2:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        message = InboundMessage(
            result.mid, result.topic, result.payload, result.qos, result.retain, result.dup, result.properties
        )
        self._handle_on_message(message)  # type: ignore[arg-type]
        if message.qos == 1 and not self._manual_ack:
            return self._send_puback(message.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def puback_many(self, mids: Sequence[int]) -> None:
        """PUBACKs for QoS 1 messages, written as one packet blob: paho's ``ack()`` queues each
        packet on its own, wakes its socket pair (a system call) and asks for a write per ack."""
        if not mids:
            return
        blob = b"".join(_PUBACK.pack(_PUBACK_HEADER, 2, mid) for mid in mids)
        self._out_packet.append(
            {
                "command": _PUBACK_HEADER,
                "mid": mids[-1],
                "qos": 0,
                "pos": 0,
                "to_process": len(blob),
                "packet": blob,
                "info": None,
            }
        )
        self._call_socket_register_write()

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # paho's version decodes the topic and walks its per-topic callback matcher for every
        # message, under two locks; fastconn registers no per-topic callbacks and only ever runs
        # paho on the event loop's thread, so the one on_message is called directly (~6% of the
        # CPU per message at 7,000 msg/s, by cProfile).
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def _easy_log(self, level: int, fmt: str, *args: Any) -> None:
        # paho logs two DEBUG lines per message (received PUBLISH, sent PUBACK) through
        # logging's machinery even when DEBUG is off: dropped here unless the logger wants them.
        if level == paho.MQTT_LOG_DEBUG and not self._debug_logging:
            return
        super()._easy_log(level, fmt, *args)  # type: ignore[arg-type]

    _debug_logging = False
    """Set when the paho logger is enabled for DEBUG (checked once, at start)."""

    def _handle_pubrel(self) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        mid = int.from_bytes(bytes(packet[:2]), "big") if len(packet) >= 2 else None
        unknown = mid is not None and mid not in self._in_messages
        rc = super()._handle_pubrel()
        if unknown and mid is not None and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return self._send_pubcomp(mid)
        return rc


class MqttBridge:
    """One paho client: connection, subscriptions, acknowledgements and publishes."""

    def __init__(
        self,
        config: MqttConfig,
        loop: asyncio.AbstractEventLoop,
        health: ConnectionHealth,
        log: logging.Logger,
        *,
        receive_maximum: int,
        on_messages: Callable[[], None],
    ) -> None:
        self.config = config
        self._loop = loop
        self._health = health
        self._log = log
        self._wake_intake = on_messages
        self.inbox: deque[Received] = deque()
        self.generation = 0
        """Incremented by every successful connection (CONNACK accepted)."""
        self._filters: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._connected = asyncio.Event()
        self._refused: str | None = None
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._closing = False
        self.session_present = False
        self.dropped = 0
        v5 = config.v5
        fast_properties.install()
        self.client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.session_client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            transport=config.endpoint.transport,  # type: ignore[arg-type]
            clean_session=None if v5 else config.clean_start,
            manual_ack=True,
            reconnect_on_failure=False,
        )
        client = self.client
        paho_log = logging.getLogger("fastconn.source.mqtt.paho")
        client.enable_logger(paho_log)
        client._debug_logging = paho_log.isEnabledFor(logging.DEBUG)
        # Outgoing QoS 1 publishes (dead letters, responses) in flight at once.
        client.max_inflight_messages_set(256)
        client.max_queued_messages_set(0)
        if config.endpoint.transport == "websockets":
            client.ws_set_options(path=config.endpoint.path)
        credentials = config.credentials()
        if credentials is not None:
            client.username_pw_set(*credentials)
        if config.endpoint.tls:
            client.tls_set_context(self._tls_context())
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._sock: Any = None
        self._loop_thread = threading.get_ident()  # built on the loop (the source's start)
        self._socket_closed = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._received = 0
        self._connect_properties: Properties | None = None
        if v5:
            props = new_properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(config.session_expiry)
            props.ReceiveMaximum = max(1, min(receive_maximum, MAX_RECEIVE))
            self._connect_properties = props

    def _tls_context(self) -> ssl.SSLContext:
        c = self.config
        return client_tls_context(f"source {c.name!r} (MQTT)", c.tls_ca, c.tls_cert, c.tls_key)

    # -- connecting ------------------------------------------------------------------------

    async def connect(self, filters: Sequence[str]) -> None:
        """Connects (retrying until ``connect_wait``), subscribes ``filters``.
        Raises :class:`SourceError` when refused for good or not connected in time."""
        c = self.config
        self._filters = tuple(filters)
        endpoint = c.endpoint
        self.client.connect_async(
            endpoint.host,
            endpoint.port,
            keepalive=round(c.keepalive),
            clean_start=c.clean_start if c.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties,
        )
        self._runner = self._loop.create_task(self._run())
        try:
            await asyncio.wait_for(self._connected.wait(), c.connect_wait)
        except TimeoutError:
            await self.close()
            why = f"no connection within connect_wait ({c.connect_wait:g}s)"
            raise SourceError(
                f"source {c.name!r}: cannot connect to MQTT at {endpoint.display}: {why}"
            ) from None
        except asyncio.CancelledError:
            await self.close()
            raise
        if self._refused is not None:
            await self.close()
            raise SourceError(
                f"source {c.name!r}: the MQTT broker at {endpoint.display} refused the connection: "
                f"{self._refused}{_refusal_hint(str(self._refused))}"
            )

    async def _run(self) -> None:
        """Connects, serves the connection until its socket closes, reconnects with backoff."""
        c = self.config
        failures = 0
        while not self._closing:
            self._socket_closed.clear()
            generation = self.generation
            try:
                await self._loop.run_in_executor(None, self.client.reconnect)
            except Exception as exc:  # OSError mostly (ssl.SSLError and socket.gaierror are ones)
                if not isinstance(exc, OSError):
                    self._log.warning("source %s: connecting failed: %r", c.name, exc)
                self._health.failing(describe_error(exc))
                failures += 1
                await asyncio.sleep(doubling(failures, c.reconnect_wait, c.reconnect_wait_max))
                continue
            while not self._socket_closed.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._socket_closed.wait(), 1.0)
                self.client.loop_misc()  # keep-alive pings, and a silent broker detected
            if self._closing:
                return
            failures = 0 if self.generation != generation else failures + 1
            await asyncio.sleep(doubling(max(failures, 1), c.reconnect_wait, c.reconnect_wait_max))

    # paho's socket callbacks come from the loop, or from reconnect() in the executor. paho calls
    # them before it closes the socket: on the loop they act at once (a closed socket could
    # no longer be removed from the selector).

    def _on_loop(self, callback: Any, *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: paho.Client, _: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        self._sock = sock
        self._loop.add_reader(sock, self._readable)
        if self.client.want_write():
            self._loop.add_writer(sock, self._writable)

    def _on_socket_close(self, client: paho.Client, _: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None
            self._socket_closed.set()

    def _on_register_write(self, client: paho.Client, _: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if sock is self._sock:
            self._loop.add_writer(sock, self._writable)

    def _on_unregister_write(self, client: paho.Client, _: Any, sock: Any) -> None:
        self._on_loop(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        # loop_read reads one packet per call: go on while messages keep coming, so one wake-up
        # takes a burst (the loop stays level-triggered for the rest).
        client = self.client
        for _ in range(_READS_PER_WAKEUP):
            before = self._received
            if client.loop_read() != paho.MQTT_ERR_SUCCESS or self._received == before:
                break
        if client.buffered():
            # Bytes read from the socket wait in the client: the socket will not wake us.
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self.client.loop_write()

    def _on_connect(self, client: paho.Client, _: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            text = str(reason)
            if text in _REFUSED and not self._connected.is_set():
                self._refused = text
                client.disconnect()
                self._loop.call_soon_threadsafe(self._connected.set)
                return
            self._loop.call_soon_threadsafe(self._health.failing, text.lower())
            return
        self.generation += 1
        self.session_present = bool(flags.session_present)
        # Subscribed on every connect, resumed session or not: the configuration may have gained
        # a filter since the session was made. MQTT 5 asks for retained messages only for a new
        # subscription; MQTT 3.1.1 cannot, so there a resumed session gets them again.
        with self._lock:
            filters = self._filters
        self._subscribe(filters)
        self._loop.call_soon_threadsafe(self._connected_now)

    def _connected_now(self) -> None:
        self._health.restored()
        self._connected.set()
        self._wake_intake()  # the intake notices the new generation at once

    def _on_connect_fail(self, client: paho.Client, _: Any) -> None:
        self._loop.call_soon_threadsafe(self._health.failing, "connection refused or unreachable")

    def _on_disconnect(self, client: paho.Client, _: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._closing:
            self._loop.call_soon_threadsafe(self._health.lost)

    # -- subscriptions ---------------------------------------------------------------------

    def set_filters(self, filters: Sequence[str]) -> None:
        """Subscribes what is new and unsubscribes what is gone (new first: no gap)."""
        with self._lock:
            old, self._filters = self._filters, tuple(filters)
        added = [f for f in filters if f not in old]
        removed = [f for f in old if f not in filters]
        if self.client.is_connected():
            self._subscribe(added)
            if removed:
                self.client.unsubscribe([self.config.subscription(f) for f in removed])

    def _subscribe(self, filters: Sequence[str]) -> None:
        if not filters:
            return
        c = self.config
        if c.v5:
            options = SubscribeOptions(qos=c.qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
            self.client.subscribe([(c.subscription(f), options) for f in filters])
        else:
            plain: list[tuple[str, int]] = [(c.subscription(f), c.qos) for f in filters]
            self.client.subscribe(plain)
        self._log.info("source %s: subscribed to %s (QoS %d)", c.name, ", ".join(filters), c.qos)

    # -- messages in -----------------------------------------------------------------------

    def _on_message(self, client: paho.Client, _: Any, message: paho.MQTTMessage) -> None:
        self._received += 1
        inbox = self.inbox
        if message.qos == 0 and len(inbox) >= MAX_QOS0_BACKLOG:
            self.dropped += 1  # read and reset by the loop (a lost increment is a miscount only)
            return
        inbox.append((message, self.generation))
        if len(inbox) == 1:
            self._loop.call_soon_threadsafe(self._wake_intake)

    def ack(self, mid: int, qos: int) -> None:
        with contextlib.suppress(Exception):  # disconnected: the broker re-sends it anyway
            self.client.ack(mid, qos)

    def ack_many(self, acks: Sequence[tuple[int, int]]) -> None:
        """Acknowledges ``(mid, qos)`` pairs in this order; QoS 1 ones in one write."""
        if any(qos != 1 for _, qos in acks):
            for mid, qos in acks:
                self.ack(mid, qos)
            return
        with contextlib.suppress(Exception):  # disconnected: the broker re-sends them anyway
            self.client.puback_many([mid for mid, _ in acks])

    # -- messages out ----------------------------------------------------------------------

    def publish(
        self, topic: str, payload: bytes, qos: int, properties: Properties | None
    ) -> asyncio.Future[None]:
        """Publishes; the future completes when the broker confirmed (QoS 1) or at once (0)."""
        future: asyncio.Future[None] = self._loop.create_future()
        info = self.client.publish(topic, payload, qos=qos, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            future.set_exception(SourceError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}"))
        elif qos == 0:
            future.set_result(None)
        else:
            # Registered before the confirmation can reach it: that comes through
            # call_soon_threadsafe, which runs after this synchronous code.
            self._publishes[info.mid] = future
        return future

    def _on_publish(self, client: paho.Client, _: Any, mid: int, reason: Any, props: Any) -> None:
        self._loop.call_soon_threadsafe(self._published, mid)

    def _published(self, mid: int) -> None:
        future = self._publishes.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    # -- closing ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Sends what is queued (acknowledgements first), then DISCONNECT, and stops
        reconnecting. The session stays on the broker (its expiry counts from now)."""
        self._closing = True
        client = self.client
        if self._sock is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._socket_closed.wait(), _CLOSE_TIMEOUT)
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._sock is not None:
            self._unwatch(self._sock)
        with contextlib.suppress(Exception):
            client.loop_stop()  # nothing to stop; closes paho's socket pair
        for future in self._publishes.values():
            if not future.done():
                future.set_exception(SourceError("disconnected before the broker confirmed"))
        self._publishes.clear()


def _refusal_hint(reason: str) -> str:
    """The likely fix of a CONNACK refusal, from its reason."""
    lowered = reason.lower()
    if "not authorized" in lowered or "user name or password" in lowered:
        return " -- check username/password (or username_file/password_file) and the broker's ACL"
    return ""
