"""Pushbullet's REST API, the parts a push source needs: ``/v2/users/me`` (token check),
``/v2/pushes`` (sync with ``modified_after`` and cursor paging), ``/v2/subscriptions`` and
``/v2/channels`` (channel iden → tag).

Rate limits: every response carries ``X-Ratelimit-Limit/Remaining/Reset``; a 429 (or a budget
used up) makes the next request wait until ``X-Ratelimit-Reset`` (Unix seconds, the server's
clock), capped by ``max_rate_limit_wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from fastconn.errors import SourceError

__all__ = ["ApiError", "PushbulletApi", "TokenRefused"]

log = logging.getLogger("fastconn.source.pushbullet")

_RATE_LIMIT_FALLBACK = 60.0
"""Wait after a 429 without a usable ``X-Ratelimit-Reset``."""


class ApiError(Exception):
    """A request failed (unreachable, 5xx, unreadable answer): retried later."""


class TokenRefused(SourceError):
    """401/403: the access token is wrong or revoked; retrying cannot help."""


def _error_text(body: Any) -> str:
    """``invalid_access_token: Access token is missing or invalid.`` from Pushbullet's error JSON."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code") or body.get("error_code") or ""
            message = error.get("message") or ""
            return f"{code}: {message}".strip(": ")
    return ""


class PushbulletApi:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        source: str,
        timeout: float,
        max_rate_limit_wait: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = base_url.rstrip("/") + "/v2"
        self.source = source
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_wait = max_rate_limit_wait
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._blocked_until = 0.0
        """Wall-clock time before which no request is sent (rate limit)."""
        self.requests = 0
        self.rate_limited = 0

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"Access-Token": self._token})

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """``GET /v2/<path>`` as JSON. Waits out rate limits (also on 429, then tries again);
        raises :class:`TokenRefused` on 401/403 and :class:`ApiError` on other failures."""
        assert self._session is not None, "open() first"
        while True:
            await self._wait_for_budget()
            self.requests += 1
            try:
                async with self._session.get(f"{self.base}/{path}", params=params) as response:
                    self._note_budget(response)
                    if response.status == 429:
                        self.rate_limited += 1
                        self._blocked_until = max(self._blocked_until, self._reset_time(response))
                        log.warning(
                            "pushbullet source %r: rate limited (429), waiting %.1fs for X-Ratelimit-Reset",
                            self.source,
                            max(0.0, self._blocked_until - self._clock()),
                        )
                        continue
                    body = await self._json(response)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ApiError(f"{path}: {type(exc).__name__}: {exc}".replace(self._token, "***")) from None
            if response.status in (401, 403):
                raise TokenRefused(
                    f"pushbullet source {self.source!r}: the API refused the access token "
                    f"(HTTP {response.status} {_error_text(body) or 'no detail'}): set access_token / "
                    "access_token_file to a valid token from Pushbullet's Account Settings"
                )
            if response.status != 200 or not isinstance(body, dict):
                raise ApiError(f"{path}: HTTP {response.status} {_error_text(body)}".strip())
            return body

    async def _json(self, response: aiohttp.ClientResponse) -> Any:
        try:
            return await response.json(content_type=None)
        except ValueError:
            return None

    async def _wait_for_budget(self) -> None:
        delay = self._blocked_until - self._clock()
        if delay > 0:
            await asyncio.sleep(min(delay, self._max_wait))
            self._blocked_until = 0.0

    def _reset_time(self, response: aiohttp.ClientResponse) -> float:
        now = self._clock()
        try:
            reset = float(response.headers["X-Ratelimit-Reset"])
        except (KeyError, ValueError):
            return now + _RATE_LIMIT_FALLBACK
        return min(max(reset, now), now + self._max_wait)

    def _note_budget(self, response: aiohttp.ClientResponse) -> None:
        """A budget used up (``X-Ratelimit-Remaining: 0``) waits for the reset before the next
        request instead of spending one on a certain 429."""
        remaining = response.headers.get("X-Ratelimit-Remaining")
        if remaining is not None and remaining.strip() in ("0", "-0") and response.status != 429:
            self._blocked_until = max(self._blocked_until, self._reset_time(response))

    # -- the calls the source makes ----------------------------------------------------------

    async def me(self) -> dict[str, Any]:
        return await self.get("users/me")

    async def pushes_since(self, modified_after: float, page_size: int) -> list[dict[str, Any]]:
        """Every active push modified after ``modified_after``, oldest first (the API pages
        newest first, so the whole listing is read before any is returned)."""
        pushes: list[dict[str, Any]] = []
        params = {"modified_after": repr(modified_after), "active": "true", "limit": str(page_size)}
        while True:
            body = await self.get("pushes", params)
            page = body.get("pushes")
            if not isinstance(page, list):
                raise ApiError("pushes: the answer has no pushes list")
            pushes.extend(p for p in page if isinstance(p, dict))
            cursor = body.get("cursor")
            if not cursor or not isinstance(cursor, str) or not page:
                break
            params = {**params, "cursor": cursor}
        pushes.reverse()
        return pushes

    async def channel_tags(self) -> dict[str, str]:
        """channel iden → tag over active subscriptions and owned channels."""
        tags: dict[str, str] = {}
        subscriptions = (await self.get("subscriptions")).get("subscriptions")
        for sub in subscriptions if isinstance(subscriptions, list) else ():
            channel = sub.get("channel") if isinstance(sub, dict) else None
            if isinstance(channel, dict) and sub.get("active", True) is not False:
                iden, tag = channel.get("iden"), channel.get("tag")
                if isinstance(iden, str) and isinstance(tag, str):
                    tags[iden] = tag
        owned = (await self.get("channels")).get("channels")
        for channel in owned if isinstance(owned, list) else ():
            if isinstance(channel, dict) and channel.get("active", True) is not False:
                iden, tag = channel.get("iden"), channel.get("tag")
                if isinstance(iden, str) and isinstance(tag, str):
                    tags[iden] = tag
        return tags
