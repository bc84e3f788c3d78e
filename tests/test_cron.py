"""The cron source against real servers: a function double over HTTP, nats-server for the
JetStream key-value store, and fastconn daemons as subprocesses for the replica test.

Schedules are per-second, so no test waits for real minutes.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fastconn.config import load_config
from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.errors import ConfigError
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.registry import GatewayRegistry
from fastconn.source import SourceContext
from fastconn.sources.cron import CronConfig, CronSource, JetStreamKVStoreConfig
from fastconn.testing import DaemonProcess, FunctionDouble, RecordedCall, wait_for
from gateway_double import FunctionSpec, GatewayDouble
from nats_fixtures import NatsServer, nats_server, unique  # noqa: F401

Publish = Callable[[Sequence[FunctionTarget]], None]


def slot_of(call: RecordedCall) -> float:
    return datetime.fromisoformat(call.headers["X-Cron-Scheduled-Time"]).timestamp()


def cron_target(double: FunctionDouble, name: str, schedule: str | None, **fields: Any) -> FunctionTarget:
    return FunctionTarget(name, ("cron-function",), double.url(f"/{name}"), schedule=schedule, **fields)


@contextlib.asynccontextmanager
async def running(
    config: CronConfig, targets: Sequence[FunctionTarget]
) -> AsyncIterator[tuple[CronSource, Publish]]:
    """A cron source on a real dispatcher, fed the function table as the daemon feeds it."""
    async with Dispatcher(DispatchOptions(backoff_initial=0.01, max_attempts=1)) as dispatcher:

        async def ready(_timeout: float) -> bool:
            return True

        ctx = SourceContext(dispatcher=dispatcher, metrics=Metrics(), app=web.Application(), wait_ready=ready)
        source = CronSource(config)
        source.register(ctx)

        def publish(table: Sequence[FunctionTarget]) -> None:  # what the daemon does
            dispatcher.set_functions(table)
            ctx.publish_functions(table)

        publish(targets)
        await source.start()
        try:
            yield source, publish
        finally:
            await source.stop()
            await dispatcher.close()
            await source.close()


async def test_fires_carry_the_headers_and_reach_only_the_scheduled_function(
    function_double: FunctionDouble,
) -> None:
    targets = [
        cron_target(function_double, "tick", "* * * * * *"),
        cron_target(function_double, "every", "@every 2s; @every 3s"),
        cron_target(function_double, "unscheduled", None),  # subscribes to cron-function only
    ]
    async with running(CronConfig(body="hello"), targets):
        await wait_for(lambda: len(function_double.calls_to("/tick")) >= 3, 10, what="three ticks")
        await wait_for(lambda: len(function_double.calls_to("/every")) >= 2, 10, what="two 'every' fires")
    ticks = function_double.calls_to("/tick")
    for call in ticks:
        slot = slot_of(call)
        assert call.headers["X-Topic"] == "cron-function"
        assert call.headers["X-Cron-Schedule"] == "* * * * * *"
        assert call.headers["X-Cron-Scheduled-Time"].endswith("Z") and slot == int(slot)
        assert call.headers["X-Message-Id"] == f"cron:tick:{call.headers['X-Cron-Scheduled-Time']}"
        assert call.body == b"hello"
    slots = [slot_of(c) for c in ticks]
    assert slots == sorted(set(slots))
    assert all(slot_of(c) % 2 == 0 or slot_of(c) % 3 == 0 for c in function_double.calls_to("/every"))
    assert function_double.calls_to("/unscheduled") == []  # each fire targets its own function


async def test_schedules_follow_the_function_table(function_double: FunctionDouble) -> None:
    """Added, changed and removed schedules take effect without a restart."""
    async with running(CronConfig(), [cron_target(function_double, "a", "* * * * * *")]) as (source, publish):
        await wait_for(lambda: function_double.calls_to("/a"), 10, what="a fires")
        changed_at = time.time()
        publish([cron_target(function_double, "b", "* * * * * *")])  # a removed, b added
        await wait_for(lambda: len(function_double.calls_to("/b")) >= 3, 10, what="b fires")
        assert source.scheduled == {"b"}
        assert all(slot_of(c) <= changed_at + 1 for c in function_double.calls_to("/a"))

        publish([cron_target(function_double, "b", "@every 2s")])  # changed schedule
        await wait_for(
            lambda: any(c.headers["X-Cron-Schedule"] == "@every 2s" for c in function_double.calls_to("/b")),
            10,
            what="b on its new schedule",
        )
        publish([])
        await wait_for(lambda: not source.scheduled, 10, what="nothing scheduled")


async def test_bad_schedules_are_skipped_not_fatal(function_double: FunctionDouble) -> None:
    targets = [
        cron_target(function_double, "bad", "99 * * * *"),
        cron_target(function_double, "zone", "* * * * * *", timezone="Nowhere/Land"),
        cron_target(function_double, "good", "* * * * * *"),
    ]
    async with running(CronConfig(), targets) as (source, _):
        await wait_for(lambda: function_double.calls_to("/good"), 10, what="good fires")
        assert source.scheduled == {"good"}


async def test_forbid_skips_a_fire_while_the_previous_one_runs(function_double: FunctionDouble) -> None:
    function_double.script("/slow", delay=2.2)
    target = cron_target(function_double, "slow", "* * * * * *", cron_policy=(("concurrency", "forbid"),))
    async with running(CronConfig(), [target]) as (source, _):
        await wait_for(lambda: len(function_double.calls_to("/slow")) >= 3, 20, what="three fires")
        assert source.skipped_running >= 2
    starts = [c.at for c in function_double.calls_to("/slow")]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 2.1  # never overlapping


async def test_allow_overlaps(function_double: FunctionDouble) -> None:
    function_double.script("/slow", delay=2.2)
    async with running(CronConfig(), [cron_target(function_double, "slow", "* * * * * *")]) as (source, _):
        await wait_for(lambda: len(function_double.calls_to("/slow")) >= 3, 20, what="three fires")
        assert source.skipped_running == 0
    starts = [c.at for c in function_double.calls_to("/slow")]
    assert max(b - a for a, b in itertools.pairwise(starts)) < 2.1


def store_config(server: NatsServer, bucket: str) -> JetStreamKVStoreConfig:
    return JetStreamKVStoreConfig(type="jetstream_kv", servers=(server.url,), bucket=bucket)


@pytest.mark.parametrize("policy", ["all", "last", "none"])
async def test_catch_up_after_a_restart(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    policy: str,
) -> None:
    """Slots missed while down are fired at start from the store's last fired slot."""
    config = CronConfig(store=store_config(nats_server, unique("cron")), catch_up=policy, max_catch_up=10)
    targets = [cron_target(function_double, "tick", "* * * * * *")]
    async with running(config, targets):
        await wait_for(lambda: len(function_double.calls_to("/tick")) >= 2, 10, what="two ticks")
    last = max(slot_of(c) for c in function_double.calls_to("/tick"))
    before = len(function_double.calls_to("/tick"))
    # Just after a second starts: the restart then has most of a second before the next slot.
    await wait_for(lambda: time.time() >= last + 3.05, 10, what="three missed slots")  # down meanwhile
    restarted = time.time()  # every slot up to here was missed; later ones may fire live
    async with running(config, targets):
        await wait_for(
            lambda: len(function_double.calls_to("/tick")) >= before + 4, 10, what="fires after restart"
        )
    calls = function_double.calls_to("/tick")
    ids = Counter(c.headers["X-Message-Id"] for c in calls)
    assert max(ids.values()) == 1, "a slot fired twice"
    after = sorted(slot_of(c) for c in calls[before:])
    assert after == [after[0] + i for i in range(len(after))]  # from the first fire on, no gap
    if policy == "all":
        assert after[0] == last + 1  # every missed slot, oldest first
    elif policy == "last":
        assert last + 2 < after[0] <= restarted  # only the newest missed one
    else:
        assert after[0] > restarted  # none of the missed ones


