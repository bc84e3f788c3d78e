"""A local double of Pushbullet's documented API (aiohttp): the realtime stream and the REST
calls a push source makes.

* ``GET /websocket/<token>``: a websocket sending ``{"type": "nop"}`` every ``nop_interval``,
  ``{"type": "tickle", "subtype": "push"}`` when a push is created or changed, and ephemeral
  ``{"type": "push", "push": {...}}`` frames. A bad token is refused (401) at the handshake.
* ``GET /v2/pushes``: ``modified_after`` (strict), ``active``, ``limit`` (default and maximum
  500) and ``cursor`` paging, newest ``modified`` first; deleted pushes come back as
  ``{iden, active: false, created, modified}`` unless ``active=true``.
* ``GET /v2/users/me``, ``/v2/subscriptions``, ``/v2/channels``.
* ``Access-Token`` header checked: 401 with Pushbullet's error JSON otherwise.
* Rate limit: ``X-Ratelimit-Limit/Remaining/Reset`` on every answer; once the budget of the
  current window is spent, 429 until ``X-Ratelimit-Reset``.

Hooks: :meth:`drop_streams` (close every socket), ``nops = False`` (keep sockets open and
silent), :meth:`rate_limit` (a budget per window).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

__all__ = ["PushbulletDouble"]

_ERROR = {
    "error": {
        "code": "invalid_access_token",
        "type": "invalid_request",
        "message": "Access token is missing or invalid.",
        "cat": "(=^..^=)",
    },
    "error_code": "invalid_access_token",
}


@dataclass
class PushbulletDouble:
    token: str = "o.test-token"
    nop_interval: float = 0.2
    host: str = "127.0.0.1"
    port: int = 0
    nops: bool = True
    """False: sockets stay open and send nothing (a half-dead connection)."""
    pushes: dict[str, dict[str, Any]] = field(default_factory=dict)
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Subscribed channels by tag."""
    owned: dict[str, dict[str, Any]] = field(default_factory=dict)
    announce_remaining: bool = True
    """False: no ``X-Ratelimit-Remaining`` header (clients only learn of the limit from a 429)."""
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    """Every authorised REST request: path and query."""
    stream_connections: int = 0
    rate_limited: int = 0
    _order: list[tuple[float, str]] = field(default_factory=list)
    """(modified, iden) of every push, ascending: listings are a bisect and a slice, as an
    indexed server's would be (a linear scan would make the double the bottleneck)."""
    _sockets: set[web.WebSocketResponse] = field(default_factory=set)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _last_modified: float = 0.0
    _budget: int | None = None
    _window: float = 1.0
    _window_end: float = 0.0
    _used: int = 0
    _runner: web.AppRunner | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> PushbulletDouble:
        app = web.Application()
        app.router.add_get("/websocket/{token}", self._stream)
        app.router.add_get("/v2/users/me", self._me)
        app.router.add_get("/v2/pushes", self._list_pushes)
        app.router.add_get("/v2/subscriptions", self._subscriptions)
        app.router.add_get("/v2/channels", self._owned_channels)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.drop_streams()
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PushbulletDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stream_url(self) -> str:
        return f"ws://{self.host}:{self.port}/websocket"

    # -- the world -------------------------------------------------------------------------

    def add_channel(self, tag: str, *, subscribed: bool = True) -> str:
        iden = f"ch{next(self._ids)}"
        channel = {"iden": iden, "tag": tag, "name": tag.title(), "description": "", "active": True}
        (self.channels if subscribed else self.owned)[tag] = channel
        return iden

    def now(self) -> float:
        """The server's clock: strictly increasing, as the real server's timestamps are."""
        self._last_modified = max(time.time(), self._last_modified + 1e-6)
        return round(self._last_modified, 6)

    def create_push(
        self,
        channel: str | None = None,
        *,
        tickle: bool = True,
        modified: float | None = None,
        dismissed: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        """A stored push (of channel tag ``channel``, which must exist), then a tickle."""
        stamp = self.now() if modified is None else modified
        iden = f"p{next(self._ids):06d}"
        push: dict[str, Any] = {
            "iden": iden,
            "active": True,
            "created": stamp,
            "modified": stamp,
            "type": "note",
            "dismissed": dismissed,
            "direction": "incoming",
            "sender_name": "tester",
            "title": f"title {iden}",
            "body": f"body {iden}",
            **fields,
        }
        if channel is not None:
            found = self.channels.get(channel) or self.owned.get(channel)
            push["channel_iden"] = found["iden"] if found else f"unknown-{channel}"
        self._store(push)
        if tickle:
            self.tickle()
        return push

    def _store(self, push: dict[str, Any]) -> None:
        old = self.pushes.get(push["iden"])
        if old is not None:
            del self._order[bisect.bisect_left(self._order, (old["modified"], old["iden"]))]
        self.pushes[push["iden"]] = push
        bisect.insort(self._order, (push["modified"], push["iden"]))

    def change_push(self, iden: str, *, tickle: bool = True, **fields: Any) -> dict[str, Any]:
        push = {**self.pushes[iden], **fields, "modified": self.now()}
        self._store(push)
        if tickle:
            self.tickle()
        return push

    def delete_push(self, iden: str) -> None:
        push = self.pushes[iden]
        self._store({"iden": iden, "active": False, "created": push["created"], "modified": self.now()})
        self.tickle()

    def tickle(self, subtype: str = "push") -> None:
        self._broadcast({"type": "tickle", "subtype": subtype})

    def ephemeral(self, push: dict[str, Any]) -> None:
        self._broadcast({"type": "push", "push": push})

    def rate_limit(self, budget: int | None, window: float = 1.0) -> None:
        """At most ``budget`` requests per ``window`` seconds (None: unlimited)."""
        self._budget, self._window, self._window_end, self._used = budget, window, 0.0, 0

    async def drop_streams(self) -> None:
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await ws.close()
        self._sockets.clear()

    def requests_to(self, path: str) -> list[dict[str, str]]:
        return [query for p, query in self.requests if p == path]

    # -- handlers --------------------------------------------------------------------------

    def _broadcast(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame)
        for ws in list(self._sockets):
            if not ws.closed:
                task = asyncio.get_running_loop().create_task(ws.send_str(text))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.json_response(_ERROR, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.stream_connections += 1
        self._sockets.add(ws)
        nop = asyncio.get_running_loop().create_task(self._nops(ws))
        try:
            async for message in ws:
                if message.type is WSMsgType.ERROR:
                    break
        finally:
            nop.cancel()
            self._sockets.discard(ws)
        return ws

    async def _nops(self, ws: web.WebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.nop_interval)
            if self.nops and not ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str('{"type": "nop"}')

    def _gate(self, request: web.Request) -> web.Response | None:
        """401 for a bad token, 429 over the budget; None when the request may proceed."""
        if request.headers.get("Access-Token") != self.token:
            return web.json_response(_ERROR, status=401)
        now = time.time()
        if now >= self._window_end:
            self._window_end, self._used = now + self._window, 0
        self._used += 1
        if self._budget is not None and self._used > self._budget:
            self.rate_limited += 1
            return web.json_response(
                {"error": {"code": "too_many_requests", "type": "invalid_request", "message": "Slow down"}},
                status=429,
                headers=self._limit_headers(),
            )
        self.requests.append((request.path, dict(request.query)))
        return None

    def _limit_headers(self) -> dict[str, str]:
        budget = self._budget if self._budget is not None else 32768
        headers = {"X-Ratelimit-Limit": str(budget), "X-Ratelimit-Reset": f"{self._window_end:.3f}"}
        if self.announce_remaining:
            headers["X-Ratelimit-Remaining"] = str(max(0, budget - self._used))
        return headers

    def _answer(self, body: dict[str, Any]) -> web.Response:
        return web.json_response(body, headers=self._limit_headers())

    async def _me(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        return self._answer(
            {"iden": "u1", "email": "tester@example.invalid", "name": "Tester", "created": 1.0}
        )

    async def _subscriptions(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        subs = [
            {
                "iden": f"s-{c['iden']}",
                "active": True,
                "created": 1.0,
                "modified": 1.0,
                "muted": False,
                "channel": c,
            }
            for c in self.channels.values()
        ]
        return self._answer({"subscriptions": subs})

    async def _owned_channels(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        return self._answer({"channels": list(self.owned.values())})

    async def _list_pushes(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        query = request.query
        try:
            after = float(query.get("modified_after", "0"))
            limit = min(int(query.get("limit", "500")), 500)
        except ValueError:
            return web.json_response(
                {"error": {"code": "invalid_request", "message": "bad number"}}, status=400
            )
        active_only = query.get("active") == "true"
        low = bisect.bisect_right(self._order, (after, "\uffff"))
        high = len(self._order)
        if "cursor" in query:
            # The cursor is the position after the last item handed out: stable while pushes change.
            modified, iden = json.loads(base64.urlsafe_b64decode(query["cursor"]))
            high = bisect.bisect_left(self._order, (modified, iden))
        page: list[dict[str, Any]] = []
        position = high
        while position > low and len(page) < limit:
            position -= 1
            push = self.pushes[self._order[position][1]]
            if push["active"] or not active_only:
                page.append(push)
        body: dict[str, Any] = {"pushes": page}
        if page and position > low:
            last = page[-1]
            body["cursor"] = base64.urlsafe_b64encode(
                json.dumps([last["modified"], last["iden"]]).encode()
            ).decode()
        return self._answer(body)
