"""The MQTT source's pure parts: in-order acknowledgement and the configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fastconn.sources.mqtt.acks import AckWindow
from fastconn.sources.mqtt.config import MqttConfig, parse_broker


def test_acks_wait_for_every_earlier_message() -> None:
    window = AckWindow()
    a, b, c = (window.received(mid, 1, 0) for mid in (7, 8, 9))
    assert window.finished(b) == []
    assert window.finished(c) == []
    assert [d.mid for d in window.finished(a)] == [7, 8, 9]
    assert len(window) == 0


def test_acks_of_an_older_connection_are_dropped() -> None:
    window = AckWindow()
    old = window.received(1, 1, 1)
    window.reconnected(2)
    new = window.received(1, 1, 2)
    late = window.received(5, 1, 1)  # arrived on connection 1, handled after the reconnect
    assert window.finished(old) == []
    assert window.finished(late) == []
    assert [d.mid for d in window.finished(new)] == [1]


def test_broker_urls() -> None:
    assert parse_broker("tcp://h:1884").port == 1884
    assert parse_broker("h").port == 1883
    ssl = parse_broker("ssl://h")
    assert (ssl.tls, ssl.port) == (True, 8883)
    ws = parse_broker("ws://h:9001/mqtt")
    assert (ws.transport, ws.path) == ("websockets", "/mqtt")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"broker": "http://h"}, "expected tcp://"),
        ({"broker": "tcp://u:p@h"}, "username/password"),
        ({"topics": ["a/#/b"]}, "'#' before the last level"),
        ({"topics": ["a/b+"]}, "wildcard inside a level"),
        ({"topics": ["$share/g/a"]}, "use shared_group"),
        ({"shared_group": "a/b"}, "shared group"),
        ({"dead_letter_topic": "dlq/+"}, "wildcards"),
        ({"topics": ["orders/#"], "dead_letter_topic": "orders/dead"}, "dead letters would come back"),
        ({"password": "x"}, "password needs username"),
        ({"username": "u", "username_file": "/f"}, "either username or username_file"),
        ({"tls_ca": "/ca.pem"}, "ssl:// or wss://"),
        ({"qos": 3}, "qos"),
        ({"protocol": "4"}, "protocol"),
        ({"max_deliver": 0}, "at least 1"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_config_names_the_problem(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        MqttConfig.model_validate({"type": "mqtt", **config})
    assert message in str(info.value)


def test_config_defaults_and_derived_values() -> None:
    c = MqttConfig.model_validate({"type": "mqtt", "protocol": 5, "shared_group": "g", "client_id": "x"})
    assert (c.qos, c.clean_start, c.v5, c.session_client_id) == (1, False, True, "x")
    assert c.subscription("a/+") == "$share/g/a/+"
    assert MqttConfig.model_validate({"protocol": "3.1.1"}).v5 is False


def test_shared_table_properties_decode_as_paho_does() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from fastconn.sources.mqtt.fast_properties import SharedTableProperties

    original = Properties(PacketTypes.PUBLISH)
    original.UserProperty = [("a", "1"), ("b", "2")]
    original.ContentType = "text/plain"
    original.ResponseTopic = "replies/x"
    original.CorrelationData = b"\x00corr"
    original.MessageExpiryInterval = 60
    wire = original.pack()
    ours, paho = SharedTableProperties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
    assert ours.unpack(wire)[1] == paho.unpack(wire)[1] == len(wire)
    assert ours.json() == paho.json() == original.json()
    assert ours.pack() == wire
    ours.unpack(Properties(PacketTypes.PUBLISH).pack())  # a second packet without properties
    assert not hasattr(ours, "UserProperty") and ours.json() == {}
