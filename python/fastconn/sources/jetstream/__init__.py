"""``type = "jetstream"``: a durable JetStream pull consumer, at-least-once.

Intake is a continuous pull: fastconn keeps pull requests open for exactly as many messages
as it has room for (the dispatcher's free capacity, at most ``max_ack_pending``), so messages
arrive as soon as they are published, in batches, and a slow function means fewer pulls:
the broker keeps the backlog, not this process. Replicas bind the same durable consumer and
share the work.

Settling, per message, once every target function has a final result:

* all succeeded (or no function subscribes): ``ack``;
* a retryable failure after the dispatcher's own retries: ``nak`` with a delay growing with
  the delivery count (``nak_delay`` doubling up to ``nak_delay_max``), or the function's
  ``Retry-After`` when it sent one;
* a final failure (a non-retryable status, or ``max_deliver`` deliveries spent): published to
  ``dead_letter_subject`` (which a stream must store: the publish is confirmed) with failure
  context headers, then ``term``. Without a dead-letter subject the message is kept
  (``nak`` with ``nak_delay_max``, so it comes back), counted in
  ``fastconn_source_errors_total{kind="stuck"}`` and logged. fastconn counts deliveries
  itself: the durable has no server-side ``max_deliver``, so the server never drops a message
  (one that refuses the update is reported at start-up, its drops counted as ``dropped``).

Messages still running when half of ``ack_wait`` has passed get in-progress acks, so a long
call keeps its message. With ``ordering = "key"`` messages of one key (the subject, or a
header) run one at a time in stream order while other keys run in parallel; a retryable
failure is retried in place (the key waits, the message keeps in-progress acks) instead of
being redelivered out of order. The order holds within one replica: replicas sharing the
durable each get some of a key's messages. It also holds across a crash
(``strict_order_on_restart``, on by default with ``ordering = "key"``): a start that finds
unacknowledged messages on the durable holds everything until they came back, at most
``ack_wait`` and a grace (:mod:`.restart`).

Function headers: ``X-Topic`` (subject), ``X-Nats-Stream``, ``X-Nats-Sequence``,
``X-Delivery-Attempt`` (the server's delivery count, plus the dispatcher's own retries),
``X-Message-Id`` = ``<stream>/<sequence>``, and the message's own headers.

On stop, pulling ends, what arrived is dispatched, calls in flight finish and are acked, and
anything left (arrived late, or waiting for an in-place retry) is nak'ed at once so another
replica takes it without waiting for ``ack_wait``.

Modules: :mod:`.config` (the ``[[sources]]`` model), :mod:`.pull` (pull-request bookkeeping),
:mod:`.settle` (what each outcome leads to), :mod:`.restart` (key order after a crash),
:mod:`.source` (the source).
"""

from fastconn.sources.jetstream.config import JetStreamConfig
from fastconn.sources.jetstream.source import DLT_SEQUENCE, DLT_STREAM, DLT_SUBJECT, JetStreamSource

__all__ = [
    "CONFIG_MODEL",
    "DLT_SEQUENCE",
    "DLT_STREAM",
    "DLT_SUBJECT",
    "JetStreamConfig",
    "JetStreamSource",
    "create",
]

CONFIG_MODEL = JetStreamConfig


def create(config: JetStreamConfig) -> JetStreamSource:
    return JetStreamSource(config)
