"""The Pushbullet source against a local double of Pushbullet's API (websocket stream + REST),
with a real dispatcher calling a real HTTP function double; the daemon end to end for the
start-up error, one delivery, and (slow) kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from conftest import DaemonFactory
from fastconn.checkpoint import checkpoint_store
from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.errors import SourceError
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.source import SourceContext
from fastconn.sources.pushbullet import PushbulletConfig, PushbulletSource
from fastconn.sources.pushbullet.progress import Boundary, Progress
from fastconn.testing import DaemonProcess, FunctionDouble, RecordedCall, wait_for
from gateway_double import FunctionSpec, GatewayDouble, async_daemon_config
from nats_fixtures import NatsServer, nats_server, unique  # noqa: F401
from pushbullet_double import PushbulletDouble


@pytest.fixture
async def pushbullet() -> AsyncIterator[PushbulletDouble]:
    async with PushbulletDouble(nop_interval=0.1) as double:
        yield double


def source_config(double: PushbulletDouble, tmp_path: Path, **keys: Any) -> PushbulletConfig:
    return PushbulletConfig.model_validate(
        {
            "access_token": double.token,
            "api_url": double.api_url,
            "stream_url": double.stream_url,
            "checkpoint": {"path": str(tmp_path / "pushbullet.checkpoint")},
            "keepalive_timeout": "1s",
            "reconnect_initial": "50ms",
            "reconnect_max": "200ms",
            "retry_backoff_initial": "50ms",
            "retry_backoff_max": "200ms",
            **keys,
        }
    )


def function(double: FunctionDouble, name: str, *topics: str) -> FunctionTarget:
    return FunctionTarget(name, topics, double.url(f"/{name}"))


@dataclass
class TopicMap:
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    waits: int = 0


@contextlib.asynccontextmanager
async def running(
    config: PushbulletConfig, targets: Sequence[FunctionTarget], topic_map: TopicMap | None = None
) -> AsyncIterator[PushbulletSource]:
    """A Pushbullet source on a real dispatcher, stopped and closed as the daemon does.
    ``topic_map``: the daemon's first-topic-map wait (default: the map is there)."""
    options = DispatchOptions(backoff_initial=0.01, backoff_max=0.05, max_attempts=2)
    async with Dispatcher(options) as dispatcher:

        async def ready(timeout: float) -> bool:
            if topic_map is None:
                return True
            topic_map.waits += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(topic_map.loaded.wait(), min(timeout, 0.05))
            return topic_map.loaded.is_set()

        ctx = SourceContext(dispatcher=dispatcher, metrics=Metrics(), app=web.Application(), wait_ready=ready)
        dispatcher.set_functions(list(targets))
        source = PushbulletSource(config)
        source.register(ctx)
        await source.start()
        try:
            yield source
        finally:
            await source.stop()
            await dispatcher.close()
            await source.close()


def idens(calls: Sequence[RecordedCall]) -> list[str]:
    return [c.headers["X-Pushbullet-Iden"] for c in calls]


def saved(tmp_path: Path) -> Boundary:
    return Boundary.decode((tmp_path / "pushbullet.checkpoint").read_text())


