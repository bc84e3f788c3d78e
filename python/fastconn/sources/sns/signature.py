"""Checking an envelope's signature: SignatureVersion 1 is RSA PKCS#1 v1.5 with SHA-1, 2 the
same with SHA-256, over :meth:`Envelope.signed_bytes`, with the public key of the certificate
at ``SigningCertURL`` (fetched by :mod:`.certs` from an allowed host only). Nothing else is
accepted: no other version, no other padding."""

from __future__ import annotations

import base64
import binascii
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fastconn.sources.sns.envelope import Envelope

__all__ = ["signature_problem"]

_HASHES: Final = {"1": hashes.SHA1, "2": hashes.SHA256}


def signature_problem(envelope: Envelope, key: rsa.RSAPublicKey) -> str | None:
    """Why the signature does not hold, or None when it does."""
    algorithm = _HASHES.get(envelope.signature_version)
    if algorithm is None:
        return f"SignatureVersion {envelope.signature_version!r} is neither 1 nor 2"
    try:
        signature = base64.b64decode(envelope.signature, validate=True)
    except (binascii.Error, ValueError):
        return "Signature is not base64"
    try:
        key.verify(signature, envelope.signed_bytes(), padding.PKCS1v15(), algorithm())
    except InvalidSignature:
        return f"the signature (version {envelope.signature_version}) does not match the message"
    return None
