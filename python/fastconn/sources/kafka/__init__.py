"""``type = "kafka"``: consume topics in a consumer group and invoke the functions subscribed to
them, committing only offsets whose messages are done.

Delivery guarantees
-------------------
* **At least once, never past a gap.** Offsets are committed manually (never auto-commit), per
  partition, at the gap-free watermark (:mod:`fastconn.watermark`): the lowest offset that is not
  done. A message is *done* when every function it routes to answered 2xx, when no function
  subscribes to its topic, or when it was written to ``dead_letter_topic``. Commits happen every
  ``commit_interval``, when partitions are revoked, and at shutdown. After a crash the group
  resumes at the last commit: messages past it are delivered again (duplicates, never losses).
* **Ordering** (``ordering``): ``key`` (default) runs messages with the same record key one at a
  time in offset order, while other keys of the same partition run in parallel (keyless messages
  are unordered); ``partition`` runs one message per partition at a time; ``none`` runs
  everything in parallel. The per-key scheduler is the Rust core's.
* **Retries.** After the dispatcher's own retries, a RETRY verdict keeps the message: it is
  resubmitted after a growing backoff (at least the function's ``Retry-After``), forever. In
  ``key``/``partition`` mode its key stays held in the core meanwhile, so only that key (or
  partition) waits. A FAILED verdict (a non-retryable status such as 400) goes to
  ``dead_letter_topic`` with the failure context in headers and is then done; without a
  dead-letter topic it is retried like RETRY, forever. A dead letter the broker refuses as too
  large is sent smaller (payload cut, then the record's headers left out: see
  :func:`.settle.smaller_dead_letter`); one that still does not fit keeps its message stuck.
  Nothing is dropped: stuck messages show in ``fastconn_kafka_stuck_messages`` and hold their
  partition's commit. (A FAILED message retried for want of a dead-letter topic holds its key
  like a RETRY: ``hold_key_on_failure``.)
* **Backpressure.** A partition is paused (not the consumer) when ``max_pending_per_partition``
  of its messages are past its watermark, and resumed when half of them are done; the whole
  fetch waits while the dispatcher is full. Memory is bounded by that budget plus aiokafka's one
  prefetched fetch (``max_bytes``) per partition.
* **Rebalances.** On revoke the partitions stop being fetched, their in-flight calls get up to
  ``revoke_timeout`` to finish, their watermarks are committed, then they are released. Messages
  past the committed offset (done, in flight or retrying) are read again by the next owner and
  counted in ``fastconn_kafka_rebalance_duplicates_total``. A message waiting for its
  redelivery while its key is held is redelivered at once on revoke, so the messages queued
  behind its key still follow it.
* **Shutdown.** Fetching and redeliveries stop; in-flight calls finish (``[dispatch]
  shutdown_timeout``); the watermarks are committed and the group is left. Messages waiting for
  a redelivery stay uncommitted and are read again by the next owner (messages queued behind a
  held key keep the dispatcher's drain waiting until ``shutdown_timeout``).

Headers sent to functions: ``X-Topic``, ``X-Kafka-Topic``, ``X-Kafka-Partition``,
``X-Kafka-Offset``, ``X-Kafka-Key`` (base64 plus ``X-Kafka-Key-Enc: b64``
when the key is not printable ASCII text), each record header as ``X-Kafka-<name>`` (base64 plus
``X-Kafka-<name>-Enc: b64`` likewise) and ``X-Message-Id`` = ``<topic>/<partition>/<offset>``.

Modules: :mod:`.config` (the ``[[sources]]`` model and client options), :mod:`.function_headers`
(``X-Kafka-*``), :mod:`.state` (per-partition and per-record state), :mod:`.settle` (what each
outcome leads to), :mod:`.publish` (dead letters and responses), :mod:`.metrics`, :mod:`.source`
(the source).
"""

from fastconn.sources.kafka.config import KafkaConfig, client_options, consumer_options, producer_options
from fastconn.sources.kafka.function_headers import function_headers
from fastconn.sources.kafka.publish import DLT_OFFSET, DLT_PARTITION, DLT_TOPIC
from fastconn.sources.kafka.source import KafkaSource

__all__ = [
    "CONFIG_MODEL",
    "DLT_OFFSET",
    "DLT_PARTITION",
    "DLT_TOPIC",
    "KafkaConfig",
    "KafkaSource",
    "client_options",
    "consumer_options",
    "create",
    "function_headers",
    "producer_options",
]

CONFIG_MODEL = KafkaConfig


def create(config: KafkaConfig) -> KafkaSource:
    return KafkaSource(config)
