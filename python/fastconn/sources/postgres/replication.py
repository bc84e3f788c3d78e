"""A client of PostgreSQL's streaming replication protocol for one logical slot.

asyncpg speaks only the query protocol, and peeking a slot over SQL decodes again, on the server,
everything not yet confirmed at every peek. Streaming decodes each change once and pushes it as
it commits: the connection is opened with ``replication=database``, ``START_REPLICATION SLOT ...
LOGICAL`` switches it to CopyBoth, the server sends ``XLogData`` (the same pgoutput bytes a peek
returns) and keep-alives, and the client confirms with standby status updates, whose *flush*
position becomes the slot's ``confirmed_flush_lsn``.

Framing is a pure decoder (:class:`Frames`, :func:`copy_data`), tested on arbitrary splits;
:class:`ReplicationStream` does the I/O. Connection parameters (DSN, ``PG*`` variables,
passfile, TLS) come from asyncpg's own parser, so both connections of the source reach the same
server as the same role. Authentication: trust, password, MD5 and SCRAM-SHA-256.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import secrets
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastconn._compat import asyncpg_connect_params

__all__ = [
    "Frames",
    "Keepalive",
    "ReplicationError",
    "ReplicationStream",
    "Scram",
    "ServerShutdown",
    "XLogData",
    "copy_data",
    "status_update",
]

_PROTOCOL_3: Final = 196608
_SSL_REQUEST: Final = 80877103
_PG_EPOCH_US: Final = 946_684_800_000_000
"""2000-01-01 in Unix microseconds: the protocol's clock."""
_MAX_FRAME: Final = 1 << 30
"""The server never sends a message over 1 GiB (its own allocation limit)."""


class ReplicationError(Exception):
    """The server refused (an ErrorResponse) or broke the protocol."""

    def __init__(self, message: str, sqlstate: str = "") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ServerShutdown(ReplicationError, ConnectionError):
    """SQLSTATE class 57 (operator intervention: the session was terminated, the server shuts
    down or is starting): the connection is gone, reconnecting is the fix."""


# -- pure decoders -----------------------------------------------------------------------------


_LENGTH: Final = struct.Struct("!I").unpack_from
_XLOG_HEADER: Final = struct.Struct("!QQ").unpack_from
_COPY_DATA: Final = ord("d")
_XLOG_TAG: Final = ord("w")


class Frames:
    """Backend messages out of a byte stream: ``(type, body)`` pairs, whatever the splits."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages ``data`` completes (a partial one stays for the next call)."""
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        out: list[tuple[int, bytes]] = []
        with memoryview(buffer) as view:  # one copy per message, not two
            while size - start >= 5:
                kind = buffer[start]
                (length,) = _LENGTH(buffer, start + 1)
                if length < 4 or length > _MAX_FRAME:
                    raise ReplicationError(f"malformed message from the server (length {length})")
                end = start + 1 + length
                if end > size:
                    break
                out.append((kind, bytes(view[start + 5 : end])))
                start = end
        del buffer[:start]
        return out


@dataclass(slots=True)  # not frozen: built per change, and a frozen __init__ costs more
class XLogData:
    start: int
    """WAL position of this message (the peek's ``lsn`` column)."""
    end: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    reply: bool


def copy_data(body: bytes) -> XLogData | Keepalive:
    """A CopyData message of the replication stream."""
    tag = body[:1]
    if tag == b"w" and len(body) >= 25:
        start, end, _clock = struct.unpack_from("!QQq", body, 1)
        return XLogData(start, end, body[25:])
    if tag == b"k" and len(body) >= 18:
        wal_end, _clock, reply = struct.unpack_from("!QqB", body, 1)
        return Keepalive(wal_end, bool(reply))
    raise ReplicationError(f"unexpected replication message {body[:1]!r} ({len(body)} bytes)")


def status_update(flush: int, *, reply: bool = False) -> bytes:
    """A standby status update (CopyData): written, flushed and applied through ``flush``."""
    clock = time.time_ns() // 1000 - _PG_EPOCH_US
    body = b"r" + struct.pack("!QQQqB", flush, flush, flush, clock, int(reply))
    return b"d" + struct.pack("!I", len(body) + 4) + body