async def test_a_tickle_fetches_and_dispatches_the_push_with_its_headers(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    old = pushbullet.create_push("alerts", tickle=False)
    async with running(
        source_config(pushbullet, tmp_path), [function(function_double, "fn", "alerts")]
    ) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        push = pushbullet.create_push("alerts", type="link", url="https://example.invalid/")
        await wait_for(lambda: function_double.calls_to("/fn"), 5, what="the call")
        await wait_for(lambda: saved(tmp_path).modified == push["modified"], 5, what="the checkpoint")
        assert source.counters["syncs"] >= 2  # the connection's sync and the tickle's
    [call] = function_double.calls_to("/fn")
    assert json.loads(call.body) == push, "the body is the push JSON"
    assert call.headers["X-Topic"] == "alerts"
    assert call.headers["X-Message-Id"] == push["iden"]
    assert call.headers["X-Pushbullet-Iden"] == push["iden"]
    assert call.headers["X-Pushbullet-Type"] == "link"
    assert call.headers["X-Pushbullet-Channel"] == "alerts"
    assert old["iden"] not in idens(function_double.calls), "history before the first start is not replayed"
    # Every listing asked for active pushes only, with a page size, from the boundary (inclusive).
    for query in pushbullet.requests_to("/v2/pushes")[1:]:
        assert query["active"] == "true" and query["limit"] == "500"
        assert (
            float(query["modified_after"]) < old["modified"]
            or float(query["modified_after"]) < push["modified"]
        )


async def test_no_sync_before_the_topic_map_so_nothing_is_settled_as_unrouted(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    topic_map = TopicMap()
    async with running(source_config(pushbullet, tmp_path), [], topic_map) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        push = pushbullet.create_push("alerts")
        await wait_for(lambda: topic_map.waits >= 4, 5, what="the source waiting for the topic map")
        assert source.counters["syncs"] == 0 and source.outstanding_pushes == 0
        # What the daemon does with its first topic map.
        source._require_ctx().dispatcher.set_functions([function(function_double, "fn", "alerts")])
        topic_map.loaded.set()
        await wait_for(lambda: function_double.calls, 5, what="the push once functions are known")
    assert idens(function_double.calls) == [push["iden"]]


async def test_channel_rules_filter_unknown_dismissed_and_owned(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    for tag in ("alerts", "news"):
        pushbullet.add_channel(tag)
    pushbullet.add_channel("mine", subscribed=False)
    targets = [function(function_double, "fn", "alerts", "news", "mine", "later")]
    config = source_config(pushbullet, tmp_path, channels=["alerts", "mine", "later"])
    async with running(config, targets) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        wanted = [pushbullet.create_push("alerts"), pushbullet.create_push("mine")]
        pushbullet.create_push("news")  # subscribed, not in channels
        pushbullet.create_push("nowhere")  # a channel_iden no subscription knows
        pushbullet.create_push(None)  # no channel at all
        pushbullet.create_push("alerts", dismissed=True)
        pushbullet.add_channel("later")  # subscribed after the start: found by a refresh
        wanted.append(pushbullet.create_push("later"))
        await wait_for(lambda: len(function_double.calls) >= 3, 5, what="three calls")
        await wait_for(lambda: source.outstanding_pushes == 0, 5, what="all settled")
        assert source.skipped == {
            "unknown_channel": 1,
            "no_channel": 1,
            "filtered": 1,
            "dismissed": 1,
            "malformed": 0,
        }
    assert sorted(idens(function_double.calls)) == sorted(p["iden"] for p in wanted)
    assert sorted(c.headers["X-Topic"] for c in function_double.calls) == ["alerts", "later", "mine"]


async def test_edits_dismissals_and_deletions_do_not_trigger_again(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    async with running(source_config(pushbullet, tmp_path), [function(function_double, "fn", "alerts")]):
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        pushes = [pushbullet.create_push("alerts") for _ in range(3)]
        await wait_for(lambda: len(function_double.calls) == 3, 5, what="three calls")
        pushbullet.change_push(pushes[0]["iden"], title="edited")
        pushbullet.change_push(pushes[1]["iden"], dismissed=True)
        pushbullet.delete_push(pushes[2]["iden"])
        # A marker created after the changes: once it arrives, the changes were synced too.
        marker = pushbullet.create_push("alerts")
        await wait_for(lambda: marker["iden"] in idens(function_double.calls), 5, what="the marker")
    assert sorted(idens(function_double.calls)) == sorted([*(p["iden"] for p in pushes), marker["iden"]])


async def test_ephemerals_go_to_their_type_topic(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    targets = [
        function(function_double, "mirror", "ephemeral:mirror"),
        function(function_double, "sealed", "ephemeral:encrypted"),
    ]
    async with running(source_config(pushbullet, tmp_path), targets):
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        pushbullet.ephemeral({"type": "mirror", "title": "hi", "source_device_iden": "d1", "iden": "e1"})
        pushbullet.ephemeral({"type": "dismissal", "notification_id": "3"})  # routed nowhere
        pushbullet.ephemeral({"encrypted": True, "ciphertext": "c2VjcmV0"})
        await wait_for(lambda: len(function_double.calls) == 2, 5, what="the ephemerals")
    [mirror] = function_double.calls_to("/mirror")
    assert json.loads(mirror.body)["title"] == "hi"
    assert mirror.headers["X-Topic"] == "ephemeral:mirror"
    assert mirror.headers["X-Pushbullet-Type"] == "mirror"
    assert mirror.headers["X-Message-Id"] == "e1"
    assert "X-Pushbullet-Channel" not in mirror.headers
    [sealed] = function_double.calls_to("/sealed")
    assert json.loads(sealed.body) == {"encrypted": True, "ciphertext": "c2VjcmV0"}
    assert "X-Pushbullet-Type" not in sealed.headers


async def test_a_backlog_is_paged_with_the_cursor_and_delivered_in_order_once(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    start = pushbullet.create_push("alerts", tickle=False)
    (tmp_path / "pushbullet.checkpoint").write_text(
        Boundary(start["modified"], frozenset({start["iden"]})).encode()
    )
    backlog = [pushbullet.create_push("alerts", tickle=False) for _ in range(345)]
    config = source_config(pushbullet, tmp_path, page_size=50)
    async with running(config, [function(function_double, "fn", "alerts")]):
        await wait_for(lambda: len(function_double.calls) >= 345, 20, what="the backlog")
        await wait_for(lambda: saved(tmp_path).modified == backlog[-1]["modified"], 5, what="the checkpoint")
    got = idens(function_double.calls)
    assert sorted(got) == [p["iden"] for p in backlog], "every push of the backlog once, none before it"
    pages = pushbullet.requests_to("/v2/pushes")
    assert sum("cursor" in q for q in pages) >= 6, "345 pushes by 50 need 6 follow-up pages"
    assert all(q["limit"] == "50" for q in pages)


async def test_a_restart_resumes_from_the_checkpoint_without_loss_or_replay(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """Pushes created while the source is down arrive after the restart; delivered ones do not
    come again, even those sharing the boundary's timestamp; pushes settled behind an
    undelivered one are not replayed either, only the undelivered one."""
    pushbullet.add_channel("alerts")
    pushbullet.add_channel("slow")
    targets = [function(function_double, "fn", "alerts"), function(function_double, "slow", "slow")]
    function_double.script("/slow", [503])
    config = source_config(pushbullet, tmp_path)
    async with running(config, targets) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        same = pushbullet.now()
        first = [pushbullet.create_push("alerts", modified=same) for _ in range(2)]
        held = pushbullet.create_push("slow")
        after_held = [pushbullet.create_push("alerts") for _ in range(3)]
        await wait_for(lambda: len(function_double.calls_to("/fn")) == 5, 5, what="five calls")
        await wait_for(lambda: len(function_double.calls_to("/slow")) >= 2, 5, what="the held push retried")
        await wait_for(lambda: len(saved(tmp_path).settled_after) == 3, 5, what="the checkpoint")
        assert source.stuck_pushes == 1
    boundary = saved(tmp_path)
    assert boundary.modified == same and boundary.idens == {p["iden"] for p in first}
    assert boundary.settled_after == {p["iden"] for p in after_held}
    while_down = [pushbullet.create_push("alerts", tickle=False) for _ in range(2)]
    twin = pushbullet.create_push("alerts", tickle=False, modified=same)  # the boundary's timestamp
    function_double.script("/slow", [200])
    before = len(function_double.calls)
    async with running(config, targets) as source:
        await wait_for(lambda: len(function_double.calls) >= before + 4, 5, what="the catch-up")
        await wait_for(lambda: source.outstanding_pushes == 0, 5, what="all settled")
    got = Counter(idens(function_double.calls[before:]))
    assert got == Counter([held["iden"], twin["iden"], *(p["iden"] for p in while_down)])
    assert saved(tmp_path).modified == max(p["modified"] for p in while_down)


async def test_the_checkpoint_in_a_jetstream_bucket_survives_a_restart(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path, nats_server: NatsServer
) -> None:
    pushbullet.add_channel("alerts")
    bucket = unique("pbcheck")
    store = {"type": "jetstream_kv", "servers": [nats_server.url], "bucket": bucket}
    config = source_config(pushbullet, tmp_path, checkpoint=store, name="pb-kv")
    targets = [function(function_double, "fn", "alerts")]
    async with running(config, targets):
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        first = pushbullet.create_push("alerts")
        await wait_for(lambda: function_double.calls, 5, what="the first push")
    kv = checkpoint_store(config.checkpoint, config.name)
    await kv.open()
    try:
        value = await kv.load()
    finally:
        await kv.close()
    assert value is not None and Boundary.decode(value).modified == first["modified"]
    second = pushbullet.create_push("alerts", tickle=False)
    async with running(config, targets):
        await wait_for(lambda: len(function_double.calls) >= 2, 5, what="the push created while down")
        third = pushbullet.create_push("alerts")
        await wait_for(lambda: len(function_double.calls) >= 3, 5, what="a live push")
    assert idens(function_double.calls) == [first["iden"], second["iden"], third["iden"]]


async def test_a_dropped_stream_reconnects_and_catches_up(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    async with running(
        source_config(pushbullet, tmp_path), [function(function_double, "fn", "alerts")]
    ) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        await pushbullet.drop_streams()
        missed = pushbullet.create_push("alerts")  # its tickle reaches no socket
        await wait_for(lambda: pushbullet.stream_connections == 2, 5, what="the reconnection")
        await wait_for(lambda: function_double.calls, 5, what="the missed push")
        live = pushbullet.create_push("alerts")
        await wait_for(lambda: len(function_double.calls) == 2, 5, what="the live push")
        assert source.health().ok
    assert idens(function_double.calls) == [missed["iden"], live["iden"]]


async def test_a_revoked_token_makes_the_source_unhealthy_until_it_is_valid_again(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    async with running(
        source_config(pushbullet, tmp_path), [function(function_double, "fn", "alerts")]
    ) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        valid, pushbullet.token = pushbullet.token, "o.another-token"
        await pushbullet.drop_streams()
        await wait_for(lambda: "401" in source.health().reason, 5, what="the refusal in the health")
        assert not source.health().ok and valid not in source.health().reason
        pushbullet.token = valid
        await wait_for(lambda: source.health().ok, 5, what="the source healthy again")
        push = pushbullet.create_push("alerts")
        await wait_for(lambda: function_double.calls, 5, what="a push after the recovery")
    assert idens(function_double.calls) == [push["iden"]]


async def test_missing_keepalives_reopen_the_stream(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    config = source_config(pushbullet, tmp_path, keepalive_timeout="400ms")
    async with running(config, [function(function_double, "fn", "alerts")]) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        pushbullet.nops = False  # open, silent: a half-dead connection
        await wait_for(lambda: source.counters["keepalive_timeouts"] >= 1, 5, what="the keep-alive timeout")
        pushbullet.nops = True
        await wait_for(lambda: pushbullet.stream_connections >= 2, 5, what="a new connection")
        pushbullet.create_push("alerts")
        await wait_for(lambda: function_double.calls, 5, what="a push over the new connection")
    assert source.counters["stream_connections"] >= 2


async def test_429_waits_for_the_rate_limit_reset(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    """Budget 3 requests per 0.5 s and no Remaining hint: the source hits 429, waits for
    X-Ratelimit-Reset (no request in the rest of the window), and still gets every push."""
    pushbullet.add_channel("alerts")
    pushbullet.announce_remaining = False
    async with running(
        source_config(pushbullet, tmp_path, page_size=2), [function(function_double, "fn", "alerts")]
    ) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        pushbullet.rate_limit(3, window=0.5)
        started = time.monotonic()
        pushes = [pushbullet.create_push("alerts", tickle=False) for _ in range(12)]
        pushbullet.tickle()
        await wait_for(lambda: len(function_double.calls) >= 12, 15, what="all pushes")
        windows = (time.monotonic() - started) / 0.5 + 1
        assert source.counters["rate_limited"] >= 1
    assert sorted(idens(function_double.calls)) == [p["iden"] for p in pushes]
    assert pushbullet.rate_limited <= windows + 1, "a 429 at most once per window: the client waited"


async def test_an_exhausted_budget_waits_without_a_429(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    async with running(
        source_config(pushbullet, tmp_path, page_size=2), [function(function_double, "fn", "alerts")]
    ):
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        pushbullet.rate_limit(3, window=0.5)
        pushes = [pushbullet.create_push("alerts", tickle=False) for _ in range(12)]
        pushbullet.tickle()
        await wait_for(lambda: len(function_double.calls) >= 12, 15, what="all pushes")
    assert sorted(idens(function_double.calls)) == [p["iden"] for p in pushes]
    assert pushbullet.rate_limited == 0, "X-Ratelimit-Remaining: 0 was honoured before a 429"


async def test_a_bad_token_is_a_clear_start_error(pushbullet: PushbulletDouble, tmp_path: Path) -> None:
    config = source_config(pushbullet, tmp_path, access_token="o.wrong")
    with pytest.raises(SourceError, match=r"refused the access token .*invalid_access_token") as caught:
        async with running(config, []):
            pass
    assert "o.wrong" not in str(caught.value)


async def test_final_failures_go_to_the_dead_letter_file_and_release_the_checkpoint(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    pushbullet.add_channel("broken")
    function_double.script("/bad", [400])
    letters = tmp_path / "dead.jsonl"
    config = source_config(pushbullet, tmp_path, dead_letter={"type": "file", "path": str(letters)})
    targets = [function(function_double, "fn", "alerts"), function(function_double, "bad", "broken")]
    async with running(config, targets) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        bad = pushbullet.create_push("broken")
        good = pushbullet.create_push("alerts")
        await wait_for(lambda: saved(tmp_path).modified == good["modified"], 5, what="the checkpoint")
        assert source.counters["dead_lettered"] == 1 and source.stuck_pushes == 0
    [line] = letters.read_text().splitlines()
    letter = json.loads(line)
    assert json.loads(letter["payload"]) == bad
    headers = dict(letter["headers"])
    assert headers["X-Pushbullet-Iden"] == bad["iden"]
    assert headers["fastconn-dlt-status"] == "400"
    assert headers["fastconn-dlt-original-topic"] == "broken"
    assert headers["fastconn-dlt-function"] == "bad"


async def test_without_a_dead_letter_a_final_failure_holds_the_checkpoint(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    pushbullet.add_channel("other")
    function_double.script("/fn", [400])
    targets = [function(function_double, "fn", "alerts"), function(function_double, "ok", "other")]
    async with running(source_config(pushbullet, tmp_path), targets) as source:
        await wait_for(lambda: pushbullet.stream_connections == 1, 5, what="the stream")
        start = saved(tmp_path)
        bad = pushbullet.create_push("alerts")
        later = pushbullet.create_push("other")
        await wait_for(lambda: len(function_double.calls_to("/fn")) >= 3, 5, what="retries")
        await wait_for(lambda: later["iden"] in saved(tmp_path).settled_after, 5, what="the later push")
        assert source.stuck_pushes == 1
        assert saved(tmp_path).modified == start.modified, "the checkpoint waits for the failing push"
        function_double.script("/fn", [200])
        await wait_for(lambda: saved(tmp_path).modified == later["modified"], 5, what="the checkpoint")
    assert idens(function_double.calls_to("/fn"))[-1] == bad["iden"]


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="access_token or access_token_file"):
        PushbulletConfig.model_validate({})
    with pytest.raises(ValueError, match="page_size"):
        PushbulletConfig.model_validate({"access_token": "t", "page_size": 501})


def test_boundary_round_trip_and_equal_timestamps() -> None:
    boundary = Boundary(1700000000.123456, frozenset({"a"}), frozenset({"z"}))
    assert Boundary.decode(boundary.encode()) == boundary
    assert boundary.modified_after < boundary.modified, "the boundary's own timestamp is listed again"
    assert boundary.covers(1700000000.123456, "a") and not boundary.covers(1700000000.123456, "b")
    assert boundary.covers(1699999999.0, "x") and boundary.covers(1800000000.0, "z")
    with pytest.raises(ValueError):
        Boundary.decode('{"modified": "soon"}')


def test_progress_moves_only_past_settled_pushes_and_carries_those_above() -> None:
    progress = Progress(Boundary(10.0, frozenset({"a"})))
    assert progress.read("a", 10.0, 10.0) is None, "settled at the boundary"
    b, c, d = (progress.read(iden, stamp, stamp) for iden, stamp in (("b", 10.0), ("c", 11.0), ("d", 12.0)))
    assert b is not None and c is not None and d is not None
    progress.settle(c)
    assert progress.boundary == Boundary(10.0, frozenset({"a"}), frozenset({"c"})), "b still holds it"
    progress.settle(b)
    assert progress.boundary == Boundary(11.0, frozenset({"c"})), "past b and c, d in flight"
    progress.settle(d)
    # A restart with c settled above a boundary held by b: c is skipped, b comes again.
    restarted = Progress(Boundary(10.0, frozenset({"a"}), frozenset({"c"})))
    again_b = restarted.read("b", 10.0, 10.0)
    assert again_b is not None and restarted.read("c", 11.0, 11.0) is None
    restarted.settle(again_b)
    assert restarted.boundary == Boundary(11.0, frozenset({"c"}))
    assert restarted.read("e", 5.0, 13.0) is None, "created before the boundary: an edit, not new"


def daemon_config(
    double: PushbulletDouble, fn: FunctionDouble, tmp_path: Path, **keys: Any
) -> dict[str, Any]:
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s"},
        "functions": [{"name": "fn", "url": fn.url("/fn"), "topics": ["alerts"]}],
        "sources": [
            {
                "type": "pushbullet",
                "access_token": double.token,
                "api_url": double.api_url,
                "stream_url": double.stream_url,
                "checkpoint": {"path": str(tmp_path / "pushbullet.checkpoint")},
                "keepalive_timeout": "2s",
                **keys,
            }
        ],
    }


async def test_daemon_delivers_a_push(
    pushbullet: PushbulletDouble,
    function_double: FunctionDouble,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
) -> None:
    pushbullet.add_channel("alerts")
    daemon = await daemon_factory(daemon_config(pushbullet, function_double, tmp_path))
    await wait_for(lambda: pushbullet.stream_connections == 1, 10, what="the stream")
    pushbullet.create_push("elsewhere")  # a channel nobody subscribed to: counted, skipped
    push = pushbullet.create_push("alerts")
    await wait_for(lambda: function_double.calls, 10, what="the call")
    assert [c.headers["X-Message-Id"] for c in function_double.calls] == [push["iden"]]
    metrics = await daemon.metrics()
    assert metrics.get('fastconn_pushbullet_events_total{event="syncs",source="pushbullet"}', 0) >= 1
    skipped = 'fastconn_pushbullet_skipped_pushes_total{reason="unknown_channel",source="pushbullet"}'
    assert metrics.get(skipped) == 1
    assert await daemon.stop() == 0, daemon.output()
    assert saved(tmp_path).modified == push["modified"], "the checkpoint is saved at shutdown at the latest"


async def test_async_invocation_moves_the_checkpoint_only_after_a_good_callback(
    pushbullet: PushbulletDouble, gateway: GatewayDouble, tmp_path: Path, daemon_factory: DaemonFactory
) -> None:
    """The checkpoint stays behind the push while its callback is awaited and after a failed
    one (503, one attempt: the source delivers it again), and reaches it after the good one."""
    pushbullet.add_channel("alerts")
    gateway.set_functions([FunctionSpec("fn", topic="alerts")])
    gateway.script("fn", statuses=[503, 200], callback_delay=[1.0, 1.0])
    source = {
        "type": "pushbullet",
        "access_token": pushbullet.token,
        "api_url": pushbullet.api_url,
        "stream_url": pushbullet.stream_url,
        "checkpoint": {"path": str(tmp_path / "pushbullet.checkpoint")},
        "retry_backoff_initial": "50ms",
        "retry_backoff_max": "200ms",
    }
    await daemon_factory(async_daemon_config(gateway, source, max_attempts=1))
    await wait_for(lambda: pushbullet.stream_connections == 1, 10, what="the stream")
    push = pushbullet.create_push("alerts")

    def behind() -> bool:
        path = tmp_path / "pushbullet.checkpoint"
        return not path.exists() or saved(tmp_path).modified < push["modified"]

    await wait_for(lambda: gateway.calls("fn") == 1, 10, what="the async call")
    assert behind(), "the checkpoint passed the push before its callback"
    await wait_for(lambda: gateway.calls("fn") == 2, 10, what="the push again after the failed callback")
    await wait_for(lambda: gateway.callbacks, what="the failed callback recorded")
    assert gateway.callbacks[0].function_status == 503
    assert behind(), "the checkpoint passed a push whose callback failed"
    await wait_for(lambda: not behind(), 10, what="the checkpoint at the push after the good callback")
    # The double records a callback once its answer is read: after the daemon acted on it.
    await wait_for(lambda: len(gateway.callbacks) == 2, what="both callbacks recorded")
    assert [c.function_status for c in gateway.callbacks] == [503, 200]
    requests = gateway.requests_for("fn")
    assert [r.path for r in requests] == ["/async-function/fn.openfaas-fn"] * 2
    assert [r.headers["X-Message-Id"] for r in requests] == [push["iden"]] * 2


async def test_daemon_with_a_bad_token_exits_with_a_clear_message(
    pushbullet: PushbulletDouble,
    function_double: FunctionDouble,
    tmp_path: Path,
    daemon_factory: DaemonFactory,
) -> None:
    config = daemon_config(pushbullet, function_double, tmp_path, access_token="o.wrong-token")
    daemon = await daemon_factory(config, wait=None)
    process = daemon.process
    assert process is not None
    await wait_for(lambda: process.poll() is not None, 20, what="the exit")
    output = daemon.output()
    assert process.returncode != 0
    assert "refused the access token" in output and "Account Settings" in output
    assert "Traceback" not in output and "o.wrong-token" not in output


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_nothing_and_replays_only_in_flight(
    pushbullet: PushbulletDouble, function_double: FunctionDouble, tmp_path: Path
) -> None:
    pushbullet.add_channel("alerts")
    function_double.script("/fn", [200], delay=0.02)
    config = daemon_config(pushbullet, function_double, tmp_path)
    config["dispatch"]["max_inflight"] = 8
    daemon = await DaemonProcess(config, tmp_path).start()
    try:
        await wait_for(lambda: pushbullet.stream_connections == 1, 10, what="the stream")
        pushes = [pushbullet.create_push("alerts", tickle=False) for _ in range(400)]
        pushbullet.tickle()
        await wait_for(lambda: len(function_double.calls) >= 100, 20, what="a quarter delivered")
    finally:
        daemon.kill()
    at_kill = len(set(idens(function_double.calls)))
    assert at_kill < len(pushes), "the kill came after the last push: nothing was in flight"
    async with DaemonProcess(config, tmp_path):
        await wait_for(
            lambda: {p["iden"] for p in pushes} <= set(idens(function_double.calls)), 30, what="every push"
        )
    counts = Counter(idens(function_double.calls))
    replayed = sum(n - 1 for n in counts.values())
    print(f"delivered before the kill: {at_kill}, delivered twice: {replayed}")
    assert replayed <= 64, f"{replayed} pushes delivered twice: more than were in flight"
