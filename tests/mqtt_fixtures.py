"""Fixtures for the MQTT tests: Debian's ``mosquitto`` started with a config file of its own
(a free port on 127.0.0.1, persistence on, its store in a temp folder; never the machine's own
broker or config), and paho helpers to publish and collect.

Import explicitly: ``from mqtt_fixtures import mosquitto  # noqa: F401``. A missing
``mosquitto`` binary is a failure, not a skip (``scripts/setup.sh`` installs it).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fastconn.testing import ServerProcess, free_port, mosquitto_command


class Mosquitto(ServerProcess):
    """A running mosquitto; ``restart()`` stops it (it saves its store) and starts it again on
    the same port with the same store."""

    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir = workdir
        try:
            argv = mosquitto_command(port, workdir)
        except FileNotFoundError as exc:
            pytest.fail(str(exc), pytrace=False)
        super().__init__("mosquitto", argv, port, workdir / "mosquitto.log")

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start_again(self) -> None:
        """Starts the stopped broker again in place: same port, config and store (``stop()``
        sends SIGTERM, on which mosquitto saves its store)."""
        ServerProcess.__init__(self, "mosquitto", self.process.args, self.port, self.log_path)  # type: ignore[misc]


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker of the test's own (tests that restart it must not disturb others)."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), free_port())
    yield broker
    broker.stop()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def properties(
    user: Sequence[tuple[str, str]] = (),
    content_type: str | None = None,
    response_topic: str | None = None,
    correlation: bytes | None = None,
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if user:
        props.UserProperty = list(user)
    if content_type:
        props.ContentType = content_type
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation:
        props.CorrelationData = correlation
    return props


def _client(port: int, client_id: str = "") -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def _publish(
    port: int, topic: str, payloads: Sequence[bytes], qos: int, props: Properties | None, retain: bool
) -> None:
    client = _client(port)
    try:
        infos = [client.publish(topic, p, qos=qos, properties=props, retain=retain) for p in payloads]
        for info in infos:
            info.wait_for_publish(30)
            if not info.is_published():
                raise TimeoutError("the broker did not confirm a publish within 30s")
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(
    port: int,
    topic: str,
    payloads: Sequence[bytes],
    *,
    qos: int = 1,
    props: Properties | None = None,
    retain: bool = False,
) -> None:
    """Publishes ``payloads`` to ``topic`` and waits until the broker confirmed each (in a
    thread: paho blocks)."""
    await asyncio.to_thread(_publish, port, topic, list(payloads), qos, props, retain)


@dataclass
class Collector:
    """A subscriber that keeps every message it gets (thread-safe appends from paho's thread)."""

    client: paho.Client
    messages: list[paho.MQTTMessage] = field(default_factory=list)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def collect(port: int, topic_filter: str) -> Collector:
    """Subscribes ``topic_filter`` (QoS 1) and returns once the broker confirmed."""

    def start() -> Collector:
        client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        collector = Collector(client)

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            collector.messages.append(message)

        def on_subscribe(*_args: Any) -> None:
            collector.subscribed.set()

        def on_connect(c: paho.Client, *_args: Any) -> None:
            c.subscribe(topic_filter, qos=1)

        client.on_message = on_message
        client.on_subscribe = on_subscribe
        client.on_connect = on_connect
        client.connect("127.0.0.1", port)
        client.loop_start()
        if not collector.subscribed.wait(10):
            collector.close()
            raise TimeoutError(f"no SUBACK for {topic_filter} within 10s")
        return collector

    return await asyncio.to_thread(start)


def mqtt_source(broker: Mosquitto, **keys: Any) -> dict[str, Any]:
    """A ``[[sources]]`` table for ``broker`` with a client id of its own."""
    return {"type": "mqtt", "broker": broker.url, "client_id": unique("fc-"), **keys}


def daemon_config(
    double: Any, functions: dict[str, Sequence[str]], sources: Sequence[dict[str, Any]], **dispatch: Any
) -> dict[str, Any]:
    """Static functions ``name -> topics`` served by ``double`` at ``/<name>``, fast retries."""
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s", **dispatch},
        "functions": [
            {"name": name, "url": double.url(f"/{name}"), "topics": list(topics)}
            for name, topics in functions.items()
        ],
        "sources": list(sources),
    }
