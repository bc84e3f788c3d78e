"""``type = "mqtt"``: MQTT 5 / 3.1.1 subscriptions, acknowledged after the functions succeeded.

The client is paho-mqtt 2 with manual acknowledgement, driven by the event loop (:mod:`.client`
says why). Messages arrive in batches and go to the dispatcher; while the
dispatcher is full, nothing is acknowledged, so the broker stops sending once the receive
maximum (MQTT 5; default the dispatcher's capacity) or its own ``max_inflight_messages``
(MQTT 3.1.1) is reached: a stalled function bounds intake and memory.

Settling, per message, once every target function has a final result:

* all succeeded (or nothing subscribes): acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2),
  in arrival order (:mod:`.acks`);
* a retryable failure: retried in this process after ``retry_delay`` doubling up to
  ``retry_delay_max`` (or the function's ``Retry-After``), unacknowledged meanwhile; MQTT has
  no negative acknowledgement;
* a final failure (non-retryable status, or ``max_deliver`` attempts): published to
  ``dead_letter_topic`` with the failure context as MQTT 5 user properties and acknowledged
  once the broker confirmed it; without a dead-letter topic logged, counted and acknowledged.

With a persistent session (``clean_start = false``, the default) the broker keeps the
subscriptions and queues QoS 1/2 messages while fastconn is away, and re-sends what was not
acknowledged when it reconnects: a crash means redelivery, not loss, for QoS 1. QoS 2 is
weaker: paho answers PUBREC on receipt, after which the broker only re-sends PUBREL, not the
message, so a crash between PUBREC and the functions' success loses it.

Function headers: ``X-Topic`` (the MQTT topic), ``X-Mqtt-Qos``, ``X-Mqtt-Retain``,
``X-Mqtt-Message-Id`` (the packet identifier), the MQTT 5 user properties (through
:mod:`fastconn.headers`) and the content type as ``Content-Type``. A message with an MQTT 5
response topic gets each function's response published there (QoS 1) with its correlation
data, and ``X-Function-Name``, ``X-Function-Status``, ``X-Message-Id`` as user properties.

Modules: :mod:`.config` (the ``[[sources]]`` model), :mod:`.acks` (in-order acknowledgement),
:mod:`.client` (paho on the event loop), :mod:`.fast_properties` (cheap MQTT 5 properties),
:mod:`.source` (the source).
"""

from fastconn.sources.mqtt.config import MqttConfig
from fastconn.sources.mqtt.source import DLT_TOPIC, MqttSource

__all__ = ["CONFIG_MODEL", "DLT_TOPIC", "MqttConfig", "MqttSource", "create"]

CONFIG_MODEL = MqttConfig


def create(config: MqttConfig) -> MqttSource:
    return MqttSource(config)