def error_fields(body: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse / NoticeResponse (``M`` message, ``C`` SQLSTATE, ...)."""
    fields: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def startup_message(params: Mapping[str, str]) -> bytes:
    body = struct.pack("!I", _PROTOCOL_3)
    for key, value in params.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!I", len(body) + 4) + body


# -- SCRAM-SHA-256 (RFC 5802 / 7677, as PostgreSQL uses it: the user name is not sent in it) -----


class Scram:
    def __init__(self, password: str, *, user: str = "", nonce: str | None = None) -> None:
        self._password = password.encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._client_first_bare = f"n={user},r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return f"n,,{self._client_first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
        nonce, salt, rounds = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        if not nonce.startswith(self._nonce):
            raise ReplicationError("SCRAM: the server's nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, rounds)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        final_bare = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{final_bare}".encode()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self._server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{final_bare},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.decode().split(","))
        if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), self._server_signature):
            raise ReplicationError("SCRAM: the server's signature does not match (not the server we asked)")


# -- the stream --------------------------------------------------------------------------------


class ReplicationStream:
    """One replication connection streaming a logical slot."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = Frames()
        self._ready: collections.deque[tuple[int, bytes]] = collections.deque()
        self._confirmed = 0
        self._status_sent = time.monotonic()
        self.status_interval = 10.0
        """Seconds between status updates when nothing else sends one (the server's
        ``wal_sender_timeout`` closes a silent client after 60 s by default)."""

    @classmethod
    async def open(
        cls,
        dsn: str | None,
        settings: Mapping[str, str],
        *,
        timeout: float,
    ) -> ReplicationStream:
        """Connects with ``replication=database`` and logs in."""
        addrs, params = asyncpg_connect_params(dsn)
        failure: BaseException | None = None
        for addr in addrs:
            try:
                return await asyncio.wait_for(cls._connect(addr, params, settings), timeout)
            except (TimeoutError, OSError) as exc:
                failure = exc
        raise failure if failure is not None else OSError("no server address in the dsn")

    @classmethod
    async def _connect(cls, addr: Any, params: Any, settings: Mapping[str, str]) -> ReplicationStream:
        if isinstance(addr, str):
            reader, writer = await asyncio.open_unix_connection(addr)
            host = "localhost"
        else:
            host, port = addr
            reader, writer = await asyncio.open_connection(host, port)
        try:
            # ssl: an SSLContext, or False/None for sslmode=disable (no TLS over unix sockets).
            if params.ssl and not isinstance(addr, str):
                writer.write(struct.pack("!II", 8, _SSL_REQUEST))
                await writer.drain()
                answer = await reader.readexactly(1)
                if answer == b"S":
                    await writer.start_tls(params.ssl, server_hostname=host)
                elif str(getattr(params.sslmode, "name", "prefer")) not in ("disable", "allow", "prefer"):
                    raise ReplicationError("the server does not accept TLS and the dsn's sslmode requires it")
            stream = cls(reader, writer)
            await stream._login(params, settings)
            return stream
        except BaseException:
            writer.close()
            raise

    async def _login(self, params: Any, settings: Mapping[str, str]) -> None:
        startup = {
            "user": params.user,
            "database": params.database,
            "replication": "database",
            **settings,
        }
        self._writer.write(startup_message(startup))
        await self._writer.drain()
        password = params.password or ""
        scram: Scram | None = None
        while True:
            kind, body = await self._next()
            if kind == ord("R"):
                (code,) = struct.unpack_from("!I", body)
                if code == 0:
                    continue
                if code == 3:
                    self._send(b"p", password.encode() + b"\x00")
                elif code == 5:
                    inner = hashlib.md5((password + params.user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
                    self._send(b"p", b"md5" + outer.encode() + b"\x00")
                elif code == 10:
                    if b"SCRAM-SHA-256\x00" not in body[4:]:
                        raise ReplicationError(
                            "the server asks for a SASL mechanism other than SCRAM-SHA-256"
                        )
                    scram = Scram(password)
                    first = scram.first()
                    self._send(b"p", b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first)
                elif code == 11 and scram is not None:
                    self._send(b"p", scram.final(body[4:]))
                elif code == 12 and scram is not None:
                    scram.verify(body[4:])
                else:
                    raise ReplicationError(f"unsupported authentication request {code} from the server")
                await self._writer.drain()
            elif kind == ord("Z"):
                return
            elif kind == ord("E"):
                raise self._error(body)
            # ParameterStatus, BackendKeyData, notices: nothing to do

    async def start(self, slot: str, publication: str) -> None:
        """``START_REPLICATION`` from the slot's confirmed position (the server skips what is
        confirmed already)."""
        options = f"proto_version '1', publication_names '{_quoted_literal(publication)}'"
        query = f'START_REPLICATION SLOT "{slot}" LOGICAL 0/0 ({options})'
        self._send(b"Q", query.encode() + b"\x00")
        await self._writer.drain()
        while True:
            kind, body = await self._next()
            if kind == ord("W"):  # CopyBothResponse
                return
            if kind == ord("E"):
                raise self._error(body)

    async def read(self, limit: int, timeout: float) -> list[XLogData]:
        """Waits up to ``timeout`` for WAL data, then takes what arrived, up to ``limit``
        messages; answers keep-alives on the way. [] when none came."""
        out: list[XLogData] = []
        deadline = time.monotonic() + timeout
        while len(out) < limit:
            if not self._ready:
                if out:
                    break  # return what is here rather than wait for more
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    chunk = await asyncio.wait_for(self._reader.read(1 << 18), remaining)
                except TimeoutError:
                    break
                if not chunk:
                    raise ConnectionResetError("the server closed the replication connection")
                self._ready.extend(self._frames.feed(chunk))
                continue
            kind, body = self._ready.popleft()
            if kind == _COPY_DATA and len(body) >= 25 and body[0] == _XLOG_TAG:
                # XLogData, nearly every message: what copy_data does, without its dispatch
                start, end = _XLOG_HEADER(body, 1)
                out.append(XLogData(start, end, body[25:]))
            elif kind == _COPY_DATA:
                item = copy_data(body)
                if isinstance(item, XLogData):
                    out.append(item)
                elif item.reply:
                    self._writer.write(status_update(self._confirmed, reply=False))
                    self._status_sent = time.monotonic()
            elif kind == ord("E"):
                raise self._error(body)
            elif kind == ord("c"):
                raise ConnectionResetError("the server ended the replication stream")
        await self.tick()
        return out

    async def confirm(self, lsn: int) -> None:
        """Everything through ``lsn`` is done: the slot may move there."""
        self._confirmed = max(self._confirmed, lsn)
        self._writer.write(status_update(self._confirmed))
        self._status_sent = time.monotonic()
        await self._writer.drain()

    async def tick(self) -> None:
        """A status update when none was sent for ``status_interval`` (call while not reading)."""
        if time.monotonic() - self._status_sent >= self.status_interval:
            await self.confirm(self._confirmed)

    async def close(self) -> None:
        """Ends the stream (after a last status update) and the connection."""
        try:
            self._writer.write(status_update(self._confirmed) + _message(b"c", b"") + _message(b"X", b""))
            await asyncio.wait_for(self._writer.drain(), 2.0)
        except (TimeoutError, OSError):
            pass
        self._writer.close()

    def abort(self) -> None:
        self._writer.transport.abort()

    def _send(self, kind: bytes, body: bytes) -> None:
        self._writer.write(_message(kind, body))

    async def _next(self) -> tuple[int, bytes]:
        """The next message during log-in and start (one at a time, no stream data yet)."""
        while not self._ready:
            chunk = await self._reader.read(1 << 16)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self._ready.extend(self._frames.feed(chunk))
        return self._ready.popleft()

    @staticmethod
    def _error(body: bytes) -> ReplicationError:
        fields = error_fields(body)
        sqlstate = fields.get("C", "")
        kind = ServerShutdown if sqlstate.startswith("57") else ReplicationError
        return kind(fields.get("M", "error"), sqlstate)


def _quoted_literal(text: str) -> str:
    return text.replace("'", "''")