async def test_two_sources_sharing_a_store_fire_each_slot_once(
    nats_server: NatsServer,
    function_double: FunctionDouble,
) -> None:
    config = CronConfig(store=store_config(nats_server, unique("cron")))
    targets = [cron_target(function_double, f"f{i}", "* * * * * *") for i in range(20)]
    async with running(config, targets) as (one, _), running(config, targets) as (two, _):
        start = time.time()
        await wait_for(lambda: len(function_double.calls) >= 20 * 5, 20, what="five slots of 20 functions")
    ids = Counter(c.headers["X-Message-Id"] for c in function_double.calls)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1][:5]
    # Both contended for the slots (which one wins each is up to timing, so not asserted per replica).
    assert one.fired + two.fired == len(ids) and one.claims_lost + two.claims_lost >= 20 * 3
    for i in range(20):
        slots = sorted(slot_of(c) for c in function_double.calls_to(f"/f{i}") if slot_of(c) > start + 1)
        assert slots == [slots[0] + k for k in range(len(slots))], f"f{i} missed a slot"


def replica_config(double: FunctionDouble, server: NatsServer, bucket: str, **source: Any) -> dict[str, Any]:
    return {
        "log_level": "info",
        "dispatch": {"backoff_initial": "10ms", "backoff_max": "50ms", "shutdown_timeout": "5s"},
        "functions": [{"name": "tick", "url": double.url("/tick"), "schedule": "* * * * * *"}],
        "sources": [
            {
                "type": "cron",
                "store": {"type": "jetstream_kv", "servers": [server.url], "bucket": bucket},
                **source,
            }
        ],
    }


