"""What the Kafka source remembers per assigned partition and per fetched record. Plain
state: no I/O, tested without a broker."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastconn.message import Message
from fastconn.watermark import Watermark

__all__ = ["Partition", "Record", "fetch_budget"]


@dataclasses.dataclass(eq=False, slots=True)
class Partition:
    """One assigned partition. A new object per assignment: outcomes that come back for an old
    (revoked) object are recognised and ignored."""

    tp: Any
    """aiokafka ``TopicPartition``."""
    order_prefix: bytes
    """Ordering keys are ``<topic>\\0<partition>\\0[<record key>]``: unique across partitions."""
    fixed_headers: tuple[tuple[str, str], ...]
    id_prefix: str
    mark: Watermark = dataclasses.field(default_factory=Watermark)
    in_core: int = 0
    """Messages handed to (or being handed to) the dispatcher without an outcome yet."""
    publishing: int = 0
    """Messages whose dead letter or responses are being published."""
    retrying: dict[int, Record] = dataclasses.field(default_factory=dict)
    """Messages waiting for their redelivery backoff, by offset."""
    paused: bool = False
    shrunk_checks: int = 0
    """Consecutive commit ticks that found the log's end below the fetch position."""
    revoking: bool = False
    revoked: bool = False

    @property
    def busy(self) -> bool:
        return self.in_core > 0 or self.publishing > 0

    def should_pause(self, budget: int) -> bool:
        """Whether the partition has used up its pending budget and is still fetched."""
        return not self.paused and self.mark.outstanding >= budget

    def should_resume(self, resume_below: int) -> bool:
        """Whether a paused partition has come back below ``resume_below`` pending messages."""
        return self.paused and not self.revoking and self.mark.outstanding < resume_below


@dataclasses.dataclass(eq=False, slots=True)
class Record:
    """What the source remembers about one fetched message (``Message.handle``)."""

    partition: Partition
    offset: int
    key: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    message: Message
    deliveries: int = 1
    stuck: bool = False
    held: bool = False
    """Its ordering key is held in the core for its redelivery (``resume=True``)."""
    timer: asyncio.TimerHandle | None = None


def fetch_budget(*, capacity: int, queued: int, stuck: int, max_poll_records: int, batch_size: int) -> int:
    """How many records the next fetch may take: within one dispatcher chunk, and leaving half
    the dispatcher (at most) for redeliveries, which may hold keys other messages wait behind."""
    reserve = min(stuck, capacity // 2)
    free = capacity - queued - reserve
    return max(0, min(free, max_poll_records, batch_size))
