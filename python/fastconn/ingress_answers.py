"""Answers of the Python ingress handlers: the endpoints the core hands to Python when their
messages need the async-invocation layer (webhook, CloudEvents) answer as the core's routes do."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import TypeVar

from fastconn.http_routes import HttpResponse
from fastconn.message import Outcome, Verdict

__all__ = ["json_error", "unless", "waited_response"]

T = TypeVar("T")


def waited_response(outcome: Outcome, message_id: str) -> HttpResponse:
    """The answer to a request that waited for its outcome (``?wait=true``): the first
    function's status and body, 404 when no function subscribes, 502 when the call failed
    without a status."""
    headers = [("X-Message-Id", message_id)]
    if outcome.verdict is Verdict.UNROUTED:
        return HttpResponse(404, headers, b"no function subscribes to this topic\n")
    first = outcome.results[0]
    headers += [("X-Function-Name", first.function), ("X-Function-Status", first.status_label)]
    if first.status == 0:
        return HttpResponse(502, headers, f"{first.function}: {first.error.label}\n".encode())
    content_type = next((v for k, v in first.headers or () if k.lower() == "content-type"), None)
    if content_type:
        headers.append(("Content-Type", content_type))
    return HttpResponse(first.status, headers, first.body or b"")


async def unless(work: Awaitable[T], event: asyncio.Event) -> T | None:
    """``work``'s result, or None (``work`` cancelled) when ``event`` is set first."""
    task = asyncio.ensure_future(work)
    interrupt = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, interrupt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        interrupt.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


def json_error(
    status: int,
    reason: str,
    *,
    retry_after: int | None = None,
    www_authenticate: str | None = None,
    message_id: str | None = None,
) -> HttpResponse:
    """``{"error": reason}``, as the core's routes answer a refusal."""
    headers = [("Content-Type", "application/json; charset=utf-8")]
    if message_id is not None:
        headers.append(("X-Message-Id", message_id))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    if www_authenticate is not None:
        headers.append(("WWW-Authenticate", www_authenticate))
    return HttpResponse(status, headers, json.dumps({"error": reason}).encode())