@pytest.mark.slow
async def test_two_daemons_sharing_a_store_fire_each_slot_exactly_once(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    tmp_path: Path,
) -> None:
    """Two replicas, one JetStream key-value bucket: over 22+ per-second slots every slot is
    fired once — none twice, none missed."""
    config = replica_config(function_double, nats_server, unique("cron"))
    async with DaemonProcess(config, tmp_path) as one, DaemonProcess(config, tmp_path) as two:
        both_up = time.time()
        window = lambda: [s for s in map(slot_of, function_double.calls_to("/tick")) if s > both_up]  # noqa: E731
        await wait_for(lambda: len(set(window())) >= 22, 40, what="22 slots with both daemons up")
        output = one.output() + two.output()
    slots = window()
    assert len(slots) == len(set(slots)), (
        f"slots fired twice: {[s for s, n in Counter(slots).items() if n > 1]}"
    )
    ordered = sorted(slots)
    assert ordered == [ordered[0] + k for k in range(len(ordered))], "a slot was missed"
    assert "cron" in output


@pytest.mark.slow
async def test_catch_up_after_kill_9(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    tmp_path: Path,
) -> None:
    """A daemon killed with SIGKILL and started again fires the slots it missed meanwhile."""
    config = replica_config(function_double, nats_server, unique("cron"), catch_up="all", max_catch_up=30)
    daemon = await DaemonProcess(config, tmp_path).start()
    try:
        await wait_for(lambda: len(function_double.calls_to("/tick")) >= 2, 15, what="two ticks")
    finally:
        # Right after a call arrived, so far from the next slot's claim (taken on the second):
        # a kill between a claim and its call would lose that slot (see the README).
        daemon.kill()
    killed_at = time.time()
    await wait_for(lambda: time.time() >= killed_at + 3, 10, what="slots missed while down")
    async with DaemonProcess(config, tmp_path):
        await wait_for(
            lambda: max(map(slot_of, function_double.calls_to("/tick"))) > killed_at + 4,
            20,
            what="live fires",
        )
    slots = sorted(map(slot_of, function_double.calls_to("/tick")))
    assert len(slots) == len(set(slots)), "a slot fired twice"
    assert slots == [slots[0] + k for k in range(len(slots))], "a missed slot was not caught up"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[functions]]\nname = "f"\nurl = "http://x/f"\nschedule = "61 * * * *"\n')
    with pytest.raises(ConfigError, match=r"functions\[0\].*not a valid cron expression"):
        load_config(path, env={})
    path.write_text('[[sources]]\ntype = "cron"\ntimezone = "Mars/Base"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\].*timezone.*unknown time zone 'Mars/Base'"):
        load_config(path, env={})
    path.write_text('[[sources]]\ntype = "cron"\nconcurrency = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"sources\[0\].*concurrency"):
        load_config(path, env={})
    path.write_text(
        '[[functions]]\nname = "f"\nurl = "http://x/f"\nschedule = "@every 5s"\ntimezone = "Europe/Paris"\n'
        '[[sources]]\ntype = "cron"\n'
    )
    config = load_config(path, env={})
    assert config.functions[0].topics == ("cron-function",)


async def test_gateway_annotations_schedule_and_unschedule_functions() -> None:
    """``topic: cron-function`` + ``schedule`` from the gateway listing, through the registry's
    rebuilds: fired with the annotation's policy; dropped when the annotation goes away."""
    async with GatewayDouble() as gw:
        annotations = {"schedule": "* * * * * *", "fastconn.cron.jitter": "0s"}
        gw.set_functions(
            [
                FunctionSpec("tick", topic="cron-function", annotations=annotations),
                FunctionSpec("other", topic="orders", annotations=annotations),  # not cron-function
            ]
        )
        async with (
            GatewayRegistry(gw.url) as registry,
            running(CronConfig(), await registry.fetch()) as (
                source,
                publish,
            ),
        ):
            await wait_for(lambda: gw.calls("tick.openfaas-fn") >= 2, 10, what="annotated function fires")
            assert source.scheduled == {"tick.openfaas-fn"}
            (first, *_) = gw.requests_for("tick.openfaas-fn")
            assert first.headers["X-Message-Id"].startswith("cron:tick.openfaas-fn:")

            gw.set_functions([FunctionSpec("tick", topic="cron-function")])  # schedule removed
            publish(await registry.fetch())
            await wait_for(lambda: not source.scheduled, 10, what="unscheduled after the rebuild")
        assert gw.calls("other.openfaas-fn") == 0
