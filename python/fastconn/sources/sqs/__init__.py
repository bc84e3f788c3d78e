"""``type = "sqs"``: long-polling consumers on Amazon SQS queues, at-least-once.

Each queue has ``pollers`` concurrent receives (``max_messages`` per receive, long polls of
``wait_time``); a receive is only made while this replica holds fewer messages than twice the
dispatcher's in-flight bound (what keeps every call slot busy), so a slow or stalled function
leaves the backlog in SQS, where other replicas (competing consumers, as SQS intends) can take
it. The topic of a message is its queue's name (the OpenFaaS annotation form); with
``decode = "s3"`` each record of an S3/MinIO bucket notification is a message of its own
(:mod:`fastconn.s3_events`).

Settling, once every part of a received message has a final result:

* all succeeded (or no function subscribes, or an ``s3:TestEvent``): deleted, in
  ``DeleteMessageBatch`` calls of up to ten; entries the batch reports as failed are retried
  when the fault is SQS's and logged when the receipt handle is refused (the message then
  comes back: a duplicate, never a loss);
* a retryable failure: ``ChangeMessageVisibility`` hides it for ``retry_delay`` doubling per
  receive (``ApproximateReceiveCount``), or the function's ``Retry-After``, up to
  ``backoff_max``; nothing in this process waits for it;
* a final failure (a non-retryable status, or ``max_deliver`` receives spent when
  ``dead_letter_queue_url`` is set): sent to ``dead_letter_queue_url`` with the shared failure
  context as message attributes (:mod:`.settle`), then deleted; without a dead-letter queue it
  is made visible at once, and the queue's redrive policy moves it after ``maxReceiveCount``.

While a message is in hand (a call slower than ``visibility_timeout``, a FIFO message waiting
for its group, an async call waiting for its callback with ``asynchronous_invocation``), its
visibility is extended before it ends, up to SQS's 12 h ceiling.

FIFO queues (``.fifo``): ``MessageGroupId`` is the core's ordering key: one message of a group
in flight at a time, groups in parallel, in the order received. A retryable failure is retried
in place (kept hidden, the group waiting) up to ``max_deliver`` attempts, so the group's later
messages cannot overtake it; past that it goes to the dead-letter queue, or back to SQS.

A kill loses nothing: a message is deleted only after its functions succeeded, and whatever was
in hand becomes visible again when its visibility timeout ends (duplicates, never losses). On a
clean stop, messages still in hand are made visible at once.

Modules: :mod:`.config` (the ``[[sources]]`` model), :mod:`.headers` (what functions receive),
:mod:`.settle` (decisions and dead-letter attributes), :mod:`.batch` (batched deletes and
visibility changes), :mod:`.source` (the source).
"""

from fastconn.sources.sqs.config import SqsConfig
from fastconn.sources.sqs.settle import DLT_CONTEXT, DLT_QUEUE_URL
from fastconn.sources.sqs.source import SqsSource

__all__ = ["CONFIG_MODEL", "DLT_CONTEXT", "DLT_QUEUE_URL", "SqsConfig", "SqsSource", "create"]

CONFIG_MODEL = SqsConfig


def create(config: SqsConfig) -> SqsSource:
    return SqsSource(config)
