"""The vcenter source against govmomi's simulator (real SOAP over HTTP, events made by pyvmomi
calls), with the daemon run as users run it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonFactory
from fastconn.testing import FunctionDouble, RecordedCall, free_port, wait_for
from fastconn.testing_vcsim import Vcsim, VcsimDriver
from gateway_double import FunctionSpec, GatewayDouble, async_daemon_config
from vcsim_fixtures import daemon_config, drive, vcenter_source, vcenter_source_at, vcsim  # noqa: F401


def _bodies(calls: list[RecordedCall]) -> list[dict[str, Any]]:
    return [json.loads(c.body) for c in calls]


def _by_key(calls: list[RecordedCall]) -> list[RecordedCall]:
    """Calls in event key order (events are dispatched concurrently: calls arrive in any order)."""
    return sorted(calls, key=lambda c: int(c.headers["X-Vcenter-Event-Key"]))


def _checkpoint(state: Path) -> dict[str, Any]:
    return dict(json.loads((state / "vcenter.checkpoint").read_text()))


def _post_ex(d: VcsimDriver, type_id: str, n: int) -> None:
    """``n`` EventEx events of ``type_id`` (the modern vCenter event shape)."""
    from pyVmomi import vim

    for i in range(n):
        d.post_event(vim.event.EventEx(eventTypeId=type_id, message=f"test {i}", severity="info"))


async def test_dotted_topics_body_and_headers(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    functions = {
        "power": ["vm.powered.off", "vm.powered.on"],
        "renamed": ["vm.renamed"],
        "lifecycle": ["vm.created", "vm.removed"],
    }
    await daemon_factory(daemon_config(function_double, functions, [vcenter_source(vcsim, tmp_path)]))
    instance = await drive(vcsim, lambda d: str(d.content.about.instanceUuid))

    def act(d: VcsimDriver) -> None:
        d.power_off("DC0_H0_VM0")
        d.power_on("DC0_H0_VM0")
        d.rename("DC0_H0_VM1", "renamed-vm")
        d.create("new-vm")
        d.destroy("new-vm")

    await drive(vcsim, act)
    await wait_for(lambda: len(function_double.calls_to("/power")) == 2, what="power off and on")
    await wait_for(lambda: len(function_double.calls_to("/renamed")) == 1, what="the rename")
    await wait_for(lambda: len(function_double.calls_to("/lifecycle")) == 2, what="create and destroy")

    power = _by_key(function_double.calls_to("/power"))
    assert [c.headers["X-Topic"] for c in power] == ["vm.powered.off", "vm.powered.on"]
    off = power[0]
    body = json.loads(off.body)
    assert body["class"] == "VmPoweredOffEvent"
    assert body["vm"] == {"name": "DC0_H0_VM0", "type": "VirtualMachine", "id": body["vm"]["id"]}
    assert body["vm"]["id"].startswith("vm-")
    assert body["host"]["name"] == "DC0_H0" and body["host"]["type"] == "HostSystem"
    assert body["datacenter"]["name"] == "DC0" and body["computeResource"]["type"] == "ComputeResource"
    assert body["userName"] == "user" and "powered off" in body["fullFormattedMessage"]
    assert body["createdTime"].endswith("Z")
    h = off.headers
    assert h["X-Message-Id"] == f"{instance}:{body['key']}"
    assert h["X-Vcenter-Event-Key"] == str(body["key"])
    assert h["X-Vcenter-Event-Class"] == "VmPoweredOffEvent"
    assert h["X-Vcenter-Chain-Id"] == str(body["chainId"])
    assert h["X-Vcenter-Host"] == "127.0.0.1"
    assert h["Content-Type"] == "application/json"
    assert "ce-specversion" not in h

    renamed = json.loads(function_double.calls_to("/renamed")[0].body)
    assert (renamed["oldName"], renamed["newName"]) == ("DC0_H0_VM1", "renamed-vm")
    assert renamed["vm"]["name"] == "renamed-vm"
    lifecycle = _by_key(function_double.calls_to("/lifecycle"))
    assert [c.headers["X-Topic"] for c in lifecycle] == ["vm.created", "vm.removed"]
    assert all(json.loads(c.body)["vm"]["name"] == "new-vm" for c in lifecycle)
    assert len(function_double.calls_to("/power")) == 2, "the created VM was never powered"


async def test_class_topics_event_type_filter_and_cloudevents(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    source = vcenter_source(
        vcsim,
        tmp_path,
        topic_style="class",
        # vCenter also matches an EventEx's eventTypeId here; govmomi 0.24's simulator only
        # matches class names, so the test lists the class.
        event_types=["VmPoweredOffEvent", "EventEx"],
        cloudevents=True,
    )
    functions = {"off": ["VmPoweredOffEvent"], "on": ["VmPoweredOnEvent"], "backup": ["com.example.*.done"]}
    await daemon_factory(daemon_config(function_double, functions, [source]))

    def act(d: VcsimDriver) -> None:
        d.power_off("DC0_H0_VM0")
        d.power_on("DC0_H0_VM0")
        _post_ex(d, "com.example.backup.done", 1)
        _post_ex(d, "com.example.backup.started", 1)  # no subscriber

    await drive(vcsim, act)
    await wait_for(lambda: function_double.calls_to("/off"), what="the power-off")
    await wait_for(lambda: function_double.calls_to("/backup"), what="the EventEx")
    # The power-on was filtered out by vCenter: once a later event (a second power-off) is
    # through, it cannot be in flight any more.
    await drive(vcsim, lambda d: d.power_off("DC0_H0_VM0"))
    await wait_for(lambda: len(function_double.calls_to("/off")) == 2, what="the second power-off")
    assert function_double.calls_to("/on") == []
    backup = function_double.calls_to("/backup")
    assert [c.headers["X-Topic"] for c in backup] == ["com.example.backup.done"]
    assert json.loads(backup[0].body)["eventTypeId"] == "com.example.backup.done"

    h = function_double.calls_to("/off")[0].headers
    assert h["X-Topic"] == "VmPoweredOffEvent"
    assert h["ce-specversion"] == "1.0"
    assert h["ce-type"] == "com.vmware.event.router/event"
    assert h["ce-subject"] == "VmPoweredOffEvent"
    assert h["ce-id"] == h["X-Message-Id"]
    assert h["ce-source"] == vcsim.url
    assert h["ce-time"] == json.loads(function_double.calls_to("/off")[0].body)["createdTime"]


async def test_bad_credentials_fail_at_start_with_the_fix(
    tmp_path_factory: pytest.TempPathFactory,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
) -> None:
    sim = Vcsim(tmp_path_factory.mktemp("vcsim"), username="admin", password="right")
    try:
        source = vcenter_source(sim, tmp_path, password="wrong")
        daemon = await daemon_factory(daemon_config(function_double, {"f": ["vm.*"]}, [source]), wait=None)
        assert daemon.process is not None
        code = await asyncio.to_thread(daemon.process.wait, 30)
        out = daemon.output()
        assert code != 0
        assert "refused the login of 'admin' (InvalidLogin)" in out, out
        assert "check username/password (or username_file/password_file)" in out
        assert "Traceback" not in out
        assert "wrong" not in out, "the password must not be logged"
    finally:
        sim.stop()


async def test_simulator_restart_logs_in_again_and_resumes(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """A restarted vCenter ends the session (NotAuthenticated / connection refused): the source
    logs in again; the simulator also restarts its event keys, which must not make the source
    skip the new events as already seen."""
    source = vcenter_source(vcsim, tmp_path, event_types=["VmPoweredOffEvent", "VmPoweredOnEvent"])
    daemon = await daemon_factory(daemon_config(function_double, {"power": ["vm.powered.*"]}, [source]))
    for _ in range(3):
        await drive(vcsim, lambda d: (d.power_off("DC0_H0_VM0"), d.power_on("DC0_H0_VM0")))
    await wait_for(lambda: len(function_double.calls_to("/power")) == 6, what="six power events")
    await asyncio.to_thread(vcsim.restart)

    async def ready() -> bool:
        import aiohttp

        async with aiohttp.ClientSession() as http, http.get(daemon.url + "/readyz") as r:
            return r.status == 200

    await drive(vcsim, lambda d: d.power_off("DC0_C0_RP0_VM0"))
    await wait_for(
        lambda: any(
            json.loads(c.body)["vm"]["name"] == "DC0_C0_RP0_VM0" for c in function_double.calls_to("/power")
        ),
        timeout=20,
        what="the power-off made after the restart",
    )
    await wait_for(ready, what="ready again")
    out = daemon.output()
    assert "logging in again" in out
    assert "event keys restarted" in out
    # The new simulator's model powered its VMs on at start (after the last event read): those
    # are new events too and were delivered, not skipped.
    after = [json.loads(c.body) for c in function_double.calls_to("/power")[6:]]
    assert any(b["class"] == "VmPoweredOnEvent" for b in after)


async def test_final_failure_is_dead_lettered_with_context(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    letters = tmp_path / "dead.jsonl"
    source = vcenter_source(
        vcsim, tmp_path, event_types=["VmPoweredOffEvent"], dead_letter={"type": "file", "path": str(letters)}
    )
    function_double.script("/off", [422])
    daemon = await daemon_factory(daemon_config(function_double, {"off": ["vm.powered.off"]}, [source]))
    await drive(vcsim, lambda d: d.power_off("DC0_H0_VM0"))
    await wait_for(lambda: letters.exists() and letters.read_text().strip(), what="the dead letter")
    letter = json.loads(letters.read_text().splitlines()[0])
    headers = dict(letter["headers"])
    event = json.loads(letter["payload"])
    assert event["class"] == "VmPoweredOffEvent" and event["vm"]["name"] == "DC0_H0_VM0"
    assert headers["fastconn-dlt-function"] == "off"
    assert headers["fastconn-dlt-status"] == "422"
    assert headers["fastconn-dlt-reason"] == "failed"
    assert headers["fastconn-dlt-original-event-key"] == str(event["key"])
    assert headers["fastconn-dlt-original-topic"] == "vm.powered.off"
    assert headers["fastconn-dlt-message-id"].endswith(f":{event['key']}")
    # Dead-lettered counts as settled: the checkpoint moves past it.
    await wait_for(lambda: _checkpoint(tmp_path)["key"] >= event["key"], what="checkpoint past the letter")
    assert len(function_double.calls_to("/off")) == 1
    assert "dead-lettered" in daemon.output()


async def test_failure_without_dead_letter_holds_the_checkpoint_until_delivered(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    source = vcenter_source(vcsim, tmp_path, event_types=["VmPoweredOffEvent", "VmPoweredOnEvent"])
    function_double.script("/off", [422, 422, 422, 200])  # final failures, then accepted
    config = daemon_config(function_double, {"off": ["vm.powered.off"], "on": ["vm.powered.on"]}, [source])
    await daemon_factory(config)
    start = _checkpoint(tmp_path)["key"]
    await drive(vcsim, lambda d: (d.power_off("DC0_H0_VM0"), d.power_on("DC0_H0_VM0")))
    await wait_for(lambda: function_double.calls_to("/on"), what="the power-on (after the failing event)")
    await wait_for(lambda: len(function_double.calls_to("/off")) >= 2, what="a retry of the failing event")
    # The power-on settled, the power-off before it did not: the checkpoint stays below both.
    assert _checkpoint(tmp_path)["key"] == start
    await wait_for(lambda: len(function_double.calls_to("/off")) == 4, timeout=15, what="the 4th attempt")
    on_key = int(function_double.calls_to("/on")[0].headers["X-Vcenter-Event-Key"])
    await wait_for(lambda: _checkpoint(tmp_path)["key"] >= on_key, what="checkpoint past both")
    offs = function_double.calls_to("/off")
    assert len({c.headers["X-Message-Id"] for c in offs}) == 1, "one event, sent again with the same id"
    assert [c.headers["X-Delivery-Attempt"] for c in offs][-1] != "1"


async def test_async_invocation_moves_the_checkpoint_only_after_a_good_callback(
    vcsim: Vcsim, gateway: GatewayDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """The checkpoint holds while the callback is awaited and after a failed one (503, one
    attempt: the source sends the event again), and passes the event after the good callback."""
    gateway.set_functions([FunctionSpec("off", topic="vm.powered.off")])
    gateway.script("off", statuses=[503, 200], callback_delay=[1.0, 1.0])
    source = vcenter_source(vcsim, tmp_path, event_types=["VmPoweredOffEvent"])
    await daemon_factory(async_daemon_config(gateway, source, max_attempts=1))
    start = _checkpoint(tmp_path)["key"]
    await drive(vcsim, lambda d: (d.power_off("DC0_H0_VM0"), d.power_on("DC0_H0_VM0")))
    await wait_for(lambda: gateway.calls("off") == 1, what="the async call")
    assert _checkpoint(tmp_path)["key"] == start, "the checkpoint moved before the callback"
    await wait_for(lambda: gateway.calls("off") == 2, what="the event sent again after the failed callback")
    await wait_for(lambda: gateway.callbacks, what="the failed callback recorded")
    assert gateway.callbacks[0].function_status == 503
    assert _checkpoint(tmp_path)["key"] == start, "the checkpoint moved past a failed callback"
    [first, second] = gateway.requests_for("off")
    key = int(first.headers["X-Vcenter-Event-Key"])
    await wait_for(lambda: _checkpoint(tmp_path)["key"] >= key, what="the checkpoint past the event")
    # The double records a callback once its answer is read: after the daemon acted on it.
    await wait_for(lambda: len(gateway.callbacks) == 2, what="both callbacks recorded")
    assert [c.function_status for c in gateway.callbacks] == [503, 200]
    assert first.path == second.path == "/async-function/off.openfaas-fn"
    assert first.headers["X-Message-Id"] == second.headers["X-Message-Id"]
    assert second.headers["X-Delivery-Attempt"] == "2"


async def test_restart_resumes_after_the_checkpoint_and_begin_now_skips(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    source = vcenter_source(vcsim, tmp_path, event_types=["VmPoweredOffEvent", "VmPoweredOnEvent"])
    config = daemon_config(function_double, {"power": ["vm.powered.*"]}, [source])
    first = await daemon_factory(config)
    await drive(vcsim, lambda d: d.power_off("DC0_H0_VM0"))
    await wait_for(lambda: len(function_double.calls_to("/power")) == 1, what="the first event")
    assert await first.stop() == 0
    # Made while fastconn is down:
    await drive(vcsim, lambda d: (d.power_on("DC0_H0_VM0"), d.power_off("DC0_H0_VM1")))
    second = await daemon_factory(config)
    await wait_for(lambda: len(function_double.calls_to("/power")) == 3, what="the two missed events")
    names = [(b["class"], b["vm"]["name"]) for b in _bodies(_by_key(function_double.calls_to("/power")))]
    assert names[1:] == [("VmPoweredOnEvent", "DC0_H0_VM0"), ("VmPoweredOffEvent", "DC0_H0_VM1")]
    assert await second.stop() == 0

    # begin = "now" ignores the checkpoint: what happened while down is not delivered.
    await drive(vcsim, lambda d: d.power_on("DC0_H0_VM1"))
    now = daemon_config(function_double, {"power": ["vm.powered.*"]}, [{**source, "begin": "now"}])
    await daemon_factory(now)
    await drive(vcsim, lambda d: d.power_off("DC0_C0_RP0_VM0"))
    await wait_for(lambda: len(function_double.calls_to("/power")) >= 4, what="the live event")
    last = function_double.calls_to("/power")[-1]
    live_key = int(last.headers["X-Vcenter-Event-Key"])
    await wait_for(lambda: _checkpoint(tmp_path)["key"] >= live_key, what="everything up to it settled")
    names = [(b["class"], b["vm"]["name"]) for b in _bodies(function_double.calls_to("/power"))]
    assert names[3:] == [("VmPoweredOffEvent", "DC0_C0_RP0_VM0")]


async def test_burst_bigger_than_the_page_is_caught_up(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """More events between two polls than the collector's page holds: the catch-up collector
    reads them all; none skipped, none twice."""
    source = vcenter_source(vcsim, tmp_path, event_types=["EventEx"], page_size=5, poll_interval="2s")
    await daemon_factory(daemon_config(function_double, {"burst": ["com.example.burst"]}, [source]))
    await drive(vcsim, lambda d: _post_ex(d, "com.example.burst", 40))
    await wait_for(lambda: len(function_double.calls_to("/burst")) >= 40, timeout=20, what="40 events")
    counts = Counter(c.headers["X-Vcenter-Event-Key"] for c in function_double.calls_to("/burst"))
    assert len(counts) == 40 and set(counts.values()) == {1}
    messages = sorted(json.loads(c.body)["message"] for c in function_double.calls_to("/burst"))
    assert messages == sorted(f"test {i}" for i in range(40))


@pytest.mark.slow
async def test_kill_9_mid_stream_loses_no_event(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """kill -9 of the daemon while events stream in and calls are in flight, then a restart:
    every event reaches the function once or more, none is skipped (counted per event key), and
    what had settled before the kill is not sent again."""
    source = vcenter_source(vcsim, tmp_path, event_types=["EventEx"])
    function_double.script("/stream", [200], delay=0.05)  # calls in flight at the kill
    config = daemon_config(function_double, {"stream": ["com.example.stream"]}, [source])
    daemon = await daemon_factory(config)
    total = 600  # the simulator keeps its newest 1000 events
    done = threading.Event()

    def produce(d: VcsimDriver) -> None:
        try:
            _post_ex(d, "com.example.stream", total)
        finally:
            done.set()

    producer = asyncio.create_task(drive(vcsim, produce))
    start_key = _checkpoint(tmp_path)["key"]
    # Kill once the checkpoint moved (the restart must resume after it, not from the start)
    # while the stream still runs and calls are in flight.
    await wait_for(lambda: _checkpoint(tmp_path)["key"] > start_key + 10, timeout=30, what="checkpoint moved")
    daemon.kill()
    at_kill = _checkpoint(tmp_path)["key"]
    killed_at = len(function_double.calls_to("/stream"))
    assert not done.is_set(), "the stream should still be running at the kill (make it longer)"
    await producer
    await daemon_factory(config)
    await wait_for(
        lambda: len({c.headers["X-Vcenter-Event-Key"] for c in function_double.calls_to("/stream")}) == total,
        timeout=60,
        what=f"all {total} events",
    )
    calls = function_double.calls_to("/stream")
    counts = Counter(json.loads(c.body)["message"] for c in calls)
    assert set(counts) == {f"test {i}" for i in range(total)}, "an event was skipped"
    per_key = Counter(int(c.headers["X-Vcenter-Event-Key"]) for c in calls)
    assert all(n == 1 for k, n in per_key.items() if k <= at_kill), "settled before the kill: not resent"
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\nvcenter kill -9 after {killed_at} calls (checkpoint at key {at_kill}): lost 0 of {total}, "
        f"delivered twice: {duplicates}"
    )


async def test_ended_session_logs_in_again_without_losing_events(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    """An administrator ends fastconn's session (as an expiry would): the next call fails
    (vCenter says NotAuthenticated; the simulator that the session's collector is gone), the
    source logs in again and reads on from its cursor: the event made meanwhile arrives."""
    source = vcenter_source(vcsim, tmp_path, event_types=["VmPoweredOffEvent", "VmPoweredOnEvent"])
    daemon = await daemon_factory(daemon_config(function_double, {"power": ["vm.powered.*"]}, [source]))
    await drive(vcsim, lambda d: d.power_off("DC0_H0_VM0"))
    await wait_for(lambda: len(function_double.calls_to("/power")) == 1, what="the first event")

    def end_fastconns_session(d: VcsimDriver) -> int:
        manager = d.content.sessionManager
        mine = manager.currentSession.key
        others = [s.key for s in manager.sessionList if s.key != mine]
        manager.TerminateSession(sessionId=others)
        d.power_on("DC0_H0_VM0")  # made while fastconn has no session
        return len(others)

    assert await drive(vcsim, end_fastconns_session) >= 1
    await drive(vcsim, lambda d: d.power_off("DC0_H0_VM1"))
    await wait_for(lambda: len(function_double.calls_to("/power")) == 3, what="both later events")
    names = [(b["class"], b["vm"]["name"]) for b in _bodies(_by_key(function_double.calls_to("/power")))]
    assert names[1:] == [("VmPoweredOnEvent", "DC0_H0_VM0"), ("VmPoweredOffEvent", "DC0_H0_VM1")]
    out = daemon.output()
    assert "lost vCenter" in out and "logging in again" in out
    assert "event keys restarted" not in out


async def test_tls_untrusted_certificate_fails_clearly_and_insecure_connects(
    tmp_path_factory: pytest.TempPathFactory,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
) -> None:
    sim = Vcsim(tmp_path_factory.mktemp("vcsim"), tls=True)
    try:
        config = daemon_config(function_double, {"f": ["vm.powered.off"]}, [vcenter_source(sim, tmp_path)])
        daemon = await daemon_factory(config, wait=None)
        assert daemon.process is not None
        code = await asyncio.to_thread(daemon.process.wait, 30)
        out = daemon.output()
        assert code != 0
        assert "presented a certificate that is not trusted" in out, out
        assert "set tls_ca to the PEM file of the CA" in out and "Traceback" not in out

        source = vcenter_source(sim, tmp_path, insecure=True, event_types=["VmPoweredOffEvent"])
        await daemon_factory(daemon_config(function_double, {"f": ["vm.powered.off"]}, [source]))
        await drive(sim, lambda d: d.power_off("DC0_H0_VM0"))
        await wait_for(lambda: function_double.calls_to("/f"), what="the power-off over https")
    finally:
        sim.stop()


async def test_vcenter_down_at_start_is_waited_for(
    tmp_path_factory: pytest.TempPathFactory,
    function_double: FunctionDouble,
    daemon_factory: DaemonFactory,
    tmp_path: Path,
) -> None:
    """Unreachable at start is not a configuration error: the daemon runs, reports the outage
    once, and connects when vCenter comes up."""
    port = free_port()
    source = {
        **vcenter_source_at(f"http://127.0.0.1:{port}/sdk", tmp_path),
        "event_types": ["VmPoweredOffEvent"],
    }
    daemon = await daemon_factory(daemon_config(function_double, {"f": ["vm.powered.off"]}, [source]))
    await wait_for(lambda: "unreachable since" in daemon.output(), what="the outage in the log")
    sim = await asyncio.to_thread(Vcsim, tmp_path_factory.mktemp("vcsim"), port)
    try:
        await wait_for(lambda: "reachable again" in daemon.output(), timeout=20, what="the connection")
        await drive(sim, lambda d: d.power_off("DC0_H0_VM0"))
        await wait_for(lambda: function_double.calls_to("/f"), what="the power-off")
        assert daemon.output().count("unreachable since") == 1, "the outage is logged once"
    finally:
        sim.stop()
