"""Client TLS for source connections: the ``tls_ca`` / ``tls_cert`` / ``tls_key`` keys.

One rule for every source that connects to a broker or database over TLS (Kafka, MQTT,
RabbitMQ, NATS and the cron store): the server is verified against ``tls_ca`` (a PEM bundle;
without it, the system's CAs) with host-name checking on; ``tls_cert`` + ``tls_key`` present a
client certificate (mutual TLS; the key may be inside ``tls_cert``'s file when only a combined
PEM is given, which Kafka allows). A file that cannot be loaded is a :class:`SourceError` naming
the keys and the reason at start, not a failed handshake later.
"""

from __future__ import annotations

import ssl

from fastconn.errors import SourceError

__all__ = ["client_tls_context", "tls_pair_problem"]


def tls_pair_problem(cert: str | None, key: str | None) -> str | None:
    """The configuration problem of a client certificate and key given apart, or None."""
    if (cert is None) != (key is None):
        return "tls_cert and tls_key go together"
    return None


def client_tls_context(owner: str, ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A verifying client context (see the module docstring); ``owner`` names the source in
    the error (``kafka``, ``source 'orders'``)."""
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SourceError(
            f"{owner}: cannot load the TLS files (tls_ca/tls_cert/tls_key): {exc}; "
            "expected readable PEM files (a CA bundle; a certificate and its private key)"
        ) from None
    return context
