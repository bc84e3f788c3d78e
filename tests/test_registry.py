"""Function registry tests: real HTTP against the in-process gateway double."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from fastconn.dispatcher import Dispatcher
from fastconn.errors import ConfigError, RegistryError
from fastconn.functions import FunctionTarget
from fastconn.registry import GatewayRegistry, TopicMapSync, parse_topics, static_targets
from gateway_double import DEFAULT_NAMESPACE, FunctionSpec, GatewayDouble, SentCallback

CREDENTIALS = ("admin", "s3cret")


# ---------------------------------------------------------------------------- helpers and fixtures


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


class Applied:
    """A recording ``apply`` callback for TopicMapSync."""

    def __init__(self) -> None:
        self.calls: list[list[FunctionTarget]] = []

    def __call__(self, targets: list[FunctionTarget]) -> None:
        self.calls.append(targets)

    def names(self, call: int = -1) -> list[str]:
        return [target.name for target in self.calls[call]]


@dataclass
class StaticEntry:
    """Shaped like a configured ``[[functions]]`` entry."""

    name: str
    topics: Sequence[str]
    url: str | None = None
    namespace: str | None = None
    max_inflight: int | None = None
    timeout: float | None = None
    asynchronous: bool = False
    schedule: str | None = None
    timezone: str | None = None


@pytest.fixture
async def gw() -> AsyncIterator[GatewayDouble]:
    async with GatewayDouble() as double:
        yield double


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def registry(gw: GatewayDouble, session: aiohttp.ClientSession, **kwargs: object) -> GatewayRegistry:
    return GatewayRegistry(gw.url, session=session, **kwargs)  # type: ignore[arg-type]


def system_paths(gw: GatewayDouble) -> list[str]:
    return [r.path for r in gw.requests if r.kind == "system"]


# ---------------------------------------------------------------------------- parse_topics


@pytest.mark.parametrize(
    ("annotation", "delimiter", "expected"),
    [
        (" a , b,,", ",", ("a", "b")),
        ("orders", ",", ("orders",)),
        ("a;b ; c", ";", ("a", "b", "c")),
        ("a,b;c", ";", ("a,b", "c")),
        (" a,b ", "", ("a,b",)),
        ("a, b, a", ",", ("a", "b")),
        (" , ,", ",", ()),
        ("", "", ()),
        ("x::y::", "::", ("x", "y")),
    ],
)
def test_parse_topics(annotation: str, delimiter: str, expected: tuple[str, ...]) -> None:
    assert parse_topics(annotation, delimiter) == expected


# ---------------------------------------------------------------------------- GatewayRegistry.fetch


async def test_discovers_namespaces_and_names_targets_fn_dot_ns(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    gw.set_namespaces(["dev", "prod"])
    gw.set_functions(
        [
            FunctionSpec("resize", namespace="prod", topic="images,thumbs"),
            FunctionSpec("audit", namespace="dev", topic="orders"),
            FunctionSpec("audit", namespace="prod", topic="orders"),
            FunctionSpec("ignored", namespace="other", topic="orders"),
        ]
    )

    targets = await registry(gw, session).fetch()

    assert targets == [
        FunctionTarget(
            name="audit.dev",
            topics=("orders",),
            url=f"{gw.url}/function/audit.dev",
            async_url=f"{gw.url}/async-function/audit.dev",
        ),
        FunctionTarget(
            name="audit.prod",
            topics=("orders",),
            url=f"{gw.url}/function/audit.prod",
            async_url=f"{gw.url}/async-function/audit.prod",
        ),
        FunctionTarget(
            name="resize.prod",
            topics=("images", "thumbs"),
            url=f"{gw.url}/function/resize.prod",
            async_url=f"{gw.url}/async-function/resize.prod",
        ),
    ]
    assert system_paths(gw) == [
        "/system/namespaces",
        "/system/functions?namespace=dev",
        "/system/functions?namespace=prod",
    ]


async def test_namespaces_404_lists_without_namespace_and_uses_bare_names(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    gw.namespaces_supported = False
    gw.set_functions([FunctionSpec("echo", topic="orders")])

    targets = await registry(gw, session).fetch()

    assert [(t.name, t.url) for t in targets] == [("echo", f"{gw.url}/function/echo")]
    assert system_paths(gw) == ["/system/namespaces", "/system/functions"]


@pytest.mark.parametrize("body", [b"", b"null", b"[]"])
async def test_empty_namespace_list_means_default_namespace(
    gw: GatewayDouble, session: aiohttp.ClientSession, body: bytes
) -> None:
    gw.namespaces_body = body
    gw.set_functions([FunctionSpec("echo", topic="orders")])

    targets = await registry(gw, session).fetch()

    assert [t.name for t in targets] == ["echo"]
    assert system_paths(gw)[1:] == ["/system/functions"]


async def test_explicit_namespaces_skip_discovery(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    gw.set_functions(
        [FunctionSpec("a", namespace="dev", topic="t"), FunctionSpec("b", namespace="qa", topic="t")]
    )

    targets = await registry(gw, session, namespaces=["qa"]).fetch()

    assert [t.name for t in targets] == ["b.qa"]
    assert system_paths(gw) == ["/system/functions?namespace=qa"]


@pytest.mark.parametrize(
    ("annotation", "delimiter", "topics"),
    [
        (" a , b,,", ",", ("a", "b")),
        ("a;b", ";", ("a", "b")),
        ("a,b", ";", ("a,b",)),
        ("a, b", "", ("a, b",)),
    ],
)
async def test_topic_delimiter(
    gw: GatewayDouble,
    session: aiohttp.ClientSession,
    annotation: str,
    delimiter: str,
    topics: tuple[str, ...],
) -> None:
    gw.set_functions([FunctionSpec("fn", topic=annotation)])

    targets = await registry(gw, session, topic_delimiter=delimiter).fetch()

    assert [t.topics for t in targets] == [topics]


async def test_functions_without_topics_are_skipped(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    gw.set_functions(
        [
            FunctionSpec("no-annotations"),
            FunctionSpec("other-annotations", annotations={"com.openfaas.scale.min": "1"}),
            FunctionSpec("only-delimiters", topic=" , ,"),
            FunctionSpec("subscribed", topic="orders"),
        ]
    )

    targets = await registry(gw, session).fetch()

    assert [t.name for t in targets] == [f"subscribed.{DEFAULT_NAMESPACE}"]


async def test_fastconn_annotations(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    gw.set_functions(
        [
            FunctionSpec(
                "tuned",
                topic="t",
                annotations={
                    "fastconn.async": "True",
                    "fastconn.max_inflight": " 8 ",
                    "fastconn.timeout": "1m30s",
                },
            ),
            FunctionSpec("plain", topic="t", annotations={"fastconn.async": "yes"}),
        ]
    )

    by_name = {t.name: t for t in await registry(gw, session).fetch()}

    tuned, plain = by_name[f"tuned.{DEFAULT_NAMESPACE}"], by_name[f"plain.{DEFAULT_NAMESPACE}"]
    assert (tuned.asynchronous, tuned.max_inflight, tuned.timeout) == (True, 8, 90.0)
    assert (plain.asynchronous, plain.max_inflight, plain.timeout) == (False, None, None)


async def test_bad_fastconn_annotations_fall_back_and_warn_once(
    gw: GatewayDouble, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    gw.set_functions(
        [
            FunctionSpec(
                "bad", topic="t", annotations={"fastconn.max_inflight": "0", "fastconn.timeout": "soon"}
            )
        ]
    )
    reg = registry(gw, session)

    with caplog.at_level(logging.WARNING, logger="fastconn.registry"):
        first = await reg.fetch()
        second = await reg.fetch()

    assert first == second
    assert (first[0].max_inflight, first[0].timeout) == (None, None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "fastconn.max_inflight" in warnings[0]
    assert "fastconn.timeout" in warnings[1]


@pytest.mark.parametrize("value", [str(2**61), str(2**64), "-3"])
async def test_an_out_of_range_max_inflight_annotation_costs_only_itself(
    gw: GatewayDouble, session: aiohttp.ClientSession, value: str
) -> None:
    """2**61 once panicked inside the core's semaphore and froze the topic map: now it is
    reported and ignored, and the table (with the healthy function) reaches the core."""
    gw.set_functions(
        [
            FunctionSpec("huge", topic="t", annotations={"fastconn.max_inflight": value}),
            FunctionSpec("fine", topic="t"),
        ]
    )
    targets = await registry(gw, session).fetch()
    assert {t.name: t.max_inflight for t in targets} == {
        f"huge.{DEFAULT_NAMESPACE}": None,
        f"fine.{DEFAULT_NAMESPACE}": None,
    }
    async with Dispatcher() as dispatcher:
        dispatcher.set_functions(targets)
        assert sorted(f.name for f in dispatcher.functions) == sorted(t.name for t in targets)


async def test_the_core_refuses_an_out_of_range_bound_with_an_exception_not_a_panic() -> None:
    async with Dispatcher() as dispatcher:
        target = FunctionTarget("f", ("t",), "http://127.0.0.1:9/f", max_inflight=2**61)
        with pytest.raises(ValueError, match="max_inflight must be between 1 and"):
            dispatcher.set_functions([target])


async def test_basic_auth_accepted(session: aiohttp.ClientSession) -> None:
    async with GatewayDouble([FunctionSpec("fn", topic="t")], credentials=CREDENTIALS) as gw:
        targets = await registry(gw, session, credentials=CREDENTIALS).fetch()

    assert [t.name for t in targets] == [f"fn.{DEFAULT_NAMESPACE}"]
    assert all(r.headers["Authorization"].startswith("Basic ") for r in gw.requests)


@pytest.mark.parametrize("credentials", [("admin", "wrong"), None])
async def test_basic_auth_rejected_is_a_registry_error(
    session: aiohttp.ClientSession, credentials: tuple[str, str] | None
) -> None:
    async with GatewayDouble([FunctionSpec("fn", topic="t")], credentials=CREDENTIALS) as gw:
        with pytest.raises(RegistryError) as caught:
            await registry(gw, session, credentials=credentials).fetch()

    assert caught.value.status == 401
    assert "401" in str(caught.value)
    assert "invalid credentials" in str(caught.value)
    assert caught.value.url == f"{gw.url}/system/namespaces"


@pytest.mark.parametrize("suffix", ["", "/"])
async def test_gateway_path_prefix_is_kept(session: aiohttp.ClientSession, suffix: str) -> None:
    async with GatewayDouble([FunctionSpec("fn", topic="t")], path_prefix="/openfaas") as gw:
        targets = await GatewayRegistry(gw.url + suffix, session=session).fetch()

    assert gw.url.endswith("/openfaas")
    assert [t.url for t in targets] == [f"{gw.url}/function/fn.{DEFAULT_NAMESPACE}"]
    assert [t.async_url for t in targets] == [f"{gw.url}/async-function/fn.{DEFAULT_NAMESPACE}"]
    assert system_paths(gw) == [
        "/openfaas/system/namespaces",
        f"/openfaas/system/functions?namespace={DEFAULT_NAMESPACE}",
    ]


async def test_gateway_500_is_a_registry_error(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    gw.set_down(True)

    with pytest.raises(RegistryError) as caught:
        await registry(gw, session).fetch()

    assert caught.value.status == 500
    assert "gateway double is down" in str(caught.value)


@pytest.mark.parametrize("body", [b"{not json", b'{"namespaces": []}', b'["ok", 3]'])
async def test_malformed_listing_is_a_registry_error(
    gw: GatewayDouble, session: aiohttp.ClientSession, body: bytes
) -> None:
    gw.namespaces_body = body

    with pytest.raises(RegistryError) as caught:
        await registry(gw, session).fetch()

    assert caught.value.status is None
    assert caught.value.url == f"{gw.url}/system/namespaces"


async def test_connection_refused_is_a_registry_error(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    await gw.stop()

    with pytest.raises(RegistryError) as caught:
        await registry(gw, session).fetch()

    assert caught.value.status is None
    assert "/system/namespaces" in str(caught.value)


async def test_listing_timeout_is_a_registry_error(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    gw.system_delay = 5.0

    started = asyncio.get_running_loop().time()
    with pytest.raises(RegistryError, match=r"no response within 0\.2s"):
        await registry(gw, session, listing_timeout=0.2).fetch()

    assert asyncio.get_running_loop().time() - started < 2.0


async def test_owned_session_is_created_and_closed(gw: GatewayDouble) -> None:
    gw.set_functions([FunctionSpec("fn", topic="t")])

    async with GatewayRegistry(gw.url) as reg:
        assert [t.name for t in await reg.fetch()] == [f"fn.{DEFAULT_NAMESPACE}"]
    await reg.close()  # idempotent


def test_invalid_gateway_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="absolute http"):
        GatewayRegistry("gateway:8080")


# ---------------------------------------------------------------------------- static_targets


def test_static_targets_derive_gateway_urls() -> None:
    targets = static_targets(
        [
            StaticEntry(
                "a", ["t1", "t2", "t1"], namespace="dev", max_inflight=4, timeout=2.5, asynchronous=True
            ),
            StaticEntry("b", ["t1"]),
            StaticEntry("ext", ["t3"], url="http://other:9000/hook"),
        ],
        "http://gw:8080/prefix/",
    )

    assert targets == [
        FunctionTarget(
            name="a.dev",
            topics=("t1", "t2"),
            url="http://gw:8080/prefix/function/a.dev",
            async_url="http://gw:8080/prefix/async-function/a.dev",
            max_inflight=4,
            timeout=2.5,
            asynchronous=True,
        ),
        FunctionTarget(
            name="b",
            topics=("t1",),
            url="http://gw:8080/prefix/function/b",
            async_url="http://gw:8080/prefix/async-function/b",
        ),
        FunctionTarget(name="ext", topics=("t3",), url="http://other:9000/hook"),
    ]


def test_static_target_without_url_or_gateway_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        static_targets([StaticEntry("ok", ["t"], url="http://x/"), StaticEntry("b", ["t"])], None)

    assert [p.location for p in caught.value.problems] == ["functions[1].url"]


def test_static_async_target_needs_a_gateway_url() -> None:
    with pytest.raises(ConfigError) as caught:
        static_targets([StaticEntry("a", ["t"], url="http://x/", asynchronous=True)], "http://gw:8080")

    assert [p.location for p in caught.value.problems] == ["functions[0].asynchronous"]


# ---------------------------------------------------------------------------- TopicMapSync


@pytest.fixture
async def make_sync(
    session: aiohttp.ClientSession,
) -> AsyncIterator[Callable[..., tuple[TopicMapSync, Applied]]]:
    """Build TopicMapSyncs against a gateway double; every one is stopped at teardown."""
    made: list[TopicMapSync] = []

    def make(
        gw: GatewayDouble | None,
        *,
        static: Sequence[FunctionTarget] = (),
        interval: float = 0.05,
        apply: Callable[[list[FunctionTarget]], None] | None = None,
    ) -> tuple[TopicMapSync, Applied]:
        applied = Applied()
        gateway = GatewayRegistry(gw.url, session=session, listing_timeout=1.0) if gw is not None else None
        sync = TopicMapSync(gateway, list(static), interval, apply or applied)
        made.append(sync)
        return sync, applied

    yield make
    for sync in made:
        await sync.stop()


MakeSync = Callable[..., tuple[TopicMapSync, Applied]]


async def test_sync_is_ready_after_first_success(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_functions([FunctionSpec("b", topic="orders, audit"), FunctionSpec("a", topic="orders")])
    sync, applied = make_sync(gw, interval=10.0)

    assert not sync.ready.is_set()
    await sync.start()

    assert await sync.wait_ready(5.0)
    assert applied.names() == [f"a.{DEFAULT_NAMESPACE}", f"b.{DEFAULT_NAMESPACE}"]
    assert sync.targets == applied.calls[0]
    assert sync.topic_map() == {
        "audit": [f"b.{DEFAULT_NAMESPACE}"],
        "orders": [f"a.{DEFAULT_NAMESPACE}", f"b.{DEFAULT_NAMESPACE}"],
    }
    assert (sync.failures, sync.last_error) == (0, None)
    assert sync.last_success is not None


async def test_sync_reapplies_only_when_the_table_changes(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_functions([FunctionSpec("a", topic="t")])
    sync, applied = make_sync(gw, interval=0.05)
    await sync.start()
    assert await sync.wait_ready(5.0)

    # Several more listings of an unchanged deployment: no re-apply.
    listed = len(system_paths(gw))
    await eventually(lambda: len(system_paths(gw)) >= listed + 6)
    assert len(applied.calls) == 1

    gw.set_functions([FunctionSpec("a", topic="t"), FunctionSpec("b", topic="u")])
    await eventually(lambda: len(applied.calls) == 2)
    assert applied.names() == [f"a.{DEFAULT_NAMESPACE}", f"b.{DEFAULT_NAMESPACE}"]

    gw.set_functions([FunctionSpec("a", topic="t,v"), FunctionSpec("b", topic="u")])
    await eventually(lambda: len(applied.calls) == 3)
    assert applied.calls[-1][0].topics == ("t", "v")
    assert sync.failures == 0


async def test_sync_waits_out_a_gateway_that_is_down_at_start(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_functions([FunctionSpec("a", topic="t")])
    gw.set_down(True)
    sync, applied = make_sync(gw, interval=0.05)
    await sync.start()

    await eventually(lambda: sync.failures >= 3)
    assert not await sync.wait_ready(0.05)
    assert applied.calls == []
    assert sync.targets == []
    assert sync.last_success is None
    assert sync.last_error is not None and "HTTP 500" in sync.last_error

    gw.set_down(False)
    assert await sync.wait_ready(5.0)
    assert applied.names() == [f"a.{DEFAULT_NAMESPACE}"]
    assert sync.consecutive_failures == 0
    assert sync.failures >= 3


async def test_sync_recovers_when_the_listener_comes_back(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_functions([FunctionSpec("a", topic="t")])
    await gw.stop()
    sync, applied = make_sync(gw, interval=0.05)
    await sync.start()

    await eventually(lambda: sync.failures >= 2)
    assert not sync.ready.is_set()
    assert sync.last_error is not None and "/system/namespaces" in sync.last_error

    await gw.start()  # same port as before
    assert await sync.wait_ready(5.0)
    assert applied.names() == [f"a.{DEFAULT_NAMESPACE}"]


async def test_sync_keeps_the_last_table_when_the_gateway_goes_down(
    gw: GatewayDouble, make_sync: MakeSync, caplog: pytest.LogCaptureFixture
) -> None:
    gw.set_functions([FunctionSpec("a", topic="t")])
    sync, applied = make_sync(gw, interval=0.05)
    await sync.start()
    assert await sync.wait_ready(5.0)
    table = sync.targets

    with caplog.at_level(logging.WARNING, logger="fastconn.registry"):
        gw.set_down(True)
        await eventually(lambda: sync.failures >= 2)

    assert sync.targets == table
    assert len(applied.calls) == 1
    assert sync.ready.is_set()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) >= 2
    # One line per failure, carrying the error and no traceback.
    assert "HTTP 500" in warnings[0].getMessage()
    assert "keeping the last table of 1 function(s)" in warnings[0].getMessage()
    assert not warnings[0].exc_info


async def test_sync_backs_off_exponentially_up_to_the_interval(
    gw: GatewayDouble, make_sync: MakeSync
) -> None:
    gw.set_down(True)
    sync, _ = make_sync(gw, interval=10.0)
    await sync.start()

    await eventually(lambda: sync.failures >= 3)
    times = [r.received for r in gw.requests]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert 0.45 <= gaps[0] < 0.9, gaps
    assert 0.95 <= gaps[1] < 1.5, gaps


async def test_sync_survives_a_failing_apply(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_functions([FunctionSpec("a", topic="t")])
    seen: list[list[FunctionTarget]] = []

    def flaky_apply(targets: list[FunctionTarget]) -> None:
        seen.append(targets)
        if len(seen) == 1:
            raise RuntimeError("router rejected the table")

    sync, _ = make_sync(gw, interval=0.05, apply=flaky_apply)
    await sync.start()

    assert await sync.wait_ready(5.0)
    assert len(seen) == 2
    assert sync.failures == 1
    assert sync.last_error == "router rejected the table"
    assert [t.name for t in sync.targets] == [f"a.{DEFAULT_NAMESPACE}"]


async def test_sync_merges_static_and_gateway_targets(gw: GatewayDouble, make_sync: MakeSync) -> None:
    gw.set_namespaces(["prod"])
    gw.set_functions(
        [FunctionSpec("g", namespace="prod", topic="orders"), FunctionSpec("s", namespace="prod")]
    )
    static = static_targets(
        [
            StaticEntry("z", ["orders", "audit"], url="http://ext/hook"),
            StaticEntry("g", ["other"], namespace="prod"),
        ],
        gw.url,
    )
    sync, applied = make_sync(gw, static=static)
    await sync.start()

    assert await sync.wait_ready(5.0)
    # Static first in config order; the gateway's g.prod is shadowed by the static entry of that name.
    assert applied.names() == ["z", "g.prod"]
    assert sync.targets[1].topics == ("other",)
    assert sync.topic_map() == {"audit": ["z"], "orders": ["z"], "other": ["g.prod"]}

    gw.set_functions(
        [
            FunctionSpec("g", namespace="prod", topic="orders"),
            FunctionSpec("h", namespace="prod", topic="orders"),
        ]
    )
    await eventually(lambda: len(applied.calls) == 2)
    assert applied.names() == ["z", "g.prod", "h.prod"]
    assert sync.topic_map()["orders"] == ["h.prod", "z"]


async def test_sync_with_static_functions_only_is_ready_at_once(make_sync: MakeSync) -> None:
    static = static_targets([StaticEntry("hook", ["t"], url="http://127.0.0.1:9/hook")], None)
    sync, applied = make_sync(None, static=static)

    await sync.start()

    # No await between start() and these checks could have let a background listing run.
    assert sync.ready.is_set()
    assert applied.calls == [static]
    assert sync.topic_map() == {"t": ["hook"]}
    assert sync.last_success is not None


async def test_sync_stop_ends_the_listing_loop(gw: GatewayDouble, make_sync: MakeSync) -> None:
    sync, _ = make_sync(gw, interval=0.02)
    await sync.start()
    assert await sync.wait_ready(5.0)

    await sync.stop()
    listed = len(gw.requests)
    await asyncio.sleep(0.15)

    assert len(gw.requests) == listed
    await sync.stop()  # idempotent


def test_sync_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="rebuild_interval"):
        TopicMapSync(None, [], 0, Applied())


# ---------------------------------------------------------------------------- the gateway double itself


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[web.Request], list[bytes]]]:
    """A callback receiver: its URL plus the requests and bodies it got."""
    requests: list[web.Request] = []
    bodies: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        requests.append(request)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/cb", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/cb", requests, bodies
    finally:
        await runner.cleanup()


async def test_double_async_function_replies_202_and_calls_back(
    gw: GatewayDouble, session: aiohttp.ClientSession, receiver: tuple[str, list[web.Request], list[bytes]]
) -> None:
    callback_url, received, bodies = receiver
    gw.set_functions([FunctionSpec("echo", namespace="dev")])
    gw.set_namespaces(["dev"])
    gw.script("echo.dev", statuses=201, headers={"X-Custom": "1"})

    async with session.post(
        f"{gw.url}/async-function/echo.dev", data=b"payload", headers={"X-Callback-Url": callback_url}
    ) as response:
        assert response.status == 202
        call_id = response.headers["X-Call-Id"]
    assert len(call_id) == 36  # a uuid4

    async with asyncio.timeout(5):
        callbacks = await gw.wait_callbacks(1)
    assert len(received) == 1
    headers = received[0].headers
    assert headers["X-Call-Id"] == call_id
    assert headers["X-Function-Status"] == "201"
    assert headers["X-Function-Name"] == "echo.dev"
    assert float(headers["X-Duration-Seconds"]) >= 0.0
    assert headers["X-Custom"] == "1"
    assert bodies == [b"payload"]
    assert callbacks[0].response_status == 200
    assert [r.kind for r in gw.requests_for("echo.dev")] == ["async"]


async def test_double_async_honours_the_callers_call_id_and_duplicates(
    gw: GatewayDouble, session: aiohttp.ClientSession, receiver: tuple[str, list[web.Request], list[bytes]]
) -> None:
    callback_url, received, _ = receiver
    gw.set_functions([FunctionSpec("fn")])
    gw.script("fn", statuses=[500, 200], callback_copies=[2, 0, 1])
    headers = {"X-Callback-Url": callback_url, "X-Call-Id": "my-id-1"}

    async with session.post(f"{gw.url}/async-function/fn", data=b"x", headers=headers) as response:
        assert response.headers["X-Call-Id"] == "my-id-1"
    async with asyncio.timeout(5):
        await gw.wait_callbacks(2)
    assert [(r.headers["X-Call-Id"], r.headers["X-Function-Status"]) for r in received] == [
        ("my-id-1", "500"),
        ("my-id-1", "500"),
    ]

    # Second call: the callback is lost; the function still ran.
    async with session.post(f"{gw.url}/async-function/fn", data=b"x", headers=headers):
        pass
    await eventually(lambda: gw.calls("fn") == 2)
    await asyncio.sleep(0.05)
    assert len(received) == 2


async def test_double_async_to_unknown_function_still_202_then_404_callback(
    gw: GatewayDouble, session: aiohttp.ClientSession, receiver: tuple[str, list[web.Request], list[bytes]]
) -> None:
    callback_url, received, bodies = receiver

    async with session.post(
        f"{gw.url}/async-function/missing", data=b"x", headers={"X-Callback-Url": callback_url}
    ) as response:
        assert response.status == 202
    async with asyncio.timeout(5):
        callbacks: list[SentCallback] = await gw.wait_callbacks(1)

    assert callbacks[0].function_status == 404
    assert received[0].headers["X-Function-Status"] == "404"
    assert bodies[0].startswith(b"error finding function missing.openfaas-fn")


async def test_double_rejects_a_bad_callback_url(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    async with session.post(
        f"{gw.url}/async-function/fn", data=b"x", headers={"X-Callback-Url": "not a url"}
    ) as response:
        assert response.status == 400


async def test_double_status_sequence_headers_and_echo(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    gw.set_functions([FunctionSpec("fn")])
    gw.script("fn", statuses=[503, 503, 200], headers=[{"Retry-After": "2"}, {"Retry-After": "1"}, {}])

    seen = []
    for i in range(4):
        async with session.post(
            f"{gw.url}/function/fn",
            data=f"body-{i}".encode(),
            headers={"Content-Type": "text/plain", "X-Topic": "t"},
        ) as response:
            seen.append((response.status, response.headers.get("Retry-After"), await response.read()))

    assert seen == [
        (503, "2", b"body-0"),
        (503, "1", b"body-1"),
        (200, None, b"body-2"),
        (200, None, b"body-3"),
    ]
    recorded = gw.requests_for("fn.openfaas-fn")
    assert [r.body for r in recorded] == [b"body-0", b"body-1", b"body-2", b"body-3"]
    assert recorded[0].headers["x-topic"] == "t"  # case-insensitive copy
    assert recorded[0].path == "/function/fn"


async def test_double_scripted_body_delay_and_unknown_function(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    gw.set_functions([FunctionSpec("slow")])
    gw.script("slow", body="done", delay=0.2)

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with session.post(f"{gw.url}/function/slow", data=b"x") as response:
        assert (response.status, await response.read()) == (200, b"done")
    assert loop.time() - started >= 0.2

    async with session.post(f"{gw.url}/function/nope.dev", data=b"x") as response:
        assert response.status == 404
        assert (await response.text()).startswith("error finding function nope.dev")


async def test_double_hang_until_released(gw: GatewayDouble, session: aiohttp.ClientSession) -> None:
    gw.set_functions([FunctionSpec("stuck")])
    gw.script("stuck", hang=True, statuses=504)

    call = asyncio.create_task(session.post(f"{gw.url}/function/stuck", data=b"x"))
    await eventually(lambda: gw.calls("stuck") == 1)
    await asyncio.sleep(0.1)
    assert not call.done()

    gw.release_hangs()
    async with asyncio.timeout(5):
        response = await call
    assert response.status == 504
    response.release()


async def test_double_basic_auth_guards_system_only(session: aiohttp.ClientSession) -> None:
    async with GatewayDouble([FunctionSpec("fn")], credentials=CREDENTIALS) as gw:
        async with session.get(f"{gw.url}/system/functions") as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Basic realm="Restricted"'
        auth = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
        async with session.get(f"{gw.url}/system/functions", headers=auth) as response:
            assert response.status == 200
            listed = await response.json()
        async with session.post(f"{gw.url}/function/fn", data=b"x") as response:
            assert response.status == 200

    assert listed == [
        {
            "name": "fn",
            "image": "ghcr.io/openfaas/fn:latest",
            "namespace": DEFAULT_NAMESPACE,
            "envProcess": "",
            "labels": {},
            "annotations": {},
            "replicas": 1,
            "availableReplicas": 1,
            "invocationCount": 0,
            "createdAt": "2024-01-01T00:00:00Z",
        }
    ]


# ---------------------------------------------------------------------------- cron annotations


async def test_schedule_timezone_and_cron_policies_reach_the_target(
    gw: GatewayDouble, session: aiohttp.ClientSession
) -> None:
    annotations = {
        "schedule": " */5 * * * * ",
        "timezone": "Europe/Paris",
        "fastconn.cron.concurrency": "forbid",
        "fastconn.cron.catch_up": "last",
        "unrelated": "x",
    }
    gw.set_functions(
        [
            FunctionSpec("tick", topic="cron-function", annotations=annotations),
            FunctionSpec("plain", topic="orders"),
        ]
    )

    targets = {t.name: t for t in await registry(gw, session).fetch()}

    tick = targets["tick.openfaas-fn"]
    assert tick.topics == ("cron-function",)
    assert (tick.schedule, tick.timezone) == ("*/5 * * * *", "Europe/Paris")
    assert tick.cron_policy == (("catch_up", "last"), ("concurrency", "forbid"))
    plain = targets["plain.openfaas-fn"]
    assert (plain.schedule, plain.timezone, plain.cron_policy) == (None, None, ())


def test_a_static_schedule_subscribes_to_the_cron_topic() -> None:
    (target,) = static_targets(
        [StaticEntry("tick", [], url="http://x/tick", schedule="@every 1s", timezone="UTC")], None
    )
    assert target.topics == ("cron-function",)
    assert (target.schedule, target.timezone) == ("@every 1s", "UTC")
