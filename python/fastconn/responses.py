"""Function results as messages for a broker (``response_subject`` / ``response_topic``): one
per function, for sync responses and async callbacks alike."""

from __future__ import annotations

from fastconn.message import Outcome

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
