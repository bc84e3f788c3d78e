"""``decode = "s3"`` for any source: one broker message in, one message per record out, and
one outcome back for the broker message once every record's outcome is final.

MinIO notifies buckets through Kafka, NATS, JetStream, AMQP, MQTT and Postgres ``NOTIFY`` as
well as webhooks, and S3 through SQS and SNS. A source settles (acks, commits, naks,
dead-letters) *its* messages; this module lets it keep doing exactly that while the functions
see the records. The source passes its ``decode`` key to :meth:`SourceContext.submit
<fastconn.source.SourceContext.submit>` (or :meth:`~fastconn.source.SourceContext.resubmit`
for in-place retries); nothing else changes in the source:

* each message is decoded (:func:`fastconn.s3_events.decode_notification`) into record
  messages: topic ``s3/<bucket>/<category>/<detail>``, body = the record, the ``X-S3-*``
  headers, ``X-Message-Id`` = the record's stable id, the broker message's own headers kept
  (minus ``X-S3-*``: the carrier must not spoof them), its ordering key, delivery attempt and
  function choice kept;
* the source's callback gets one :class:`~fastconn.message.Outcome` per *broker* message, the
  worst of its records' (RETRY before FAILED before OK before UNROUTED), with the records'
  failed results (so dead-letter context names the failing function and status);
* a body that is not an S3 notification is FAILED at once (a result from function
  ``(decode)`` whose body says why): the source dead-letters or drops it as it does a message
  that failed for good; an ``s3:TestEvent`` (no records) is UNROUTED: nothing to deliver, done.

Records never hold their key across a retry (``hold_key_on_*`` cleared), and the combined
outcome says ``key_held=False``: the core holds nothing for the broker message, which the
source then retries or redelivers whole. Every record of it is delivered again (at least
once; the records' ``X-Message-Id`` lets functions drop the duplicates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from fastconn.message import ErrorKind, Message, Outcome, OutcomeCallback, TargetResult, Verdict
from fastconn.s3_events import SOURCE_RESERVED, S3EventError, decode_notification

__all__ = ["DECODE_FUNCTION", "Decode", "Split", "split_records"]

log = logging.getLogger(__name__)

Decode = Literal["none", "s3"]
"""The values of a source's ``decode`` key."""

DECODE_FUNCTION: Final = "(decode)"
"""The function name of the result that fails a message that could not be decoded."""

# Worst first: the verdict of a broker message is the first of these any record has.
_SEVERITY: Final = (Verdict.RETRY, Verdict.FAILED, Verdict.OK, Verdict.UNROUTED)


class _Carrier:
    """One broker message being settled through its records."""

    __slots__ = ("message", "outcomes", "remaining")

    def __init__(self, message: Message, remaining: int) -> None:
        self.message = message
        self.remaining = remaining
        self.outcomes: list[Outcome] = []


@dataclass(slots=True)
class Split:
    """What :func:`split_records` made of a batch of broker messages."""

    records: list[Message]
    """Submit these (with :attr:`on_outcomes`) instead of the broker messages."""
    on_outcomes: OutcomeCallback
    """Gives the source one outcome per broker message once all its records are final."""
    settled: list[Outcome]
    """The outcomes of the messages without records (not a notification: FAILED; an
    ``s3:TestEvent``: UNROUTED), for :meth:`settle_without_records`."""
    _source_callback: OutcomeCallback

    @property
    def without_records(self) -> list[Message]:
        return [outcome.message for outcome in self.settled]

    def settle_without_records(self) -> None:
        """Hands the source the outcomes of the messages without records, on the next loop
        iteration: the source finishes its submit call first, as for any outcome."""
        if self.settled:
            asyncio.get_running_loop().call_soon(_deliver, self._source_callback, self.settled)


def split_records(messages: Sequence[Message], on_outcomes: OutcomeCallback) -> Split:
    """The record messages of ``messages`` and the callback to submit them with, which calls
    ``on_outcomes`` with one outcome per broker message once all its records are final."""
    records: list[Message] = []
    settled: list[Outcome] = []
    for message in messages:
        try:
            decoded = decode_notification(message.payload)
        except S3EventError as exc:
            log.warning(
                "message %s on %s is not an S3 event notification: %s", message.message_id, message.topic, exc
            )
            settled.append(_undecodable(message, str(exc)))
            continue
        if not decoded:
            settled.append(Outcome(message, Verdict.UNROUTED, message.message_id or ""))
            continue
        carrier = _Carrier(message, len(decoded))
        kept = [(name, value) for name, value in message.headers if name.lower() not in SOURCE_RESERVED]
        records.extend(
            Message(
                record.topic,
                record.body,
                [*kept, *record.headers],
                message_id=record.message_id,
                key=message.key,
                delivery_attempt=message.delivery_attempt,
                function=message.function,
                handle=carrier,
            )
            for record in decoded
        )

    def collect(outcomes: list[Outcome]) -> None:
        done: list[Outcome] = []
        for outcome in outcomes:
            carrier: _Carrier = outcome.message.handle
            carrier.outcomes.append(outcome)
            carrier.remaining -= 1
            if carrier.remaining == 0:
                done.append(_combined(carrier))
        if done:
            on_outcomes(done)

    return Split(records, collect, settled, on_outcomes)


def _combined(carrier: _Carrier) -> Outcome:
    verdicts = {o.verdict for o in carrier.outcomes}
    verdict = next(v for v in _SEVERITY if v in verdicts)
    deciding = (
        carrier.outcomes
        if verdict in (Verdict.OK, Verdict.UNROUTED)
        else [o for o in carrier.outcomes if o.verdict is verdict]
    )
    results = tuple(r for o in deciding for r in o.results)
    message_id = carrier.message.message_id or carrier.outcomes[0].message_id
    return Outcome(carrier.message, verdict, message_id, results)


def _undecodable(message: Message, reason: str) -> Outcome:
    result = TargetResult(
        DECODE_FUNCTION,
        0,
        ErrorKind.INVALID_REQUEST,
        0,
        0.0,
        body=f"not an S3 event notification: {reason}".encode(),
    )
    return Outcome(message, Verdict.FAILED, message.message_id or "", (result,))


def _deliver(callback: OutcomeCallback, outcomes: list[Outcome]) -> None:
    try:
        callback(outcomes)
    except Exception:
        # As the dispatcher does: a bug in a source's settle code must not stop the loop.
        log.exception("outcome callback %r failed", callback)
