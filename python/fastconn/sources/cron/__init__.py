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
claim is a compare-and-set with a lease, so exactly one live replica fires each slot, and a claim
never marked done (its replica died) is taken over and fired by another replica or the restarted
daemon once its lease expires: at least once per slot. The stored slot is where catch-up resumes
after a restart. Without a store one replica is assumed and a crash loses the fires in flight.

Modules: :mod:`.schedule` (parsing, slots), :mod:`.timeline` (next fires, catch-up: pure),
:mod:`.store` (claims, leases, take-over), :mod:`.leases` (this replica's running and settled
fires), :mod:`.config`, :mod:`.source`.
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
