"""Function results as messages for a broker (``response_subject`` / ``response_topic``): one
per function, for sync responses and async callbacks alike."""

from __future__ import annotations

from fastconn.message import Outcome, Verdict

__all__ = ["request_reply", "response_messages"]

_FORWARDED = ("content-type", "x-call-id")


def response_messages(outcome: Outcome) -> list[tuple[bytes, dict[str, str]]]:
    """``(body, headers)`` per function result of ``outcome``: the response body, with the
    function, its status (HTTP code or error kind), duration, the call id when the gateway gave
    one, and the original message's id and topic as headers."""
    out = []
    for result in outcome.results:
        headers = {
            "X-Function-Name": result.function,
            "X-Function-Status": result.status_label,
            "X-Duration-Seconds": f"{result.latency:.6f}",
            "X-Message-Id": outcome.message_id,
            "X-Topic": outcome.message.topic,
        }
        for name, value in result.headers or ():
            if name.lower() in _FORWARDED:
                headers["Content-Type" if name.lower() == "content-type" else "X-Call-Id"] = value
        out.append((result.body or b"", headers))
    return out


def request_reply(outcome: Outcome, unrouted_error: str) -> tuple[bytes, dict[str, str]]:
    """The reply to a request (NATS request-reply, AMQP ``reply_to``): the first function's
    response body, with its name, status and duration, and the message id. ``unrouted_error``
    says why there is no response when no function subscribes."""
    headers = {"X-Message-Id": outcome.message_id}
    if outcome.verdict is Verdict.UNROUTED or not outcome.results:
        headers["X-Function-Status"] = "404"
        headers["X-Fastconn-Error"] = unrouted_error
        return b"", headers
    first = outcome.results[0]
    headers["X-Function-Name"] = first.function
    headers["X-Function-Status"] = first.status_label
    headers["X-Duration-Seconds"] = f"{first.latency:.6f}"
    if first.status == 0:
        headers["X-Fastconn-Error"] = f"{first.function}: {first.error.label}"
        return b"", headers
    for name, value in first.headers or ():
        if name.lower() == "content-type":
            headers["Content-Type"] = value
    return first.body or b"", headers
