"""``type = "cron"``: fires functions on cron schedules, once per slot across replicas.

Schedules come from the function table: a gateway function annotated ``topic: cron-function``
with ``schedule`` (and optionally ``timezone`` and ``fastconn.cron.*`` policies), or a static
``[[functions]]`` entry with ``schedule``. Every table change re-syncs the timeline, so added,
changed and removed schedules take effect without a restart.

Each fire is a ``POST`` of ``body`` (empty by default) to that one function (``Message.function``)
with ``X-Topic: cron-function``, ``X-Cron-Schedule``, ``X-Cron-Scheduled-Time`` (ISO 8601, UTC)
and ``X-Message-Id = cron:<function>:<scheduled time>``: the same id across the dispatcher's
retries, catch-up and replicas, so a function can drop a duplicate.

Replicas sharing a ``store`` (a JetStream key-value bucket) claim each slot before firing it; the
claim is a compare-and-set, so exactly one replica starts each slot, and the stored slot is where
catch-up resumes after a restart. Without a store one replica is assumed.

Modules: :mod:`.schedule` (parsing, slots), :mod:`.timeline` (next fires, catch-up: pure),
:mod:`.store` (claims), :mod:`.config`, :mod:`.source`.
"""

from fastconn.sources.cron.config import CronConfig, JetStreamKVStoreConfig
from fastconn.sources.cron.source import CronSource, message_id, scheduled_time

__all__ = [
    "CONFIG_MODEL",
    "CronConfig",
    "CronSource",
    "JetStreamKVStoreConfig",
    "create",
    "message_id",
    "scheduled_time",
]

CONFIG_MODEL = CronConfig


def create(config: CronConfig) -> CronSource:
    return CronSource(config)
