"""S3 and MinIO bucket notifications turned into one message per record (``decode = "s3"``).

Pure functions, shared by every source that carries these notifications (SQS, SNS, webhooks):
the body is the notification JSON as S3 sends it to SQS (``{"Records": [...]}``), as SNS wraps
it (an SNS envelope whose ``Message`` string holds that JSON), or as MinIO posts it (the same
records plus top-level ``EventName`` and ``Key``).

Topic form: ``s3/<bucket>/<event category>/<event detail>``, the event name's ``:`` parts as
topic levels and MinIO's ``s3:`` prefix dropped, so AWS and MinIO route alike:
``s3:ObjectCreated:Put`` on bucket ``img.example`` is ``s3/img.example/ObjectCreated/Put``.
Bucket names never contain ``/`` (but may contain ``.``), so the levels are unambiguous, and
the router's ``/`` wildcards select by bucket and event: ``s3/img.example/#`` (every event of
the bucket), ``s3/+/ObjectCreated/#`` (every creation in any bucket),
``s3/+/ObjectRemoved/Delete``.

The ``s3:TestEvent`` S3 sends when a notification configuration is saved has no records: it
decodes to no message (nothing to deliver, the carrier message is done). A body that is not
such a notification raises :class:`S3EventError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_plus

from fastconn.headers import valid_value

__all__ = [
    "HEADER_BUCKET",
    "HEADER_EVENT",
    "HEADER_KEY",
    "HEADER_SIZE",
    "HEADER_VERSION_ID",
    "SOURCE_RESERVED",
    "TOPIC_PREFIX",
    "S3EventError",
    "S3Record",
    "decode_notification",
    "event_topic",
    "record_id",
]

TOPIC_PREFIX: Final = "s3"
HEADER_BUCKET: Final = "X-S3-Bucket"
HEADER_KEY: Final = "X-S3-Key"
HEADER_EVENT: Final = "X-S3-Event"
HEADER_SIZE: Final = "X-S3-Size"
HEADER_VERSION_ID: Final = "X-S3-Version-Id"
SOURCE_RESERVED: Final = frozenset(
    name.lower() for name in (HEADER_BUCKET, HEADER_KEY, HEADER_EVENT, HEADER_SIZE, HEADER_VERSION_ID)
)
"""Header names only this decoder sets: a carrier's own attributes must not spoof them."""

_TEST_EVENT: Final = "s3:TestEvent"
_MAX_RECORDS: Final = 10_000
"""Far above what S3 (a few per notification) or MinIO (one) sends: a bound on hostile input."""


class S3EventError(ValueError):
    """The body is not an S3/MinIO notification; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class S3Record:
    """One record of a notification, ready to become a message."""

    topic: str
    body: bytes
    """The record alone, as JSON."""
    headers: tuple[tuple[str, str], ...]
    message_id: str
    bucket: str
    key: str
    """The object key, decoded."""
    event: str
    """The event name without MinIO's ``s3:`` prefix (``ObjectCreated:Put``)."""


def decode_notification(body: bytes | str | Mapping[str, Any]) -> tuple[S3Record, ...]:
    """The records of one notification (none for ``s3:TestEvent``); raises
    :class:`S3EventError` for anything else."""
    doc = _document(body)
    doc = _unwrap_sns(doc)
    if doc.get("Event") == _TEST_EVENT:
        return ()
    records = doc.get("Records")
    if records is None:
        keys = ", ".join(sorted(str(k) for k in doc)[:8]) or "none"
        raise S3EventError(f"not an S3 event notification: no 'Records' array (top-level keys: {keys})")
    if not isinstance(records, list):
        raise S3EventError(f"'Records' must be an array, got {type(records).__name__}")
    if len(records) > _MAX_RECORDS:
        raise S3EventError(f"{len(records)} records in one notification (at most {_MAX_RECORDS})")
    return tuple(_record(i, record) for i, record in enumerate(records))


def event_topic(bucket: str, event_name: str) -> str:
    """The topic of an event on ``bucket`` (see the module docstring)."""
    return "/".join((TOPIC_PREFIX, bucket, *_event(event_name).split(":")))


def record_id(bucket: str, key: str, version_id: str, sequencer: str, event: str) -> str:
    """A stable id of one event on one object: the same for every redelivery of the record, so
    functions can drop duplicates. The sequencer tells events on one key apart; the event name
    covers event types that have none."""
    digest = hashlib.sha256()
    for part in (bucket, key, version_id, sequencer, event):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return f"s3-{digest.hexdigest()[:32]}"


def _document(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise S3EventError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise S3EventError(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _unwrap_sns(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """S3 → SNS → (SQS or HTTP): the S3 JSON is the string in the SNS envelope's ``Message``."""
    message = doc.get("Message")
    if "Records" in doc or not isinstance(message, str) or doc.get("Type") not in (None, "Notification"):
        return doc
    try:
        inner = json.loads(message)
    except ValueError as exc:
        raise S3EventError(f"SNS envelope: 'Message' is not JSON: {exc}") from None
    if not isinstance(inner, dict):
        raise S3EventError(f"SNS envelope: 'Message' is not a JSON object ({type(inner).__name__})")
    return inner


def _record(index: int, record: object) -> S3Record:
    where = f"Records[{index}]"
    if not isinstance(record, dict):
        raise S3EventError(f"{where}: expected an object, got {type(record).__name__}")
    event_name = _text(record, "eventName", where)
    s3 = _object(record, "s3", where)
    bucket = _text(_object(s3, "bucket", f"{where}.s3"), "name", f"{where}.s3.bucket")
    if "/" in bucket:
        raise S3EventError(f"{where}.s3.bucket.name: {bucket!r} contains '/' (not a bucket name)")
    obj = _object(s3, "object", f"{where}.s3")
    raw_key = _text(obj, "key", f"{where}.s3.object")
    key = unquote_plus(raw_key)
    version = _optional_text(obj, "versionId")
    sequencer = _optional_text(obj, "sequencer")
    size = obj.get("size")
    event = _event(event_name)
    headers = [(HEADER_BUCKET, bucket), (HEADER_EVENT, event)]
    if valid_value(key):  # keys may hold control characters HTTP cannot carry: the body has it
        headers.append((HEADER_KEY, key))
    if isinstance(size, int) and not isinstance(size, bool):
        headers.append((HEADER_SIZE, str(size)))
    if version:
        headers.append((HEADER_VERSION_ID, version))
    return S3Record(
        topic=event_topic(bucket, event_name),
        body=json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"),
        headers=tuple(headers),
        message_id=record_id(bucket, key, version, sequencer, event),
        bucket=bucket,
        key=key,
        event=event,
    )


def _event(event_name: str) -> str:
    return event_name.removeprefix("s3:")


def _object(parent: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = parent.get(name)
    if not isinstance(value, dict):
        raise S3EventError(f"{where}.{name}: missing or not an object")
    return value


def _text(parent: Mapping[str, Any], name: str, where: str) -> str:
    value = parent.get(name)
    if not isinstance(value, str) or not value:
        raise S3EventError(f"{where}.{name}: missing or not a non-empty string")
    return value


def _optional_text(parent: Mapping[str, Any], name: str) -> str:
    value = parent.get(name)
    return value if isinstance(value, str) else ""
