"""Reading request bodies with a size limit of our own (streamed), rather than aiohttp's
``client_max_size``, which bounds only ``request.read()`` and answers a bare 413."""

from __future__ import annotations

from aiohttp import web

__all__ = ["IncompleteBody", "read_at_most"]


class IncompleteBody(Exception):
    """The body did not arrive whole: the client went away or sent a malformed chunked body.
    The request is at fault, not the server: answer (if anyone listens) without a traceback."""


async def read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes (from the
    ``Content-Length``, or while reading a chunked body). Raises :class:`IncompleteBody`."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except (ConnectionError, web.RequestPayloadError) as exc:
        raise IncompleteBody(f"the body did not arrive whole ({size} bytes read): {exc}") from exc
    return b"".join(chunks)
