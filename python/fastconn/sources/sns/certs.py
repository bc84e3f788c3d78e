"""Fetching what an SNS envelope points at (signing certificates, confirmation links) and
keeping the certificates.

* HTTPS only to URLs :func:`.hosts.url_problem` allowed (checked by the caller), **no
  redirects** (a redirect would leave the allowed hosts), a size cap and a timeout; the proxy
  settings of the environment (``HTTPS_PROXY``, ``NO_PROXY``) apply, as egress often needs one.
* Certificates are cached by URL, least recently used out first, so a steady stream costs one
  fetch per certificate; concurrent requests for an uncached one share one fetch.
* A fetch that fails (connection, timeout, 5xx, a 4xx from the host) is *unavailable*: the
  request is answered 503 and SNS retries, since a genuine message must not be dropped for a
  network problem. A failure is remembered for ``failure_ttl`` so a burst does not hammer the
  host. A fetched body that is not an RSA certificate is *bad*: a 403.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from typing import Final

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["BadCertificate", "CertificateStore", "FetchFailed", "SnsFetcher"]

_MAX_CERT_BYTES: Final = 64 * 1024
_MAX_CONFIRM_BYTES: Final = 64 * 1024
_MAX_FAILURES_KEPT: Final = 1024


class FetchFailed(Exception):
    """The URL could not be fetched (worth a retry)."""


class BadCertificate(Exception):
    """The URL answered, with something that is not an RSA certificate."""


class SnsFetcher:
    """One HTTP client for the source's outgoing requests."""

    def __init__(self, *, ca_file: str | None, timeout: float) -> None:
        self._ca_file = ca_file
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # The CA file is read here, on start: a missing file is a start-up error, not a 503 later.
        context = ssl.create_default_context(cafile=self._ca_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=32),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            trust_env=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, url: str, max_bytes: int) -> bytes:
        """The body of a 200 answer to ``GET url``; FetchFailed otherwise."""
        session = self._session
        if session is None:
            raise FetchFailed("not started")
        try:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise FetchFailed(f"GET {url} answered {response.status}")
                body = await response.content.read(max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise FetchFailed(f"GET {url} failed: {type(exc).__name__}: {exc}") from None
        if len(body) > max_bytes:
            raise FetchFailed(f"GET {url}: the answer is over {max_bytes} bytes")
        return body

    async def confirm(self, subscribe_url: str) -> None:
        """Confirms a subscription by fetching its ``SubscribeURL``."""
        await self.get(subscribe_url, _MAX_CONFIRM_BYTES)


class CertificateStore:
    def __init__(self, fetcher: SnsFetcher, *, max_entries: int, failure_ttl: float = 2.0) -> None:
        self._fetcher = fetcher
        self._max_entries = max_entries
        self._failure_ttl = failure_ttl
        self._keys: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()
        self._pending: dict[str, asyncio.Future[rsa.RSAPublicKey]] = {}
        self._failed: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.fetches = 0
        """Certificate fetches started (a cache that works keeps this at one per URL)."""

    def __len__(self) -> int:
        return len(self._keys)

    async def public_key(self, url: str) -> rsa.RSAPublicKey:
        """The RSA key of the certificate at ``url``; FetchFailed or BadCertificate."""
        key = self._keys.get(url)
        if key is not None:
            self._keys.move_to_end(url)
            return key
        failed = self._failed.get(url)
        if failed is not None:
            if time.monotonic() < failed[0]:
                raise FetchFailed(failed[1])
            del self._failed[url]
        pending = self._pending.get(url)
        if pending is None:
            pending = self._pending[url] = asyncio.ensure_future(self._load(url))
            # Retrieved here even when every waiter was cancelled: no "never retrieved" noise.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        # shield: a cancelled request does not cancel the fetch others wait for.
        return await asyncio.shield(pending)

    async def _load(self, url: str) -> rsa.RSAPublicKey:
        self.fetches += 1
        try:
            pem = await self._fetcher.get(url, _MAX_CERT_BYTES)
            key = _rsa_key(url, pem)
        except FetchFailed as exc:
            self._failed[url] = (time.monotonic() + self._failure_ttl, str(exc))
            if len(self._failed) > _MAX_FAILURES_KEPT:  # URLs come from requests: bounded
                self._failed.popitem(last=False)
            raise
        finally:
            self._pending.pop(url, None)
        self._keys[url] = key
        while len(self._keys) > self._max_entries:
            self._keys.popitem(last=False)
        return key


def _rsa_key(url: str, pem: bytes) -> rsa.RSAPublicKey:
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise BadCertificate(f"{url} is not a PEM certificate") from None
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadCertificate(f"the certificate at {url} has no RSA key")
    return key
