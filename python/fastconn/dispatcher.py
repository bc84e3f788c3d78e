"""The asyncio side of the bridge to the Rust core.

One FFI call per batch in each direction:

* ``submit`` reserves capacity for the batch (awaiting it when the core is full: that wait is
  the backpressure sources turn into "stop fetching, don't ack"), then hands the whole batch
  to ``Runtime.submit``, which never blocks.
* The core pushes completions onto a queue and writes an eventfd once per burst; the loop's
  reader callback drains everything in one ``Runtime.drain`` call and resolves the batches'
  callbacks on the loop thread. Tokio threads never touch Python objects or the GIL.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from fastconn import _core
from fastconn.callbacks import CallbackMetrics, Callbacks, CallbackSettings
from fastconn.errors import DispatcherClosed
from fastconn.functions import FunctionTarget
from fastconn.message import Message, Outcome, OutcomeCallback, Verdict

__all__ = ["DispatchOptions", "Dispatcher", "OutcomeCallback"]

log = logging.getLogger("fastconn.dispatcher")

_INDEX_BITS = 20
"""Tokens are ``batch_id << 20 | index``: batches are capped at 2**20 messages."""
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_VERDICTS = tuple(Verdict)
_INGRESS_TOKEN = 1 << 63
"""Tokens with this bit are messages the ingress server submitted itself (see fastconn.ingress)."""
_VERSION = _core.__version__


@dataclass(frozen=True, slots=True)
class DispatchOptions:
    """Everything the core needs; built from ``[dispatch]`` and ``[gateway]`` by the daemon."""

    workers: int = 2
    max_inflight: int = 1024
    max_inflight_per_function: int = 256
    max_queued: int | None = None
    """Messages accepted and not completed; default ``max(2 * max_inflight, 2 * batch_size)``."""
    max_attempts: int = 5
    retry_on: tuple[int, ...] = (408, 429, 500, 502, 503, 504)
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    timeout: float = 30.0
    connect_timeout: float = 5.0
    content_type: str | None = "text/plain"
    basic_auth: tuple[str, str] | None = None
    batch_size: int = 512
    capture_responses: bool = False
    """Capture every response body and headers (for ``print_response_body``)."""
    tls_ca: str | None = None
    """PEM file of CA certificates trusted for https:// functions, on top of the system's roots."""
    tls_cert: str | None = None
    """Client certificate (PEM) for mutual TLS; needs ``tls_key``."""
    tls_key: str | None = None
    tls_insecure_skip_verify: bool = False
    """Accept any server certificate (tests only)."""

    @property
    def queue_bound(self) -> int:
        return self.max_queued or max(2 * self.max_inflight, 2 * self.batch_size)


@dataclass(slots=True)
class _Batch:
    messages: Sequence[Message]
    ids: list[str]
    callback: OutcomeCallback
    remaining: int


@dataclass(slots=True)
class _Capacity:
    """A counting semaphore that hands out ``n`` units at once, first come first served, so a
    large batch is not starved by a stream of small ones."""

    available: int
    waiters: collections.deque[tuple[int, asyncio.Future[None]]] = field(default_factory=collections.deque)

    async def acquire(self, n: int) -> None:
        if not self.waiters and self.available >= n:
            self.available -= n
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self.waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(n)  # granted just as we were cancelled: give it back
            else:
                self.waiters.remove(entry)
                self._grant()
            raise

    def release(self, n: int) -> None:
        self.available += n
        self._grant()

    def _grant(self) -> None:
        while self.waiters and self.waiters[0][0] <= self.available:
            n, future = self.waiters.popleft()
            if future.done():
                continue
            self.available -= n
            future.set_result(None)


IngressSink = Callable[[list[tuple[int, int, tuple[object, ...], bool]]], None]


