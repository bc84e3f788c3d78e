"""Reading request bodies with a size limit of our own (streamed), rather than aiohttp's
``client_max_size``, which bounds only ``request.read()`` and answers a bare 413."""

from __future__ import annotations

from aiohttp import web

__all__ = ["read_at_most"]


async def read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed ``limit`` bytes (from the
    ``Content-Length``, or while reading a chunked body)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
