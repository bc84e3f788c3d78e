"""The cron source against real servers: a function double over HTTP, nats-server for the
JetStream key-value store, and fastconn daemons as subprocesses for the replica test.

Schedules are per-second, so no test waits for real minutes.
"""

from __future__ import annotations

import asyncio
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
from fastconn.sources.cron import CronConfig, CronSource, JetStreamKVStoreConfig, message_id
from fastconn.sources.cron.store import Claimed, JetStreamKVStore, SlotRecord
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


def store_config(server: NatsServer, bucket: str, lease: float = 30.0) -> JetStreamKVStoreConfig:
    return JetStreamKVStoreConfig(type="jetstream_kv", servers=(server.url,), bucket=bucket, lease=lease)


@contextlib.asynccontextmanager
async def replicas(config: JetStreamKVStoreConfig, count: int) -> AsyncIterator[list[JetStreamKVStore]]:
    """``count`` stores on one bucket, as ``count`` replicas hold them."""
    stores = [JetStreamKVStore(config) for _ in range(count)]
    try:
        for store in stores:
            await store.open("cron")
        yield stores
    finally:
        for store in stores:
            await store.close()


async def test_an_expired_claim_is_taken_over_by_exactly_one_replica(nats_server: NatsServer) -> None:
    """claim → (no done: the claimer died) → lease expires → of two replicas sweeping at once,
    exactly one takes the slot over; the dead claimer's renewal then learns it lost the slot;
    done clears the claim, and nothing is left to take over. Time is passed in, not waited for."""
    async with replicas(store_config(nats_server, unique("cron"), lease=5.0), 3) as (dead, one, two):
        t = 1_000_000.0
        assert await dead.claim("f", 100.0, t) == Claimed(True)
        assert await one.claim("f", 100.0, t + 1) == Claimed(False)  # claimed, lease still running
        assert await one.take_over("f", t + 4.9) == ()
        takers = await asyncio.gather(one.take_over("f", t + 5.1), two.take_over("f", t + 5.1))
        assert sorted(takers) == [(), (100.0,)], "exactly one replica takes the slot over"
        taker = one if takers[0] else two
        assert await dead.renew("f", (100.0,), t + 5.2) == (100.0,)  # it lost the lease
        assert await taker.renew("f", (100.0,), t + 5.2) == ()
        assert await two.take_over("f", t + 9) == ()  # renewed at t + 5.2: not expired yet
        # A later claim on the key is won, and takes nothing over while the lease runs.
        assert await two.claim("f", 101.0, t + 9) == Claimed(True)
        await taker.done("f", (100.0,))
        # The next claim carries the done marker of the fire before it: one write for both.
        assert await two.claim("f", 102.0, t + 9.5, (101.0,)) == Claimed(True)
        record = await one.record("f")
        assert record is not None and set(record.pending) == {102}
        await two.done("f", (102.0,))
        record = await one.record("f")
        assert record is not None and record.last == 102 and record.pending == {}
        assert await one.take_over("f", t + 1000) == ()


async def test_a_claim_takes_over_expired_claims_of_its_key(nats_server: NatsServer) -> None:
    """The per-slot claim reads the key anyway: expired claims there are taken over with it."""
    async with replicas(store_config(nats_server, unique("cron"), lease=5.0), 2) as (dead, live):
        t = 2_000_000.0
        assert await dead.claim("g", 10.0, t) == Claimed(True)
        assert await dead.claim("g", 11.0, t + 1) == Claimed(True)
        assert await live.claim("g", 12.0, t + 5.5) == Claimed(True, (10.0,))  # 11's lease runs
        assert await live.claim("g", 13.0, t + 7) == Claimed(True, (11.0,))
        # Its own, never done: a replica that stalls past its leases takes them over like anyone's.
        assert await live.claim("g", 13.0, t + 100) == Claimed(False, (10.0, 11.0, 12.0, 13.0))


async def test_old_records_and_garbage_read_as_last_slot_without_claims(nats_server: NatsServer) -> None:
    assert SlotRecord.decode(b"1234") == SlotRecord(1234, {})
    assert SlotRecord.decode(b"{not json") == SlotRecord(-1, {})
    record = SlotRecord(7, {6: (12.5, "abc")})
    assert SlotRecord.decode(record.encode()) == record
    config = store_config(nats_server, unique("cron"))
    async with replicas(config, 1) as (store,):
        await store._kv.put("h", b"1234")  # written by the version before leases
        assert await store.last_fired("h") == 1234.0
        assert await store.claim("h", 1234.0, 0.0) == Claimed(False)
        assert (await store.claim("h", 1235.0, 0.0)).won


