"""``type = "sns"``: an HTTP(S) endpoint that Amazon SNS topics deliver to.

``POST <path>`` (default ``/sns``) on the ingress server (``[server] listen``, where webhooks are
served); TLS usually ends at an ingress in front.
Every delivery is checked before anything is dispatched:

* the topic ARN must be in ``topic_arns``;
* the envelope's signature must verify (SignatureVersion 1 = SHA1withRSA, 2 = SHA256withRSA,
  over the documented canonical string), with the certificate at ``SigningCertURL``, fetched
  over HTTPS, without redirects, only from a host matching ``signing_cert_hosts`` (AWS's SNS
  hosts by default), and cached;
* raw deliveries (``x-amz-sns-rawdelivery: true``) carry no signature: they are refused unless
  ``raw_delivery_token`` is set and the request carries it (``?token=`` in the subscribed
  endpoint, or its basic-auth password). Anyone holding the token can then inject messages.

Answers: ``200`` once a notification's messages are accepted for dispatch (``X-Message-Id`` =
the SNS MessageId) or a subscription is confirmed; ``403`` for a forged or foreign delivery,
``400`` for a body that is not an SNS envelope (SNS does not retry a 4xx; each refusal is a
rate-limited log line and ``fastconn_source_errors_total{kind=...}``); ``503`` + ``Retry-After``
when the certificate cannot be fetched now, the dispatcher is full, the topic map is not loaded
or the daemon is stopping (SNS retries a 5xx).

SubscriptionConfirmation: with ``auto_confirm`` (default) and an allowed topic and host, its
``SubscribeURL`` is fetched (that confirms it) before the 200. UnsubscribeConfirmation is logged.
With ``subscribe = {topic_arn, endpoint}`` the source calls SNS ``Subscribe`` at start
(retrying while it fails).

Delivery guarantee: at-least-once up to the 200 (SNS retries until then, per the
subscription's delivery policy, and redelivers with the same MessageId); after it, the
dispatcher's retries (with ``asynchronous_invocation``, the message settles on its callback and
a failed callback is re-invoked like a failed call); a message that fails for good is counted in
``fastconn_messages_failed_total`` and logged, as with the webhook source.

Modules: :mod:`.config`, :mod:`.hosts` (which URLs may be fetched), :mod:`.envelope` (parsing
and the signed string), :mod:`.signature`, :mod:`.certs` (fetching and the certificate cache),
:mod:`.messages` (notification → messages: the step a ``decode`` replaces), :mod:`.subscribe`,
:mod:`.source`.
"""

from fastconn.sources.sns.config import SnsConfig
from fastconn.sources.sns.messages import (
    Notification,
    NotificationDecoder,
    notification_messages,
    s3_record_messages,
)
from fastconn.sources.sns.source import SnsSource

__all__ = [
    "CONFIG_MODEL",
    "Notification",
    "NotificationDecoder",
    "SnsConfig",
    "SnsSource",
    "create",
    "notification_messages",
]

CONFIG_MODEL = SnsConfig


def create(config: SnsConfig) -> SnsSource:
    return SnsSource(config, decode=s3_record_messages if config.decode == "s3" else notification_messages)
