"""The asyncio bridge and the Rust core in process: ``fastconn.Dispatcher`` against a recording
HTTP function double (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from fastconn import (
    Dispatcher,
    DispatcherClosed,
    DispatchOptions,
    ErrorKind,
    ForkError,
    FunctionTarget,
    Message,
    Outcome,
    Verdict,
    __version__,
)
from fastconn.testing import FunctionDouble, RecordedCall, wait_for

FAST = {"backoff_initial": 0.01, "backoff_max": 2.0, "timeout": 5.0}


# ---------------------------------------------------------------------------- the double


@dataclass
class Span:
    path: str
    body: bytes
    headers: CIMultiDict[str]
    start: float
    end: float | None = None


@dataclass
class CountingDouble(FunctionDouble):
    """A FunctionDouble that also records when each request arrived and ended, counts requests
    in progress (overall and per path) and can hold a path's requests at a gate."""

    spans: list[Span] = field(default_factory=list)
    active: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    """Most requests in progress at once, per path and (key "*") overall."""
    gates: dict[str, asyncio.Event] = field(default_factory=dict)

    def close_gate(self, path: str) -> None:
        self.gates[path] = asyncio.Event()

    def open_gate(self, path: str) -> None:
        self.gates.pop(path).set()

    def bodies(self, path: str) -> list[bytes]:
        return [s.body for s in self.spans if s.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        span = Span(path, await request.read(), CIMultiDict(request.headers), time.monotonic())
        self.spans.append(span)
        for key in (path, "*"):
            self.active[key] += 1
            self.peak[key] = max(self.peak[key], self.active[key])
        try:
            gate = self.gates.get(path)
            if gate is not None:
                await gate.wait()
            return await super()._handle(request)
        finally:
            for key in (path, "*"):
                self.active[key] -= 1
            span.end = time.monotonic()


@pytest.fixture
async def double() -> AsyncIterator[CountingDouble]:
    async with CountingDouble() as d:
        yield d
        for gate in d.gates.values():  # let held requests finish before the server stops
            gate.set()


MakeDispatcher = Callable[..., Awaitable[Dispatcher]]


@pytest.fixture
async def make_dispatcher() -> AsyncIterator[MakeDispatcher]:
    """``await make_dispatcher(targets, **options)``: a started dispatcher, closed at teardown."""
    made: list[Dispatcher] = []

    async def make(targets: list[FunctionTarget], **options: Any) -> Dispatcher:
        dispatcher = Dispatcher(DispatchOptions(**{**FAST, **options}))
        await dispatcher.start()
        made.append(dispatcher)
        dispatcher.set_functions(targets)
        return dispatcher

    yield make
    for dispatcher in made:
        await dispatcher.close(5.0)


def fn(double: FunctionDouble, name: str, *topics: str, **kwargs: Any) -> FunctionTarget:
    return FunctionTarget(name, topics or (name,), double.url(f"/{name}"), **kwargs)


class Collector:
    """An ``on_outcomes`` callback that records every group it is given."""

    def __init__(self) -> None:
        self.groups: list[list[Outcome]] = []

    def __call__(self, outcomes: list[Outcome]) -> None:
        self.groups.append(outcomes)

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for group in self.groups for o in group]

    async def wait(self, count: int, timeout: float = 10.0) -> list[Outcome]:
        await wait_for(lambda: len(self.outcomes) >= count, timeout, 0.005, f"{count} outcome(s)")
        return self.outcomes


def calls_of(double: FunctionDouble, name: str) -> list[RecordedCall]:
    return double.calls_to(f"/{name}")


# ---------------------------------------------------------------------------- batching


