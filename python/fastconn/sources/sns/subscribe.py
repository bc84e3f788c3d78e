"""``subscribe = {...}``: the SNS ``Subscribe`` call made at start (aiobotocore, credentials
from the standard AWS chain). SNS then posts a SubscriptionConfirmation to the endpoint, which
the source confirms like any other (``auto_confirm``)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]

from fastconn.sources.sns.config import SubscribeConfig, topic_arn_region

__all__ = ["subscribe", "subscription_endpoint"]

# The source retries Subscribe itself (with its own backoff and a log line per failure): one
# botocore retry, short timeouts, so a failure is reported in seconds, not after minutes.
_CLIENT_CONFIG = AioConfig(
    retries={"mode": "standard", "max_attempts": 2}, connect_timeout=5, read_timeout=10
)


def subscription_endpoint(config: SubscribeConfig, raw_delivery_token: str | None) -> str:
    """The endpoint to subscribe: with raw delivery, the token appended as ``?token=``."""
    if not config.raw_message_delivery or raw_delivery_token is None:
        return config.endpoint
    parts = urlsplit(config.endpoint)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    query.append(("token", raw_delivery_token))
    return urlunsplit(parts._replace(query=urlencode(query)))


async def subscribe(config: SubscribeConfig, raw_delivery_token: str | None) -> str:
    """Calls ``Subscribe``; returns the subscription ARN (``pending confirmation`` until SNS's
    confirmation message was confirmed). Raises botocore's errors."""
    attributes = {"RawMessageDelivery": "true"} if config.raw_message_delivery else {}
    session = get_session()
    async with session.create_client(
        "sns",
        region_name=config.region or topic_arn_region(config.topic_arn),
        endpoint_url=config.endpoint_url,
        config=_CLIENT_CONFIG,
    ) as client:
        response = await client.subscribe(
            TopicArn=config.topic_arn,
            Protocol=config.protocol,
            Endpoint=subscription_endpoint(config, raw_delivery_token),
            Attributes=attributes,
            ReturnSubscriptionArn=True,
        )
    return str(response.get("SubscriptionArn", ""))