class Dispatcher:
    """Routes messages to functions and calls them through the Rust core.

    Create it inside a running event loop (``async with Dispatcher(...)``): the tokio runtime
    is built in ``start`` and belongs to this process; using it after a fork raises
    :class:`~fastconn.errors.ForkError`.
    """

    def __init__(self, options: DispatchOptions | None = None) -> None:
        self.options = options or DispatchOptions()
        self._runtime: _core.Runtime | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._capacity = _Capacity(self.options.queue_bound)
        self._batches: dict[int, _Batch] = {}
        self._batch_ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count()
        self._observers: list[OutcomeCallback] = []
        self._targets: tuple[FunctionTarget, ...] = ()
        self.callbacks: Callbacks | None = None
        self._closing = False
        self._drain_scheduled = False
        self._ingress_sink: IngressSink | None = None

    VERDICTS = _VERDICTS
    """Verdicts by their code on the wire."""

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runtime is not None:
            return
        o = self.options
        auth = None
        if o.basic_auth is not None:
            user, password = o.basic_auth
            auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._runtime = _core.Runtime(
            workers=o.workers,
            max_inflight=o.max_inflight,
            max_inflight_per_function=o.max_inflight_per_function,
            max_queued=o.queue_bound,
            max_attempts=o.max_attempts,
            retry_on=list(o.retry_on),
            backoff_initial=o.backoff_initial,
            backoff_max=o.backoff_max,
            timeout=o.timeout,
            connect_timeout=o.connect_timeout,
            content_type=o.content_type or None,
            user_agent=f"fastconn/{_VERSION}",
            authorization=auth,
            tls_ca=o.tls_ca,
            tls_cert=o.tls_cert,
            tls_key=o.tls_key,
            tls_insecure_skip_verify=o.tls_insecure_skip_verify,
        )
        if o.tls_insecure_skip_verify:
            log.warning(
                "TLS CERTIFICATE VERIFICATION IS OFF (tls_insecure_skip_verify): https:// calls accept "
                "any certificate, so anyone on the network path can pose as your functions"
            )
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._runtime.wake_fd, self._on_wake)
        if self._targets:
            self.set_functions(self._targets)
        if self.callbacks is not None:
            self.callbacks.attach(self._runtime)

    async def close(self, timeout: float = 30.0) -> int:
        """Stops intake and waits up to ``timeout`` for accepted messages; their callbacks
        still run (on this loop) while we wait. Returns how many did not finish."""
        runtime = self._runtime
        if runtime is None or self._closing:
            return 0
        self._closing = True
        # The core's close blocks a thread (without the GIL) until its queue is empty; the loop
        # keeps running meanwhile and drains completions as they arrive.
        left = await asyncio.get_running_loop().run_in_executor(None, runtime.close, timeout)
        self._drain()
        assert self._loop is not None
        self._loop.remove_reader(runtime.wake_fd)
        for waiter in self._capacity.waiters:
            if not waiter[1].done():
                waiter[1].set_exception(DispatcherClosed("the dispatcher closed while waiting for capacity"))
        self._capacity.waiters.clear()
        if left:
            log.warning("dispatcher closed with %d message(s) unfinished", left)
        return left

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- routing ---------------------------------------------------------------------------

    def set_functions(self, targets: Iterable[FunctionTarget]) -> None:
        """Swaps the routing table atomically; calls already running are not affected."""
        self._targets = tuple(targets)
        if self._runtime is None:
            return
        self._runtime.set_targets(
            [
                (
                    t.name,
                    t.url,
                    list(t.topics),
                    t.max_inflight,
                    t.timeout,
                    list(t.headers),
                    t.async_url,
                    t.asynchronous,
                )
                for t in self._targets
            ]
        )

    @property
    def functions(self) -> tuple[FunctionTarget, ...]:
        return self._targets

    @property
    def runtime(self) -> _core.Runtime:
        """The core (for the ingress server, which runs on its runtime)."""
        return self._require_runtime()

    def set_ingress_sink(self, sink: IngressSink | None) -> None:
        """Where the completions of messages the ingress submitted itself go."""
        self._ingress_sink = sink

    # -- the hot path ----------------------------------------------------------------------

    async def submit(
        self,
        messages: Sequence[Message],
        on_outcomes: OutcomeCallback,
        *,
        capture: bool = False,
        asynchronous: bool = False,
    ) -> None:
        """Hands messages to the core, waiting only for capacity. ``on_outcomes`` receives
        every message's :class:`Outcome` later, on this loop, in groups. With ``capture`` the
        results carry each function's response body and headers. With ``asynchronous`` every
        function that has an ``/async-function/`` form is invoked through it (functions marked
        asynchronous always are); see :mod:`fastconn.callbacks` for when such calls settle."""
        self._require_runtime()
        step = max(1, min(self.options.batch_size, self.options.queue_bound, _INDEX_MASK))
        for start in range(0, len(messages), step):
            chunk = messages[start : start + step]
            await self.reserve(len(chunk))
            self.submit_reserved(chunk, on_outcomes, capture=capture, asynchronous=asynchronous)

    def enable_callbacks(
        self, settings: CallbackSettings, metrics: CallbackMetrics | None = None
    ) -> Callbacks:
        """Settles async calls on their callback (or on the 202, per ``settings.ack``); the
        callback route must be served at ``<public_url>/callback/{token}`` (the ingress's
        ``add_callbacks``, or the returned object's ``register_routes``). Without it, async
        calls settle on their 202, as OpenFaaS connectors do."""
        self.callbacks = Callbacks(settings, metrics)
        if self._runtime is not None:
            self.callbacks.attach(self._runtime)
        return self.callbacks

    # -- lower-level submission (the ingress, tests) ------------------------------------------

    async def reserve(self, n: int) -> None:
        """Waits for room for ``n`` messages in the core; ``submit_reserved`` then uses it."""
        self._require_runtime()
        await self._capacity.acquire(n)
        if self._closing:
            self._capacity.release(n)
            raise DispatcherClosed("the dispatcher is closing")

    def submit_reserved(
        self,
        messages: Sequence[Message],
        on_outcomes: OutcomeCallback,
        *,
        capture: bool,
        asynchronous: bool = False,
    ) -> None:
        """Hands messages whose room was reserved to the core, without waiting (``submit``
        says what ``asynchronous`` does)."""
        try:
            runtime = self._require_runtime()
        except DispatcherClosed:
            self._capacity.release(len(messages))
            raise
        capture = capture or self.options.capture_responses
        step = max(1, min(self.options.batch_size, _INDEX_MASK))
        for start in range(0, len(messages), step):
            chunk = messages[start : start + step]
            try:
                self._submit_chunk(runtime, chunk, on_outcomes, capture, asynchronous)
            except BaseException:
                # The failed chunk gave its room back; so do the chunks after it.
                self._capacity.release(max(0, len(messages) - start - len(chunk)))
                raise

    def release_capacity(self, n: int) -> None:
        """Gives back room reserved with ``reserve`` and not used."""
        self._capacity.release(n)

    def deliver_final(self, callback: OutcomeCallback, outcomes: list[Outcome]) -> None:
        """Delivers outcomes that are final for their source message, then to observers."""
        self._deliver(callback, outcomes)
        for observer in self._observers:
            self._deliver(observer, outcomes)

    def _submit_chunk(
        self,
        runtime: _core.Runtime,
        chunk: Sequence[Message],
        callback: OutcomeCallback,
        capture: bool,
        asynchronous: bool,
    ) -> None:
        batch_id = next(self._batch_ids)
        ids = [m.message_id or self._new_id() for m in chunk]
        base_flags = (1 if capture else 0) | (asynchronous << 3)
        wire = [
            (
                m.topic,
                m.payload,
                m.headers,
                mid,
                m.key,
                m.delivery_attempt,
                base_flags
                | (m.hold_key_on_retry << 1)
                | (m.resume << 2)
                | (m.asynchronous << 3)
                | (m.hold_key_on_failure << 4),
                m.function,
                m.own_headers,
            )
            for m, mid in zip(chunk, ids, strict=True)
        ]
        try:
            runtime.submit(batch_id << _INDEX_BITS, wire)
        except BaseException:
            self._capacity.release(len(chunk))
            raise
        self._batches[batch_id] = _Batch(chunk, ids, callback, len(chunk))

    async def call(self, messages: Sequence[Message], *, capture: bool = False) -> list[Outcome]:
        """Submits and waits for every outcome; returned in the order of ``messages``."""
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        outcomes: dict[int, Outcome] = {}
        positions = {id(m): i for i, m in enumerate(messages)}

        def collect(batch: list[Outcome]) -> None:
            for outcome in batch:
                outcomes[positions[id(outcome.message)]] = outcome
            if len(outcomes) == len(messages) and not done.done():
                done.set_result(None)

        await self.submit(messages, collect, capture=capture)
        await done
        return [outcomes[i] for i in range(len(messages))]

    def release_key(self, key: bytes) -> bool:
        """Lets the next message of ``key`` start when the key is held (``Outcome.key_held``)
        for a message that will not be resubmitted. Returns false, changing nothing, when the
        key is not held: a key whose message is in flight is never released early."""
        # Allowed while closing: a released key lets its waiting messages drain.
        runtime = self._runtime
        if runtime is None or runtime.closed:
            return False
        return runtime.release_key(key)

    def route(self, topics: list[str]) -> list[list[str]]:
        """The functions each topic routes to now, by name."""
        return self._require_runtime().route(topics)

    @property
    def busy_keys(self) -> int:
        """Ordering keys with a message in flight or held."""
        return self._runtime.busy_keys if self._runtime else 0

    def add_observer(self, observer: OutcomeCallback) -> None:
        """Sees every outcome of every batch after its own callback (metrics, logging)."""
        self._observers.append(observer)

    @property
    def queued(self) -> int:
        return self._runtime.queued if self._runtime else 0

    @property
    def inflight(self) -> int:
        return self._runtime.inflight if self._runtime else 0

    @property
    def capacity(self) -> int:
        return self.options.queue_bound

    @property
    def has_capacity(self) -> bool:
        """Whether a submit of one message would proceed without waiting."""
        return not self._capacity.waiters and self._capacity.available > 0

    def stats(
        self,
    ) -> list[tuple[str, list[tuple[str, int]], list[int], float, int, int, list[tuple[str, int]]]]:
        """Per function: final results by status, latency buckets, sum, count, retries, and
        every attempt's result by status."""
        return self._runtime.stats() if self._runtime else []

    # -- completions -----------------------------------------------------------------------

    def _on_wake(self) -> None:
        runtime = self._runtime
        if runtime is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.read(runtime.wake_fd, 8)
        # Drained one loop iteration later: the core does not wake us again meanwhile (it
        # re-arms on the drain), so the callbacks ready now (sources reading their sockets)
        # run first and the completions that arrive meanwhile come in the same batch.
        if not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        runtime = self._runtime
        if runtime is None:
            return
        records = runtime.drain()
        if not records:
            return
        by_batch: dict[int, list[Outcome]] = {}
        batches = self._batches
        from_wire = Outcome._from_wire
        ingress: list[tuple[int, int, tuple[object, ...], bool]] = []
        for record in records:
            token, verdict_code, raw_results, key_held = record
            if token & _INGRESS_TOKEN:
                ingress.append(record)  # the ingress's own budget, not ours
                continue
            batch_id = token >> _INDEX_BITS
            index = token & _INDEX_MASK
            batch = batches[batch_id]
            outcome = from_wire(
                batch.messages[index], _VERDICTS[verdict_code], batch.ids[index], raw_results, key_held
            )
            group = by_batch.get(batch_id)
            if group is None:
                by_batch[batch_id] = [outcome]
            else:
                group.append(outcome)
        self._capacity.release(len(records) - len(ingress))
        if ingress and self._ingress_sink is not None:
            try:
                self._ingress_sink(ingress)
            except Exception:
                log.exception("the ingress's outcome handler failed")
        for batch_id, outcomes in by_batch.items():
            batch = batches[batch_id]
            batch.remaining -= len(outcomes)
            if batch.remaining == 0:
                del batches[batch_id]
            self.deliver_final(batch.callback, outcomes)

    @staticmethod
    def _deliver(callback: OutcomeCallback, outcomes: list[Outcome]) -> None:
        try:
            callback(outcomes)
        except Exception:
            # A bug in one source's settle code must not stop completions for everyone else.
            log.exception("outcome callback %r failed", callback)

    def _new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._id_counter)}"

    def _require_runtime(self) -> _core.Runtime:
        if self._runtime is None:
            raise DispatcherClosed("the dispatcher is not started (use `async with Dispatcher()`)")
        if self._closing:
            raise DispatcherClosed("the dispatcher is closing")
        return self._runtime
