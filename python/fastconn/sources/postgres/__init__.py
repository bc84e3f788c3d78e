"""``type = "postgres"``: row changes from PostgreSQL's write-ahead log (or NOTIFY payloads) to
the functions subscribed to ``<table>:<action>``.

Write-ahead-log mode (``mode = "wal"``, the default)
----------------------------------------------------
* **Reading.** ``read = "stream"`` (the default) streams the slot over the replication
  protocol (:mod:`.replication`: each change decoded once by the server, pushed at commit,
  confirmed with standby status updates). ``read = "peek"`` polls it over SQL:
  ``pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1',
  'publication_names', pub)``, confirmed with ``pg_replication_slot_advance``. Either way
  reading starts at the slot's confirmed position, so it re-reads what is still in flight;
  transactions already handed out are skipped by commit LSN.
* **At least once, never past an undelivered change.** The slot is confirmed only to the end
  of the newest transaction below which every change is done (succeeded, unrouted, filtered out
  or dead-lettered): the gap-free watermark of :mod:`fastconn.watermark`, on transaction
  boundaries. After a crash the slot
  redelivers from there; each change's id (``<commit LSN>:<n>``, also ``X-Message-Id``) is the
  same on redelivery, so functions can drop duplicates.
* **Ordering** (``ordering``): ``key`` runs changes to the same row (its primary key, else the
  replica identity) one at a time in commit order, other rows in parallel (the core's key-ordered
  scheduler); ``transaction`` runs every change one at a time in commit order; ``none`` runs all
  in parallel.
* **Failures.** After the dispatcher's retries a retryable failure is retried with growing
  backoff, forever (its row's key waits, nothing else); a final failure goes to
  ``dead_letter_table`` with its context and is then done; without one it is retried forever and
  shows in ``fastconn_postgres_stuck_changes``. The slot never moves past it meanwhile.
* **One reader.** Replicas take an advisory lock derived from the slot name; the holder reads,
  the others stand by and take over when its session ends (kill -9 included).
* **The server keeps WAL for the slot** while changes are not confirmed, fastconn down included:
  ``fastconn_postgres_slot_lag_bytes`` and a loud log over ``max_slot_lag_bytes``.

With ``asynchronous_invocation`` a change is done only when its callbacks report success: the
slot stays behind it meanwhile, and a failed callback is retried like a failed call.

LISTEN/NOTIFY mode (``mode = "notify"``): the payload of each notification on ``channels`` is
the body, the channel the topic. At most once: NOTIFY is not stored, so notifications sent while
fastconn is disconnected are lost.

Modules: :mod:`.replication` (the streaming protocol client), :mod:`.pgoutput` (the decoder),
:mod:`.values` (column typing), :mod:`.changes` (transactions → change events), :mod:`.config`,
:mod:`.server` (set-up, checks, errors), :mod:`.state` (confirmation state), :mod:`.wal` and
:mod:`.notify` (the two sources), :mod:`.metrics`.
"""

from __future__ import annotations

from fastconn.sources.postgres.config import PostgresConfig
from fastconn.sources.postgres.notify import NotifySource
from fastconn.sources.postgres.wal import WalSource

__all__ = ["CONFIG_MODEL", "NotifySource", "PostgresConfig", "WalSource", "create"]

CONFIG_MODEL = PostgresConfig


def create(config: PostgresConfig) -> WalSource | NotifySource:
    return WalSource(config) if config.mode == "wal" else NotifySource(config)
