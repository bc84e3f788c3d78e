"""Configuration of a CloudEvents 1.0 HTTP route (``[[sources]] type = "cloudevents"``).

The route itself is served by the ingress server in the Rust core, which decodes requests with
``fastconn_core::cloudevents`` (binary, structured and batched modes; see that module's doc for
the calls) and checks signatures with ``fastconn_core::signature``. This module is the validated
table the server is configured from; it is not yet a ``fastconn.sources`` type, so the config
loader accepts ``type = "cloudevents"`` only once the ingress server registers it.

Delivery guarantee: as for webhooks, at-most-once after the ``202`` (the sender retries on
``503``); a batch is accepted whole or refused whole, so a ``202`` covers every event in it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from fastconn.signatures import SignatureKeys

__all__ = ["CloudEventsConfig"]


class CloudEventsConfig(SignatureKeys):
    """``[[sources]] type = "cloudevents"``: CloudEvents POSTed to ``path``.

    Signature keys (``hmac_secret``, ``signature_*``) are :class:`SignatureKeys`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["cloudevents"] = "cloudevents"
    name: str = "cloudevents"
    path: str = "/cloudevents"
    """URL path of the route (exact match)."""
    route_by: Literal["type", "source", "subject"] = "type"
    """The attribute whose value is the topic (``com.github.push`` → subscribe ``com.github.*``)."""
    delivery: Literal["binary", "structured"] = "binary"
    """How functions receive the event: ``ce-*`` headers + data, or one JSON object."""
    reply: bool = False
    """Return a function's reply event to senders that ask with ``Prefer: reply``."""
    max_body_bytes: int = Field(default=1048576, ge=1)
    max_batch: int = Field(default=100, ge=1, le=10000)
    """Most events in one ``application/cloudevents-batch+json`` request (more → 413)."""
    auth_token: str | None = None
    """Bearer token required in ``Authorization: Bearer <token>``; None disables the check."""
    # A CloudEvents sender is rarely GitHub: no signature header is assumed unless configured.
    signature_header: str = Field(default="X-Signature", min_length=1)

    @field_validator("path")
    @classmethod
    def _path_is_a_plain_absolute_path(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with '/', e.g. /cloudevents")
        bad = next((c for c in path if c in "?#" or c <= " " or c == "\x7f"), None)
        if bad is not None:
            raise ValueError(
                f"path {path!r} contains {bad!r}: give the path alone, without query, fragment or spaces"
            )
        if path == "/webhook" or path.startswith("/webhook/") or path in ("/healthz", "/readyz", "/metrics"):
            raise ValueError(
                f"path {path!r} is taken by fastconn's own routes: choose another, e.g. /cloudevents"
            )
        return path
