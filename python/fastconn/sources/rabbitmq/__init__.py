"""``type = "rabbitmq"``: consumers on RabbitMQ queues, at-least-once.

Queues (and optional exchanges with bindings) are declared at start; one consumer per queue
on one channel, the prefetch (default: the dispatcher's capacity) split between them, so a
slow function leaves the backlog in the broker, not in this process. Deliveries are read from
aiormq directly (cheaper than aio-pika's per-message wrapper and task); acks go out as
``multiple`` acks below the oldest unsettled delivery (:mod:`.acks`). Replicas consuming the
same queues are competing consumers: each message goes to one of them.

Settling, per message, once every target function has a final result (manual acks):

* all succeeded (or no function subscribes): ``ack``;
* a retryable failure after the dispatcher's own retries: the message moves to a retry queue
  ``<queue>.fastconn-retry.<ms>ms`` (declared on first use, one per delay: ``retry_delay``
  doubling up to ``backoff_max``, or the function's ``Retry-After`` rounded up to one) whose
  TTL dead-letters it back to its queue; then it is acknowledged. The queue is not blocked
  meanwhile. Deliveries are counted from the broker's ``x-death`` records (plus a quorum
  queue's ``x-delivery-count``);
* a final failure (a non-retryable status, or ``max_deliver`` deliveries spent): published to
  ``dead_letter_exchange`` (confirmed, mandatory) with the shared failure context headers and
  ``fastconn-dlt-original-exchange`` / ``-routing-key`` / ``-queue``, then acknowledged.
  Without a dead-letter exchange it is kept, retried every ``backoff_max``, counted in
  ``fastconn_source_errors_total{kind="stuck"}`` and logged.

With ``ordering = "key"`` (the routing key, or a header) messages of one key run one at a time
in the order this replica received them; a retryable failure is retried in place (the message
stays unacknowledged, the key waits) so nothing overtakes it. Across replicas the order holds
only if one consumer gets each key: a single-active-consumer queue
(``arguments = {"x-single-active-consumer" = true}``) or a consistent-hash exchange with one
queue per replica.

A message with ``reply_to`` and ``correlation_id`` gets the first function's response
published to ``reply_to`` (RPC), once it is settled (acknowledged or dead-lettered).

The connection is robust: after a broker restart or a closed connection it reconnects,
re-declares the channels, queues and consumers, and the broker redelivers everything that was
unacknowledged (a message whose call finished while the connection was down runs again: a
duplicate, never a loss).

Modules: :mod:`.config` (the ``[[sources]]`` model), :mod:`.headers` (what functions receive),
:mod:`.settle` (deliveries, delays and decisions), :mod:`.acks` (which acks to send),
:mod:`.metrics` (the stuck gauge), :mod:`.source` (the source).
"""

from fastconn.sources.rabbitmq.config import RabbitMQConfig
from fastconn.sources.rabbitmq.source import DLT_EXCHANGE, DLT_QUEUE, DLT_ROUTING_KEY, RabbitMQSource

__all__ = [
    "CONFIG_MODEL",
    "DLT_EXCHANGE",
    "DLT_QUEUE",
    "DLT_ROUTING_KEY",
    "RabbitMQConfig",
    "RabbitMQSource",
    "create",
]

CONFIG_MODEL = RabbitMQConfig


def create(config: RabbitMQConfig) -> RabbitMQSource:
    return RabbitMQSource(config)
