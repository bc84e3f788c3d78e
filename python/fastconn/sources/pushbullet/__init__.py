"""``type = "pushbullet"``: pushes of Pushbullet channels to the functions subscribed to the
channel's tag (the OpenFaaS Pushbullet connector's rule), and the stream's ephemerals.

* **Reading.** The realtime stream (a websocket) only says *when* to look: on a ``push`` tickle
  (and after every (re)connection, since tickles sent meanwhile are lost) the source lists
  ``/v2/pushes?modified_after=&active=true&limit=`` through every ``cursor`` page, oldest first.
  Tickles arriving during a sync fold into one more sync. Each new, non-dismissed push with a
  ``channel_iden`` whose tag is known (active subscriptions and owned channels, refreshed when an
  unknown iden shows up) and allowed by ``channels`` is dispatched; the others are counted in
  ``fastconn_pushbullet_skipped_pushes{reason}`` and skipped. Ephemeral ``push`` frames go to
  ``ephemeral:<type>``.
* **At least once across restarts, no replay beyond the in-flight ones.** The checkpoint is the
  server's ``modified`` timestamp below which every push read is settled (every function
  answered 2xx, or the push was dead-lettered), plus the idens settled *at* that timestamp, since
  several pushes can share one. It is saved (:mod:`fastconn.checkpoint`) as it moves; a restart
  lists from it (inclusive) and drops the listed idens. A push created before the checkpoint
  (an edit or a dismissal of an old push) is not new and does not trigger again.
* **Failures.** After the dispatcher's retries a retryable failure is retried with doubling
  backoff (at least the function's ``Retry-After``), the checkpoint waiting; a final failure
  goes to ``dead_letter`` with its context, or without one is retried the same way. Ephemerals
  are not stored by Pushbullet: they are retried while the process lives (at most once across a
  crash). With ``asynchronous_invocation`` a push settles only when its callbacks report the
  result.
* **The stream** is reopened with doubling backoff when it closes or stays silent (no ``nop``)
  for ``keepalive_timeout``. The REST client waits for ``X-Ratelimit-Reset`` on a 429 or an
  exhausted budget. A refused token is a start-up :class:`~fastconn.errors.SourceError`.

Modules: :mod:`.config`, :mod:`.api` (REST), :mod:`.stream` (websocket), :mod:`.progress` (the
checkpoint boundary, pure), :mod:`.source`, :mod:`.metrics`.
"""

from __future__ import annotations

from fastconn.sources.pushbullet.config import PushbulletConfig
from fastconn.sources.pushbullet.source import PushbulletSource

__all__ = ["CONFIG_MODEL", "PushbulletConfig", "PushbulletSource", "create"]

CONFIG_MODEL = PushbulletConfig


def create(config: PushbulletConfig) -> PushbulletSource:
    return PushbulletSource(config)
