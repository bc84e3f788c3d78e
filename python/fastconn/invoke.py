"""``fastconn invoke``: stdin → one function through the gateway, like ``faas-cli invoke``."""

from __future__ import annotations

import dataclasses
import sys
import uuid

from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.message import Message, Verdict


async def invoke(
    gateway: str,
    name: str,
    body: bytes,
    *,
    headers: list[tuple[str, str]],
    asynchronous: bool,
    callback_url: str | None,
    topic: str,
    credentials: tuple[str, str] | None,
    options: DispatchOptions | None = None,
) -> int:
    """Calls the function with fastconn's own retry policy; prints the response body (sync) or
    the call id (async) and returns a process exit code. ``options`` are the configured ones
    (retries, timeout, TLS); one call needs one worker and no default content type."""
    base = gateway.rstrip("/")
    path = "async-function" if asynchronous else "function"
    target = FunctionTarget(name, (topic,), f"{base}/{path}/{name}")
    # The call id and callback URL are fastconn's own headers (the core drops them from a
    # message's headers, so that no message can redirect a function's result).
    own: list[tuple[str, str]] = []
    if asynchronous:
        own.append(("X-Call-Id", uuid.uuid4().hex))
        if callback_url:
            own.append(("X-Callback-Url", callback_url))
    options = dataclasses.replace(
        options or DispatchOptions(), workers=1, max_inflight=1, basic_auth=credentials, content_type=None
    )
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions([target])
        [outcome] = await dispatcher.call([Message(topic, body, headers, own_headers=own)], capture=True)
    result = outcome.results[0] if outcome.results else None
    if result is None or outcome.verdict is not Verdict.OK:
        detail = result.status_label if result else "no route"
        body_text = (result.body or b"").decode(errors="replace").strip() if result else ""
        print(f"fastconn: {name} failed: {detail}" + (f": {body_text}" if body_text else ""), file=sys.stderr)
        return 1
    if asynchronous:
        call_id = next((v for k, v in result.headers or () if k.lower() == "x-call-id"), None)
        print(f"Function queued for asynchronous processing. Call id: {call_id or '(none returned)'}")
    else:
        sys.stdout.buffer.write(result.body or b"")
        sys.stdout.flush()
    return 0
