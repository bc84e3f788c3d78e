"""An accepted SNS notification → the messages functions receive.

Kept apart from the HTTP handling so that another decoder (``decode = "s3"``: one message per
S3 record inside ``Message``) can replace :func:`notification_messages` without touching the
signature checks: a decoder takes a :class:`Notification` and returns the messages; the
delivery is answered 200 once all of them are accepted for dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastconn.headers import passthrough
from fastconn.message import Message
from fastconn.s3_events import decode_notification

__all__ = ["Notification", "NotificationDecoder", "notification_messages", "s3_record_messages"]


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification that passed the checks (signature, or the raw-delivery token)."""

    topic_arn: str
    message_id: str
    message: bytes
    """The published message: ``Message`` of the envelope, or the body of a raw delivery."""
    subject: str | None = None
    timestamp: str | None = None
    attributes: tuple[tuple[str, str, str], ...] = ()
    """(name, Type, Value): envelope deliveries only (SNS does not sign them)."""
    subscription_arn: str | None = None
    raw: bool = False


NotificationDecoder = Callable[[Notification], Sequence[Message]]


def notification_messages(notification: Notification) -> list[Message]:
    """The default decoder: one message on topic = the topic ARN, body = the published message,
    ``X-Message-Id`` = the SNS message id (SNS redelivers with the same id)."""
    headers: list[tuple[str, str]] = [
        ("X-Sns-Message-Id", notification.message_id),
        ("X-Sns-Arn", notification.topic_arn),
    ]
    if notification.subject is not None:
        headers.append(("X-Sns-Subject", notification.subject))
    if notification.timestamp is not None:
        headers.append(("X-Sns-Timestamp", notification.timestamp))
    if notification.subscription_arn is not None:
        headers.append(("X-Sns-Subscription-Arn", notification.subscription_arn))
    if notification.raw:
        headers.append(("X-Sns-Raw-Delivery", "true"))
    for name, kind, value in notification.attributes:
        headers.append((f"X-Sns-Attr-{name}", value))
        headers.append((f"X-Sns-Attr-{name}-Type", kind))
    # Names that are not HTTP tokens and values HTTP cannot carry (a newline in a string
    # attribute) are left out by the shared policy rather than breaking the call.
    return [
        Message(
            notification.topic_arn,
            notification.message,
            passthrough(headers),
            message_id=notification.message_id,
        )
    ]


def s3_record_messages(notification: Notification) -> list[Message]:
    """``decode = "s3"``: one message per S3 record of the published notification, routed by
    bucket and event (``s3/<bucket>/<category>/<detail>``), with the SNS message id kept as
    ``X-Sns-Message-Id``. Raises :class:`fastconn.s3_events.S3EventError` (a 400 naming the
    problem) for a message that is not an S3 notification."""
    sns = (("X-Sns-Message-Id", notification.message_id), ("X-Sns-Arn", notification.topic_arn))
    return [
        Message(record.topic, record.body, [*record.headers, *sns], message_id=record.message_id)
        for record in decode_notification(notification.message)
    ]