async def test_a_dead_replicas_claim_is_fired_once_by_the_running_source(
    nats_server: NatsServer,
    function_double: FunctionDouble,
) -> None:
    """A slot claimed by a replica that died before its call (no done marker, lease expired) is
    fired by a running source with that slot's own id, once, and then marked done."""
    config = store_config(nats_server, unique("cron"), lease=1.0)
    slot = float(int(time.time()) - 30)
    async with replicas(config, 1) as (dead,):
        assert (await dead.claim("tick", slot, time.time() - 20)).won  # long expired
    targets = [cron_target(function_double, "tick", "* * * * * *")]
    async with running(CronConfig(store=config), targets) as (source, _):
        dead_id = message_id("tick", slot)
        await wait_for(
            lambda: any(c.headers["X-Message-Id"] == dead_id for c in function_double.calls),
            10,
            what="take-over",
        )
        await wait_for(lambda: len(function_double.calls_to("/tick")) >= 3, 10, what="live fires after it")
        async with replicas(config, 1) as (observer,):

            async def nothing_pending_before_now() -> bool:
                record = await observer.record("tick")
                return record is not None and all(s > time.time() - 1 for s in record.pending)

            await wait_for(nothing_pending_before_now, 10, what="the taken-over slot marked done")
        assert source.taken_over == 1
    ids = Counter(c.headers["X-Message-Id"] for c in function_double.calls)
    assert ids[dead_id] == 1 and max(ids.values()) == 1


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


@pytest.mark.slow
async def test_kill_9_between_claim_and_done_loses_no_slot(
    nats_server: NatsServer,
    function_double: FunctionDouble,
    tmp_path: Path,
) -> None:
    """The function blocks, so the daemon holds claims whose calls never finish (and, just after
    a second starts, one it has claimed but not yet called) when it is killed with SIGKILL. The
    restarted daemon takes each of them over once its lease expired and fires it with the same
    id; no slot from the first fire to the end is missing, none fires more than that retry."""
    bucket = unique("cron")
    function_double.script("/tick", delay=15)  # does not answer while the first daemon lives
    # catch_up: the slots missed while no daemon ran are fired too, so every slot is accounted for.
    config = replica_config(function_double, nats_server, bucket, catch_up="all", max_catch_up=30)
    config["sources"][0]["store"]["lease"] = "2s"
    daemon = await DaemonProcess(config, tmp_path).start()
    try:
        await wait_for(lambda: len(function_double.calls_to("/tick")) >= 3, 15, what="three blocked calls")
        # Kill right after a slot's claim: 20 ms into the next second the claim is written (the
        # claim is one KV round trip) and the call may or may not have left.
        await wait_for(lambda: time.time() % 1 >= 0.02, 2, what="just after a slot")
    finally:
        daemon.kill()
    killed_at = time.time()
    first_calls = function_double.calls_to("/tick")
    called_by_first = {c.headers["X-Message-Id"] for c in first_calls}
    async with replicas(store_config(nats_server, bucket), 1) as (observer,):
        record = await observer.record("tick")
    assert record is not None
    claimed_by_first = {message_id("tick", float(s)) for s in record.pending}
    assert called_by_first <= claimed_by_first and len(claimed_by_first) >= 3, (called_by_first, record)
    function_double.script("/tick")  # answers at once from now on
    async with DaemonProcess(config, tmp_path) as second:
        await wait_for(
            lambda: (
                claimed_by_first
                <= {c.headers["X-Message-Id"] for c in function_double.calls_to("/tick")[len(first_calls) :]}
            ),
            20,
            what="the killed daemon's claims fired again",
        )
        await wait_for(
            lambda: max(map(slot_of, function_double.calls_to("/tick"))) > killed_at + 3, 10, what="live"
        )
        output = second.output()
    ids = Counter(c.headers["X-Message-Id"] for c in function_double.calls_to("/tick"))
    twice = {i for i, n in ids.items() if n == 2}
    assert max(ids.values()) <= 2 and twice <= called_by_first, ids  # only the interrupted calls again
    slots = sorted(set(map(slot_of, function_double.calls_to("/tick"))))
    assert slots == [slots[0] + k for k in range(len(slots))], "a slot was lost"
    assert "lease expired" in output


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
