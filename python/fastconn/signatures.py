"""Webhook signature settings, shared by every HTTP route that checks one (``type = "webhook"``
and ``type = "cloudevents"``). The check itself is the core's
(``rust/core/src/signature.rs``: constant time, one implementation for Python and Rust routes);
this module only holds the config keys and calls it.

Schemes: ``hmac`` (GitHub ``X-Hub-Signature-256: sha256=<hex>``, Shopify base64), ``stripe``
(``Stripe-Signature: t=<unix>,v1=<hex>``, HMAC of ``<t>.<body>``, replays older than
``signature_tolerance`` refused), ``token`` (GitLab ``X-Gitlab-Token``: the header is the secret).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fastconn import _core

# RFC 9110's token characters: what a header name may hold.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

__all__ = ["SignatureKeys", "SignatureTuple", "signature_problem"]

SignatureTuple = tuple[str, str, str, str, str, str, int]
"""A route's signature check as the core's route table takes it (webhook and CloudEvents alike):
(header, scheme, secret, prefix, algorithm, encoding, tolerance_secs)."""


class SignatureKeys(BaseModel):
    """The signature keys of a route's config table; the check is off while ``hmac_secret`` is
    None."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hmac_secret: str | None = None
    """Shared secret (for ``token``, the token itself); None disables the check."""
    signature_header: str = Field(default="X-Hub-Signature-256", min_length=1)
    signature_scheme: Literal["hmac", "stripe", "token"] = "hmac"
    signature_prefix: str = "sha256="
    """Text before the digest (``hmac``), or the key of Stripe's signature entries (``v1=``)."""
    signature_algorithm: Literal["sha256", "sha1"] = "sha256"
    signature_encoding: Literal["hex", "base64"] = "hex"
    signature_tolerance: int = Field(default=300, ge=1)
    """``stripe``: seconds a signed timestamp may be away from now."""

    @field_validator("signature_header")
    @classmethod
    def _header_is_a_header_name(cls, header: str) -> str:
        if not _TOKEN.fullmatch(header):
            raise ValueError(
                f"signature_header {header!r} is not an HTTP header name (letters, digits and - only), "
                "e.g. X-Hub-Signature-256"
            )
        return header

    def signature_rule(self) -> SignatureTuple | None:
        """The check as the core's routes take it, or None when ``hmac_secret`` is unset. Both
        the Rust routes and :func:`signature_problem` verify with the same core rule."""
        if self.hmac_secret is None:
            return None
        return (
            self.signature_header,
            self.signature_scheme,
            self.hmac_secret,
            self.signature_prefix,
            self.signature_algorithm,
            self.signature_encoding,
            self.signature_tolerance,
        )


def signature_problem(keys: SignatureKeys, headers: Sequence[tuple[str, str]], body: bytes) -> str | None:
    """Why the request's signature is refused (the 401 message), or None when it verifies or no
    check is configured."""
    if keys.hmac_secret is None:
        return None
    # A value that is not UTF-8 (aiohttp keeps its bytes as surrogates) becomes U+FFFD, which
    # can never match: a wrong signature, not an encoding error.
    clean = [
        (name, value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")) for name, value in headers
    ]
    return _core.verify_signature(
        clean,
        body,
        header=keys.signature_header,
        scheme=keys.signature_scheme,
        secret=keys.hmac_secret.encode(),
        prefix=keys.signature_prefix,
        algorithm=keys.signature_algorithm,
        encoding=keys.signature_encoding,
        tolerance_secs=keys.signature_tolerance,
    )
