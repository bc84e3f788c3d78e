"""Type stubs for the private Rust extension. The public API is :mod:`fastconn.dispatcher`."""

from collections.abc import Sequence
from typing import final

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "LATENCY_BUCKETS",
    "MAX_INFLIGHT",
    "RESERVED_HEADERS",
    "Runtime",
    "__version__",
    "build_profile",
    "check_server_tls",
    "check_tls",
    "cloudevents_calls",
    "cloudevents_replies",
    "cloudevents_reply",
    "validate_url",
    "verify_signature",
]

__version__: str
build_profile: str
LATENCY_BUCKETS: list[float]
RESERVED_HEADERS: list[str]
HOP_BY_HOP_HEADERS: list[str]
MAX_INFLIGHT: int

_TargetTuple = tuple[str, str, list[str], int | None, float | None, list[tuple[str, str]], str | None, bool]
_WireMessage = tuple[
    str, bytes, Sequence[tuple[str, str]], str, bytes | None, int, int, str | None, Sequence[tuple[str, str]]
]
# (function, status, error kind, attempts, latency, retry after, body, headers packed as
#  b"name\0value\0...")
_ResultTuple = tuple[str, int, int, int, float, float | None, bytes | None, bytes | None]
# (function, final results by status, cumulative latency buckets, latency sum, count, retries,
#  every attempt by status)
_StatsTuple = tuple[str, list[tuple[str, int]], list[int], float, int, int, list[tuple[str, int]]]

# (id, route index, method, raw path, raw query, headers, body, remote, body too large)
_IngressRequest = tuple[int, int, str, str, str, list[tuple[str, bytes]], bytes, str, bool]
# (token, source, topic, message id, payload)
_IngressAccepted = tuple[int, str, str, str, bytes | None]
# (kind, source, remote, text)
_IngressNotice = tuple[str, str | None, str, str]
# (method, path, prefix, max body bytes, oversized bodies reach the handler)
_PythonRoute = tuple[str, str, bool, int, bool]
# (header, scheme, secret, prefix, algorithm, encoding, tolerance_secs)
_SignatureTuple = tuple[str, str, str, str, str, str, int]
# (name, max_body, auth_token, signature, accepting, python fallback route index, record payload,
#  asynchronous)
_WebhookTuple = tuple[str, int, str | None, _SignatureTuple | None, bool, int | None, bool, bool]
# (name, path, max_body, max_batch, route_by, delivery, reply, auth_token, signature, accepting,
#  record_payload, (capture_replies, asynchronous))
_CloudEventsTuple = tuple[
    str,
    str,
    int,
    int,
    str,
    str,
    bool,
    str | None,
    _SignatureTuple | None,
    bool,
    bool,
    tuple[bool, bool],
]

@final
class Runtime:
    def __new__(
        cls,
        *,
        workers: int,
        max_inflight: int,
        max_inflight_per_function: int,
        max_queued: int,
        max_attempts: int,
        retry_on: list[int],
        backoff_initial: float,
        backoff_max: float,
        timeout: float,
        connect_timeout: float,
        content_type: str | None,
        user_agent: str,
        authorization: str | None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_insecure_skip_verify: bool = False,
    ) -> Runtime: ...
    @property
    def pid(self) -> int: ...
    @property
    def wake_fd(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def inflight(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    @property
    def busy_keys(self) -> int: ...
    def release_key(self, key: bytes) -> bool: ...
    def set_targets(self, targets: list[_TargetTuple]) -> None: ...
    def submit(self, base_token: int, batch: list[_WireMessage]) -> None: ...
    def drain(self) -> list[tuple[int, int, tuple[_ResultTuple, ...], bool]]: ...
    def route(self, topics: list[str]) -> list[list[str]]: ...
    def stats(self) -> list[_StatsTuple]: ...
    def close(self, timeout: float) -> int: ...
    def start_ingress(
        self,
        *,
        listen: str,
        header_timeout: float,
        idle_timeout: float,
        max_connections: int,
        max_pending: int,
        max_head_bytes: int = 65536,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        http2: bool = False,
        http2_max_concurrent_streams: int = 100,
    ) -> tuple[str, int]: ...
    @property
    def ingress_wake_fd(self) -> int: ...
    def ingress_drain(
        self,
    ) -> tuple[list[_IngressRequest], list[_IngressAccepted], list[_IngressNotice]]: ...
    def callbacks_setup(self, secret: bytes, memory: int) -> None: ...
    def async_calls(
        self,
        callback_base: str,
        timeout: float,
        max_pending: int,
        ack: str,
        max_attempts: int,
        retry_on: list[int],
        backoff_initial: float,
        backoff_max: float,
    ) -> None: ...
    def callbacks_pending(self) -> int: ...
    def callbacks_stats(self) -> list[_StatsTuple]: ...
    def callbacks_refused(self) -> list[tuple[str, int]]: ...
    def callbacks_receiving(self, call_id: str, arriving: bool) -> None: ...
    def callbacks_complete(
        self, call_id: str, status: int, headers: list[tuple[str, str]], body: bytes, too_large: bool
    ) -> int: ...
    def ingress_respond(self, answers: list[tuple[int, int, list[tuple[str, str]], bytes]]) -> int: ...
    def ingress_routes(
        self,
        python: list[_PythonRoute],
        webhooks: list[_WebhookTuple],
        cloudevents: list[_CloudEventsTuple],
        callback_max_body: int | None = None,
    ) -> None: ...
    def ingress_ready(self, ready: bool, text: str, routing: bool) -> None: ...
    def ingress_connections(self) -> tuple[int, int, int, int]: ...
    def stop_ingress(self) -> None: ...

def validate_url(url: str) -> str | None: ...
def check_tls(
    *, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> tuple[str, str] | None: ...
def check_server_tls(*, cert: str | None = None, key: str | None = None) -> tuple[str, str] | None: ...

# CloudEvents and webhook signatures (tests and the Python webhook; the ingress server calls the
# core directly). Refusals raise ValueError((status, message)).
def cloudevents_calls(
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    route_by: str = "type",
    delivery: str = "binary",
    max_body_bytes: int = 1048576,
    max_batch: int = 100,
) -> list[tuple[str, str, list[tuple[str, str]], bytes]]: ...
def cloudevents_reply(
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    mode: str = "binary",
    max_body_bytes: int = 1048576,
) -> tuple[int, list[tuple[str, str]], bytes] | None: ...
def cloudevents_replies(
    responses: list[tuple[int, list[tuple[str, str]], bytes]], *, max_body_bytes: int = 1048576
) -> list[tuple[bytes | None, str | None]]: ...
def verify_signature(
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    header: str,
    scheme: str,
    secret: bytes,
    prefix: str = "",
    algorithm: str = "sha256",
    encoding: str = "hex",
    tolerance_secs: int = 300,
    now: int | None = None,
) -> str | None: ...
