"""What the SNS tests need to play AWS: a signing key and certificate of our own
(``cryptography``), envelopes signed the documented way, an HTTPS "SNS host" on ``localhost``
(certificate from a private CA, ``trustme``) serving certificates and confirmation links, and, for
the moto end-to-end test, an HTTPS CONNECT proxy that makes ``sns.<region>.amazonaws.com``
resolve to a local TLS front of the moto server (so moto's own signing certificates are fetched
over HTTPS from moto's genuine URL, with no traffic leaving the machine).

Import explicitly: ``from sns_fixtures import ...``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ssl
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

TOPIC = "arn:aws:sns:us-east-1:123456789012:orders"
OTHER_TOPIC = "arn:aws:sns:us-east-1:123456789012:payments"
FOREIGN_TOPIC = "arn:aws:sns:us-east-1:999999999999:orders"

SIGNED_KEYS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}


class SigningKey:
    """An RSA key and a self-signed certificate for it (SNS certificates are only a carrier for
    the public key; the trust comes from the HTTPS host serving them)."""

    def __init__(self, common_name: str = "sns.amazonaws.com") -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, envelope: Mapping[str, str], version: str = "2") -> str:
        """The documented signature of ``envelope`` (base64)."""
        data = "".join(f"{k}\n{envelope[k]}\n" for k in SIGNED_KEYS[envelope["Type"]] if k in envelope)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        return base64.b64encode(self.key.sign(data.encode(), padding.PKCS1v15(), algorithm)).decode()


def notification(
    key: SigningKey,
    cert_url: str,
    *,
    message: str = "hello",
    topic: str = TOPIC,
    subject: str | None = None,
    version: str = "2",
    attributes: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": message,
        "Timestamp": "2026-12-03T10:00:00.000Z",
    }
    if subject is not None:
        envelope["Subject"] = subject
    envelope.update(
        SignatureVersion=version,
        Signature=key.sign(envelope, version),
        SigningCertURL=cert_url,
        UnsubscribeURL="https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
    )
    if attributes:
        envelope["MessageAttributes"] = {n: {"Type": t, "Value": v} for n, (t, v) in attributes.items()}
    return envelope


def confirmation(
    key: SigningKey,
    cert_url: str,
    subscribe_url: str,
    *,
    topic: str = TOPIC,
    token: str = "token-0123456789",
    kind: str = "SubscriptionConfirmation",
    version: str = "2",
) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "Type": kind,
        "MessageId": str(uuid.uuid4()),
        "Token": token,
        "TopicArn": topic,
        "Message": f"You have chosen to subscribe to the topic {topic}.",
        "SubscribeURL": subscribe_url,
        "Timestamp": "2026-12-03T10:00:00.000Z",
    }
    envelope.update(SignatureVersion=version, Signature=key.sign(envelope, version), SigningCertURL=cert_url)
    return envelope


def resign(key: SigningKey, envelope: Mapping[str, Any]) -> dict[str, Any]:
    """``envelope`` with a fresh signature (after a deliberate change)."""
    out = dict(envelope)
    out["Signature"] = key.sign(out, out["SignatureVersion"])
    return out


def sns_headers(envelope: Mapping[str, Any]) -> dict[str, str]:
    """The headers SNS sends with an envelope."""
    headers = {
        "x-amz-sns-message-type": envelope["Type"],
        "x-amz-sns-message-id": envelope["MessageId"],
        "x-amz-sns-topic-arn": envelope["TopicArn"],
        "Content-Type": "text/plain; charset=UTF-8",
        "User-Agent": "Amazon Simple Notification Service Agent",
    }
    if envelope["Type"] == "Notification":
        headers["x-amz-sns-subscription-arn"] = envelope["TopicArn"] + ":0d1e2f"
    return headers


# -- the private CA and HTTPS servers -----------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "sns-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *hosts: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*(hosts or ("localhost",))).configure_cert(context)
    return context


@dataclass
class SnsHost:
    """An HTTPS server on ``localhost`` playing an SNS host: certificates at ``/<name>.pem``
    (``pems``), confirmation links at ``/?Action=ConfirmSubscription`` (recorded), anything
    else 404. ``status`` overrides the answer for a path (to make fetches fail)."""

    ca: trustme.CA
    port: int = 0
    pems: dict[str, bytes] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    """Every request's path and query, in order."""
    _runner: web.AppRunner | None = None

    def url(self, path: str, *, host: str = "localhost", scheme: str = "https") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    @property
    def host_pattern(self) -> str:
        return f"localhost:{self.port}"

    def confirmations(self) -> list[str]:
        return [r for r in self.requests if "Action=ConfirmSubscription" in r]

    def fetches(self, path: str) -> int:
        return sum(1 for r in self.requests if r == path)

    async def start(self) -> SnsHost:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_context(self.ca, "localhost"))
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        status = self.status.get(request.path)
        if status is not None:
            headers = {"Location": self.url("/elsewhere.pem")} if 300 <= status < 400 else {}
            return web.Response(status=status, headers=headers)
        if request.path in self.pems:
            return web.Response(body=self.pems[request.path], content_type="application/x-pem-file")
        if request.query.get("Action") == "ConfirmSubscription":
            return web.Response(text="<ConfirmSubscriptionResponse/>", content_type="text/xml")
        return web.Response(status=404)


@pytest.fixture
async def sns_host(ca: trustme.CA) -> AsyncIterator[SnsHost]:
    host = await SnsHost(ca).start()
    yield host
    await host.stop()


# -- moto behind the AWS host name ------------------------------------------------------------


@dataclass
class MotoFront:
    """``https://sns.<region>.amazonaws.com`` for the daemon: an HTTPS CONNECT proxy (the daemon
    finds it through ``HTTPS_PROXY``) whose tunnels all end at a local TLS server holding a
    certificate for that name from the private CA; that server forwards each GET to moto with
    the AWS Host header, which moto routes to SNS (it serves its signing certificates so)."""

    ca: trustme.CA
    moto_url: str
    hostname: str = "sns.us-east-1.amazonaws.com"
    tunnels: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    proxy_port: int = 0
    _tls_port: int = 0
    _runner: web.AppRunner | None = None
    _proxy: asyncio.Server | None = None
    _http: aiohttp.ClientSession | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    async def start(self) -> MotoFront:
        self._http = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_context(self.ca, self.hostname))
        await site.start()
        self._tls_port = self._runner.addresses[0][1]
        self._proxy = await asyncio.start_server(self._tunnel, "127.0.0.1", 0)
        self.proxy_port = self._proxy.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
        for task in list(self._pipes):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._http is not None
        self.fetched.append(request.path)
        # moto serves every service on one port and picks the service from a request's SigV4
        # credential scope (not its Host): an unsigned GET would reach its S3.
        region = self.hostname.split(".")[1]
        scope = f"Credential=front/20260101/{region}/sns/aws4_request, SignedHeaders=host, Signature=00"
        headers = {"Host": self.hostname, "Authorization": f"AWS4-HMAC-SHA256 {scope}"}
        async with self._http.get(self.moto_url + request.path_qs, headers=headers) as r:
            return web.Response(status=r.status, body=await r.read())

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._tls_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        for src, dst in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.ensure_future(_pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