class CountingRuntime:
    """Wraps the native runtime to count crossings of the bridge."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self.submits: list[int] = []
        self.drains = 0

    def submit(self, base_token: int, batch: list[Any]) -> None:
        self.submits.append(len(batch))
        self._runtime.submit(base_token, batch)

    def drain(self) -> Any:
        self.drains += 1
        return self._runtime.drain()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


async def test_batches_cross_the_bridge_once_per_chunk(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = await make_dispatcher([fn(double, "echo", "t")], max_inflight=32, batch_size=64)
    spy = CountingRuntime(dispatcher._runtime)
    dispatcher._runtime = spy  # type: ignore[assignment]
    messages = [Message("t", b"%d" % i, [("X-Seq", str(i))]) for i in range(500)]
    collector = Collector()
    await dispatcher.submit(messages, collector)
    outcomes = await collector.wait(500)

    assert spy.submits == [64] * 7 + [52], "one FFI call per chunk of batch_size messages"
    assert 1 <= spy.drains < 500, "completions are drained in groups, not one crossing per message"
    assert len(outcomes) == 500
    assert {id(o.message) for o in outcomes} == {id(m) for m in messages}
    assert all(o.verdict is Verdict.OK for o in outcomes)
    calls = calls_of(double, "echo")
    assert len(calls) == 500
    assert sorted(int(c.body) for c in calls) == list(range(500))
    assert all(c.headers["X-Seq"] == c.body.decode() for c in calls)
    ids = {o.message_id for o in outcomes}
    assert len(ids) == 500 and ids == {c.headers["X-Message-Id"] for c in calls}
    assert dispatcher.queued == 0 and dispatcher.inflight == 0

    # call() returns outcomes in the order of its messages.
    ordered = await dispatcher.call([Message("t", b"%d" % i) for i in range(100)])
    assert [o.message.payload for o in ordered] == [b"%d" % i for i in range(100)]


# ---------------------------------------------------------------------------- verdicts


async def test_fan_out_verdict_is_the_worst_of_the_targets(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    double.script("/good", [200])
    double.script("/bad", [400])
    double.script("/busy", [503], headers={"Retry-After": "2"})
    targets = [
        fn(double, "good", "a", "ab", "ac", "abc"),
        fn(double, "bad", "ab", "abc"),
        fn(double, "busy", "ac", "abc"),
    ]
    dispatcher = await make_dispatcher(targets, max_attempts=1)
    topics = ["a", "ab", "ac", "abc", "nobody"]
    outcomes = dict(zip(topics, await dispatcher.call([Message(t, t.encode()) for t in topics]), strict=True))

    assert {t: o.verdict for t, o in outcomes.items()} == {
        "a": Verdict.OK,
        "ab": Verdict.FAILED,
        "ac": Verdict.RETRY,
        "abc": Verdict.RETRY,  # RETRY outranks FAILED: redelivery keeps the retryable target's chance
        "nobody": Verdict.UNROUTED,
    }
    statuses = {t: sorted((r.function, r.status) for r in o.results) for t, o in outcomes.items()}
    assert statuses["abc"] == [("bad", 400), ("busy", 503), ("good", 200)]
    assert statuses["nobody"] == []
    assert outcomes["ac"].retry_after == 2.0 and outcomes["abc"].retry_after == 2.0
    assert outcomes["a"].retry_after is None and outcomes["ab"].retry_after is None
    assert outcomes["ab"].first_failure() is not None and outcomes["ab"].first_failure().status == 400  # type: ignore[union-attr]
    assert [o.ok for o in outcomes.values()] == [True, False, False, False, True]
    # Every target got each of its messages exactly once (max_attempts 1: no retries).
    assert sorted(c.body for c in calls_of(double, "good")) == [b"a", b"ab", b"abc", b"ac"]
    assert sorted(c.body for c in calls_of(double, "bad")) == [b"ab", b"abc"]
    assert sorted(c.body for c in calls_of(double, "busy")) == [b"abc", b"ac"]
    assert len(double.calls) == 8


async def test_unrouted_messages_make_no_request(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = await make_dispatcher([fn(double, "only", "orders.*")])
    [unrouted, routed] = await dispatcher.call([Message("orders", b"x"), Message("orders.new", b"y")])
    assert (unrouted.verdict, unrouted.results, unrouted.ok) == (Verdict.UNROUTED, (), True)
    assert routed.verdict is Verdict.OK
    assert [c.body for c in double.calls] == [b"y"]


# ---------------------------------------------------------------------------- bounds and backpressure


async def test_per_function_in_flight_bounds(double: CountingDouble, make_dispatcher: MakeDispatcher) -> None:
    double.script("/wide", delay=0.1)
    double.script("/narrow", delay=0.1)
    targets = [fn(double, "wide", "t"), fn(double, "narrow", "t", max_inflight=1)]
    dispatcher = await make_dispatcher(targets, max_inflight=100, max_inflight_per_function=2)
    outcomes = await dispatcher.call([Message("t", b"%d" % i) for i in range(6)])
    assert all(o.verdict is Verdict.OK for o in outcomes)
    assert double.peak["/wide"] == 2, "max_inflight_per_function"
    assert double.peak["/narrow"] == 1, "the target's own max_inflight"
    assert double.peak["*"] == 3
    assert len(calls_of(double, "wide")) == len(calls_of(double, "narrow")) == 6


async def test_global_in_flight_bound(double: CountingDouble, make_dispatcher: MakeDispatcher) -> None:
    names = ["f1", "f2", "f3", "f4"]
    for name in names:
        double.script(f"/{name}", delay=0.05)
    dispatcher = await make_dispatcher(
        [fn(double, n, "t") for n in names], max_inflight=3, max_inflight_per_function=10
    )
    samples: list[int] = []
    task = asyncio.create_task(dispatcher.call([Message("t", b"%d" % i) for i in range(10)]))
    while not task.done():
        samples.append(dispatcher.inflight)
        await asyncio.sleep(0.005)
    assert all(o.verdict is Verdict.OK for o in await task)
    assert double.peak["*"] == 3, "max_inflight bounds calls across functions"
    assert max(samples) <= 3
    assert len(double.calls) == 40


async def test_submit_waits_for_capacity_and_a_stalled_function_bounds_the_queue(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    double.close_gate("/stalled")
    dispatcher = await make_dispatcher(
        [fn(double, "stalled", "t")], max_inflight=1, batch_size=1, max_queued=3
    )
    assert dispatcher.capacity == 3
    collector = Collector()
    submitted = 0
    peak_queued = 0

    async def source() -> None:
        """A source that fetches the next message only when the previous submit returned."""
        nonlocal submitted
        for i in range(30):
            await dispatcher.submit([Message("t", b"%d" % i)], collector)
            submitted += 1

    task = asyncio.create_task(source())
    await wait_for(lambda: submitted == 3, 5, what="the first three submits")
    await wait_for(lambda: len(double.spans) == 1, 5, what="the first call")
    for _ in range(20):  # 0.4 s stalled: nothing more is taken in
        peak_queued = max(peak_queued, dispatcher.queued)
        await asyncio.sleep(0.02)
    assert submitted == 3, "submit waits while the dispatcher is full"
    assert not task.done()
    assert dispatcher.queued == 3 and peak_queued == 3
    assert not dispatcher.has_capacity
    assert len(double.spans) == 1, "max_inflight 1: one call on the wire"
    assert collector.outcomes == []

    double.open_gate("/stalled")
    await asyncio.wait_for(task, 10)
    outcomes = await collector.wait(30)
    assert sorted(int(o.message.payload) for o in outcomes) == list(range(30))
    assert all(o.verdict is Verdict.OK for o in outcomes)
    assert double.peak["*"] == 1
    assert dispatcher.has_capacity and dispatcher.queued == 0


async def test_a_batch_larger_than_the_queue_is_fed_in_chunks(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = await make_dispatcher([fn(double, "f", "t")], max_inflight=4, batch_size=512, max_queued=8)
    outcomes = await asyncio.wait_for(dispatcher.call([Message("t", b"%d" % i) for i in range(100)]), 20)
    assert len(outcomes) == 100 and all(o.verdict is Verdict.OK for o in outcomes)
    assert double.peak["*"] <= 4


# ---------------------------------------------------------------------------- key ordering


async def test_key_ordering_one_in_flight_per_key_in_order(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    double.script("/ordered", [503, 200], delay=0.03)  # the first call of all fails once: ordering holds
    dispatcher = await make_dispatcher([fn(double, "ordered", "t")], max_inflight=16)
    messages = []
    for i in range(5):
        for key in (b"k1", b"k2", None):
            name = (key or b"none").decode()
            messages.append(Message("t", f"{name}-{i}".encode(), key=key))
    outcomes = await dispatcher.call(messages)
    assert all(o.verdict is Verdict.OK for o in outcomes)
    assert len(double.spans) == 16  # 15 messages + one retry

    for key in ("k1", "k2"):
        spans = [s for s in double.spans if s.body.startswith(key.encode())]
        firsts = list(dict.fromkeys(s.body for s in spans))
        assert firsts == [f"{key}-{i}".encode() for i in range(5)], "delivered in submission order"
        for earlier, later in itertools.pairwise(spans):
            assert earlier.end is not None and later.start >= earlier.end, f"{key}: two calls at once"
    assert double.peak["*"] >= 3, "different keys (and unkeyed messages) run in parallel"
    # The key is released just after its last completion is reported.
    await wait_for(lambda: dispatcher.busy_keys == 0, 2, what="idle keys")


async def test_hold_key_on_retry_resume_and_release(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    for path in ("/held", "/released", "/free"):
        double.script(path, [503, 200])  # each path's first call fails, later ones succeed
    targets = [fn(double, "held", "held"), fn(double, "released", "released"), fn(double, "free", "free")]
    dispatcher = await make_dispatcher(targets, max_attempts=1)

    # 1. A held RETRY keeps its key busy until the message is resubmitted with resume=True.
    [first] = await dispatcher.call([Message("held", b"m1", key=b"k", hold_key_on_retry=True)])
    assert first.verdict is Verdict.RETRY
    assert dispatcher.busy_keys == 1
    waiting = Collector()
    await dispatcher.submit([Message("held", b"m2", key=b"k")], waiting)
    await asyncio.sleep(0.3)
    assert double.bodies("/held") == [b"m1"], "m2 waits behind the held key"
    assert waiting.outcomes == []
    again = Message(
        "held",
        b"m1",
        key=b"k",
        hold_key_on_retry=True,
        resume=True,
        message_id=first.message_id,
        delivery_attempt=2,
    )
    [resumed] = await dispatcher.call([again])
    assert resumed.verdict is Verdict.OK and resumed.message_id == first.message_id
    [m2] = await waiting.wait(1)
    assert m2.verdict is Verdict.OK
    assert double.bodies("/held") == [b"m1", b"m1", b"m2"]
    held = [s for s in double.spans if s.path == "/held"]
    assert [s.headers["X-Delivery-Attempt"] for s in held] == ["1", "2", "1"]
    assert held[0].headers["X-Message-Id"] == held[1].headers["X-Message-Id"] == first.message_id
    await wait_for(lambda: dispatcher.busy_keys == 0, 2, what="idle keys")

    # 2. release_key lets the next message go when the held one will not be resubmitted.
    [dropped] = await dispatcher.call([Message("released", b"m3", key=b"r", hold_key_on_retry=True)])
    assert dropped.verdict is Verdict.RETRY
    waiting = Collector()
    await dispatcher.submit([Message("released", b"m4", key=b"r")], waiting)
    await asyncio.sleep(0.2)
    assert double.bodies("/released") == [b"m3"]
    dispatcher.release_key(b"r")
    [m4] = await waiting.wait(1)
    assert m4.verdict is Verdict.OK
    assert double.bodies("/released") == [b"m3", b"m4"]
    await wait_for(lambda: dispatcher.busy_keys == 0, 2, what="the key to be idle")

    # 3. Without hold_key_on_retry a RETRY frees the key at once.
    [retry] = await dispatcher.call([Message("free", b"m5", key=b"f")])
    assert retry.verdict is Verdict.RETRY
    [m6] = await dispatcher.call([Message("free", b"m6", key=b"f")])
    assert m6.verdict is Verdict.OK
    await wait_for(lambda: dispatcher.busy_keys == 0, 2, what="idle keys")


# ---------------------------------------------------------------------------- requests and results


async def test_capture_of_body_and_headers(double: CountingDouble, make_dispatcher: MakeDispatcher) -> None:
    double.script("/cap", [200], headers={"X-Reply": "yes"})
    double.script("/fail", [400])
    dispatcher = await make_dispatcher([fn(double, "cap", "cap"), fn(double, "fail", "fail")])

    [captured] = await dispatcher.call([Message("cap", b"echo me")], capture=True)
    [result] = captured.results
    assert result.body == b"echo me"
    assert result.headers is not None and ("x-reply", "yes") in [(k.lower(), v) for k, v in result.headers]

    [plain] = await dispatcher.call([Message("cap", b"echo me")])
    assert (plain.results[0].body, plain.results[0].headers) == (None, None), "nothing captured by default"

    big = bytes(range(256)) * 8  # 2048 bytes, echoed back by the failing function
    [failed] = await dispatcher.call([Message("fail", big)])
    [result] = failed.results
    assert (failed.verdict, result.status, result.error) == (Verdict.FAILED, 400, ErrorKind.NONE)
    assert result.body == big[:1024], "a failure keeps an excerpt of the body"


async def test_message_id_is_stable_and_delivery_attempt_increments(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    double.script("/flaky", [500, 502, 200])
    double.script("/redelivered", [503, 200])
    double.script("/down", [503])
    targets = [fn(double, "flaky", "t"), fn(double, "redelivered", "r"), fn(double, "down", "d")]
    dispatcher = await make_dispatcher(targets, max_attempts=5)
    [outcome] = await dispatcher.call([Message("t", b"x")])
    [result] = outcome.results
    assert (outcome.verdict, result.status, result.attempts) == (Verdict.OK, 200, 3)
    assert result.latency > 0
    calls = calls_of(double, "flaky")
    assert [c.headers["X-Delivery-Attempt"] for c in calls] == ["1", "2", "3"]
    assert {c.headers["X-Message-Id"] for c in calls} == {outcome.message_id}

    # A source's own id and redelivery count are used as given.
    [outcome] = await dispatcher.call([Message("r", b"y", message_id="evt-42", delivery_attempt=4)])
    assert outcome.message_id == "evt-42"
    calls = calls_of(double, "redelivered")
    assert [(c.headers["X-Message-Id"], c.headers["X-Delivery-Attempt"]) for c in calls] == [
        ("evt-42", "4"),
        ("evt-42", "5"),
    ]

    # Exhausted attempts: RETRY, with every attempt counted.
    [outcome] = await dispatcher.call([Message("d", b"z")])
    assert (outcome.verdict, outcome.results[0].attempts, outcome.results[0].status) == (
        Verdict.RETRY,
        5,
        503,
    )
    calls = calls_of(double, "down")
    assert [c.headers["X-Delivery-Attempt"] for c in calls] == ["1", "2", "3", "4", "5"]
    assert len({c.headers["X-Message-Id"] for c in calls}) == 1


async def test_request_headers(double: CountingDouble, make_dispatcher: MakeDispatcher) -> None:
    target = fn(double, "h", "orders.created", headers=(("X-Static", "1"),))
    dispatcher = await make_dispatcher(
        [target], content_type="application/cloudevents+json", basic_auth=("user", "pa:ss")
    )
    message = Message("orders.created", b"{}", [("X-Custom", "kept"), ("ce-type", "order")])
    [outcome] = await dispatcher.call([message])
    assert outcome.verdict is Verdict.OK
    [call] = calls_of(double, "h")
    h = call.headers
    assert call.body == b"{}"
    assert h["Content-Type"] == "application/cloudevents+json"
    assert h["X-Topic"] == "orders.created"
    assert h["X-Connector"] == "fastconn"
    assert h["User-Agent"] == f"fastconn/{__version__}"
    assert h["X-Message-Id"] == outcome.message_id
    assert h["X-Delivery-Attempt"] == "1"
    assert (h["X-Custom"], h["ce-type"], h["X-Static"]) == ("kept", "order", "1")
    assert h["Authorization"] == "Basic " + base64.b64encode(b"user:pa:ss").decode()


async def test_connect_errors_and_timeouts_are_retried(
    make_dispatcher: MakeDispatcher, double: CountingDouble
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"  # bound, not listening: refused
    double.script("/slow", delay=1.0)
    targets = [
        FunctionTarget("dead", ("dead",), dead),
        fn(double, "slow", "slow", timeout=0.2),
    ]
    dispatcher = await make_dispatcher(targets, max_attempts=2)
    started = time.monotonic()
    dead_outcome, slow_outcome = await dispatcher.call([Message("dead", b""), Message("slow", b"")])
    assert time.monotonic() - started < 0.9, "the target's timeout cut the 1s calls short"
    assert (dead_outcome.verdict, dead_outcome.results[0].error, dead_outcome.results[0].attempts) == (
        Verdict.RETRY,
        ErrorKind.CONNECT,
        2,
    )
    assert (slow_outcome.verdict, slow_outcome.results[0].error) == (Verdict.RETRY, ErrorKind.TIMEOUT)
    assert slow_outcome.results[0].status_label == "timeout"
    assert len(calls_of(double, "slow")) == 2


async def test_a_response_that_breaks_http_framing_is_a_final_protocol_error(
    make_dispatcher: MakeDispatcher,
) -> None:
    requests = 0

    async def broken_function(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.lower().split(b"\r\n")
                    if line.startswith(b"content-length:")
                )
                await reader.readexactly(length)
                requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(broken_function, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        dispatcher = await make_dispatcher(
            [FunctionTarget("broken", ("broken",), f"http://127.0.0.1:{port}/")], max_attempts=3
        )
        (outcome,) = await dispatcher.call([Message("broken", b"x")])
    finally:
        server.close()
    result = outcome.results[0]
    assert (outcome.verdict, result.status, result.error, result.attempts) == (
        Verdict.FAILED,
        0,
        ErrorKind.PROTOCOL,
        1,
    )
    assert result.status_label == "protocol"
    assert result.body is not None and b"conflicting Content-Length values 2 and 3" in result.body
    assert requests == 1, "not retried"


# ---------------------------------------------------------------------------- lifecycle


async def test_close_drains_then_refuses(double: CountingDouble) -> None:
    double.script("/slow", delay=0.3)
    dispatcher = Dispatcher(DispatchOptions(**FAST))
    await dispatcher.start()
    dispatcher.set_functions([fn(double, "slow", "t")])
    collector = Collector()
    await dispatcher.submit([Message("t", b"a"), Message("t", b"b")], collector)
    assert await dispatcher.close(5.0) == 0
    assert [o.verdict for o in collector.outcomes] == [Verdict.OK, Verdict.OK], "callbacks ran during close"
    with pytest.raises(DispatcherClosed):
        await dispatcher.submit([Message("t", b"c")], collector)
    assert len(double.calls) == 2


async def test_using_the_runtime_after_fork_raises_fork_error(
    double: CountingDouble, make_dispatcher: MakeDispatcher
) -> None:
    dispatcher = await make_dispatcher([fn(double, "f", "t")])
    assert [o.verdict for o in await dispatcher.call([Message("t", b"parent")])] == [Verdict.OK]

    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a threaded process
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any parent cleanup
        code = 0
        try:
            os.close(read_fd)
            results = []
            try:
                dispatcher.set_functions([fn(double, "g", "u")])
                results.append("set_functions: no error")
            except ForkError as exc:
                results.append(f"set_functions: ForkError: {exc}")
            # submit, driven by hand: no event loop runs in the child.
            coroutine = dispatcher.submit([Message("t", b"child")], lambda _: None)
            try:
                coroutine.send(None)
                results.append("submit: no error")
            except ForkError as exc:
                results.append(f"submit: ForkError: {exc}")
            except StopIteration:
                results.append("submit: no error")
            try:
                dispatcher.release_key(b"k")
                results.append("release_key: no error")
            except ForkError:
                results.append("release_key: ForkError")
            os.write(write_fd, "\n".join(results).encode())
        except BaseException as exc:
            os.write(write_fd, f"child crashed: {exc!r}".encode())
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    loop = asyncio.get_running_loop()
    _, status = await loop.run_in_executor(None, os.waitpid, pid, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        report = pipe.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0, report
    lines = report.splitlines()
    assert lines[0].startswith("set_functions: ForkError: cannot set targets"), report
    assert "across a fork" in lines[0]
    assert f"created in pid {os.getpid()}" in lines[0]
    assert lines[1].startswith("submit: ForkError:"), report
    assert lines[2] == "release_key: ForkError", report

    # The parent's runtime is unaffected.
    assert [o.verdict for o in await dispatcher.call([Message("t", b"parent again")])] == [Verdict.OK]
    assert [c.body for c in double.calls] == [b"parent", b"parent again"]


def _sockets_to(port: int) -> int:
    """How many sockets of this process are connected to ``port`` on the loopback (from /proc)."""
    inodes: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[2].rpartition(":")[2], 16) == port and fields[9] in inodes:
                    count += 1
    return count


async def test_close_closes_the_pooled_connections_of_a_dispatcher_still_referenced(
    function_double: FunctionDouble,
) -> None:
    """An embedder (or a test) may keep a closed Dispatcher: its idle keep-alive connections are
    closed by close(), not left open until the object is collected (a suite of such tests ran
    out of file descriptors below 1024, where select()-based clients fail)."""
    dispatcher = Dispatcher(DispatchOptions(max_inflight=16, **FAST))
    await dispatcher.start()
    dispatcher.set_functions([FunctionTarget("fn", ("t",), function_double.url("/fn"))])
    function_double.script("/fn", [200], delay=0.05)
    outcomes = await dispatcher.call([Message("t", b"x") for _ in range(16)])
    assert all(o.ok for o in outcomes)
    assert _sockets_to(function_double.port) >= 2, "the calls left keep-alive connections in the pool"
    await dispatcher.close()
    assert _sockets_to(function_double.port) == 0
    assert dispatcher is not None  # still referenced: nothing relied on it being collected
