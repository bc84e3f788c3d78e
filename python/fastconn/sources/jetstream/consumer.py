"""The stream and the durable pull consumer a JetStream source reads: checked, created or
updated at start. fastconn never re-creates a consumer that disappears later (that would
replay the stream from ``deliver_policy``)."""

from __future__ import annotations

import logging
from typing import Any

from fastconn.errors import SourceError
from fastconn.sources._nats_common import subject_covers
from fastconn.sources.jetstream.config import JetStreamConfig

__all__ = ["consumer_config", "ensure_consumer", "ensure_stream"]

log = logging.getLogger("fastconn.source.jetstream")


async def ensure_stream(js: Any, c: JetStreamConfig) -> None:
    """Checks the stream exists (creating it with ``create_stream``) and does not store the
    dead letters this source would then read again. Raises :class:`SourceError`."""
    import nats.errors
    import nats.js.errors

    try:
        info = await js.stream_info(c.stream)
    except nats.js.errors.NotFoundError:
        info = None
    except nats.errors.NoRespondersError:
        raise SourceError(f"source {c.name!r}: JetStream is not enabled on the NATS server") from None
    if info is not None:
        dead = c.dead_letter_subject
        if (
            dead is not None
            and not c.subjects
            and any(subject_covers(s, dead) for s in info.config.subjects or ())
        ):
            raise SourceError(
                f"source {c.name!r}: dead_letter_subject {dead!r} is stored in stream "
                f"{c.stream!r}, which this source consumes whole: set subjects to filter "
                "it out, or use a subject of another stream"
            )
        return
    if not c.create_stream:
        raise SourceError(
            f"source {c.name!r}: stream {c.stream!r} does not exist "
            "(create it, or set create_stream = true with subjects)"
        )
    if not c.subjects:
        raise SourceError(f"source {c.name!r}: create_stream needs subjects for stream {c.stream!r}")
    await js.add_stream(name=c.stream, subjects=list(c.subjects))
    log.info("source %s: created stream %s for %s", c.name, c.stream, ", ".join(c.subjects))


def consumer_config(c: JetStreamConfig) -> Any:
    """The durable pull consumer fastconn wants for ``c``."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return ConsumerConfig(
        name=c.durable,
        durable_name=c.durable,
        deliver_policy=DeliverPolicy(c.deliver_policy),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=c.ack_wait,
        # Unlimited on the server: fastconn counts deliveries against max_deliver itself and
        # dead-letters or keeps the message; a server limit would drop it silently.
        max_deliver=-1,
        max_ack_pending=c.max_ack_pending,
        filter_subject=c.subjects[0] if len(c.subjects) == 1 else None,
        filter_subjects=list(c.subjects) if len(c.subjects) > 1 else None,
    )


async def ensure_consumer(js: Any, c: JetStreamConfig) -> Any:
    """Creates the durable, or updates it to the configured settings (the server may refuse:
    it keeps its own then). Returns its ``ConsumerInfo``. Raises :class:`SourceError` for a push
    consumer of that name."""
    import nats.js.errors

    wanted = consumer_config(c)
    try:
        info = await js.consumer_info(c.stream, c.durable)
    except nats.js.errors.NotFoundError:
        info = None
    if info is not None and info.config.deliver_subject:
        raise SourceError(
            f"source {c.name!r}: consumer {c.durable!r} of stream {c.stream!r} is a push "
            "consumer; fastconn needs a pull consumer (use another durable name)"
        )
    if info is None:
        info = await js.add_consumer(c.stream, wanted)
        log.info("source %s: created durable pull consumer %s on stream %s", c.name, c.durable, c.stream)
    else:
        have = info.config
        filters = tuple(have.filter_subjects or ([have.filter_subject] if have.filter_subject else []))
        if (have.ack_wait, have.max_deliver, have.max_ack_pending, filters) != (
            c.ack_wait,
            -1,
            c.max_ack_pending,
            tuple(c.subjects),
        ):
            try:
                info = await js.add_consumer(c.stream, wanted)
                log.info("source %s: updated consumer %s to the configured settings", c.name, c.durable)
            except nats.js.errors.APIError as exc:
                log.warning(
                    "source %s: consumer %s keeps its existing settings (update refused: %s)",
                    c.name,
                    c.durable,
                    exc,
                )
    return info
