"""The vcenter source's pure parts: topics, event JSON, configuration errors, the checkpoint
watermark and the key-restart check (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim

from fastconn.config import validate_config
from fastconn.errors import ConfigError, SourceError
from fastconn.sources.vcenter.client import keys_restarted
from fastconn.sources.vcenter.config import VcenterConfig
from fastconn.sources.vcenter.events import dotted_topic, event_json, topic_of
from fastconn.sources.vcenter.progress import Cursor, Progress

BASE: dict[str, Any] = {
    "type": "vcenter",
    "url": "https://vc.example.com/sdk",
    "username": "u",
    "password": "p",
}


@pytest.mark.parametrize(
    ("name", "topic"),
    [
        # the vcenter-connector's own test table (pkg/events/events_test.go)
        ("VmPoweredOnEvent", "vm.powered.on"),
        ("VmPoweredOffEvent", "vm.powered.off"),
        ("VmCreatedEvent", "vm.created"),
        ("VmRemovedEvent", "vm.removed"),
        ("VmRenamedEvent", "vm.renamed"),
        ("EnteredMaintenanceModeEvent", "entered.maintenance.mode"),
        ("DrsVmPoweredOnEvent", "drs.vm.powered.on"),
        ("HostCnxFailedEvent", "host.cnx.failed"),
        ("DVPortgroupCreatedEvent", "dv.portgroup.created"),
        ("ExtendedEvent", "extended"),
    ],
)
def test_dotted_topic_follows_the_vcenter_connector(name: str, topic: str) -> None:
    assert dotted_topic(name) == topic


def _event(cls: Any, key: int = 7, when: datetime | None = None, **fields: Any) -> Any:
    return cls(
        key=key,
        chainId=key,
        createdTime=when or datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        userName="u",
        **fields,
    )


def test_topics_of_both_styles_and_of_eventex() -> None:
    on = _event(vim.event.VmPoweredOnEvent)
    assert (topic_of(on, "dotted"), topic_of(on, "class")) == ("vm.powered.on", "VmPoweredOnEvent")
    ex = _event(vim.event.EventEx, eventTypeId="com.vmware.vc.HA.ClusterFailoverActionCompletedEvent")
    # Not "ex": every EventEx would share one topic.
    assert (
        topic_of(ex, "dotted")
        == topic_of(ex, "class")
        == "com.vmware.vc.HA.ClusterFailoverActionCompletedEvent"
    )


def test_event_json_has_base_fields_arguments_and_own_fields() -> None:
    vm = vim.VirtualMachine("vm-42")
    event = _event(
        vim.event.VmRenamedEvent,
        oldName="a",
        newName="b",
        fullFormattedMessage="Renamed a to b",
        vm=vim.event.VmEventArgument(name="b", vm=vm),
        host=vim.event.HostEventArgument(name="esx1", host=vim.HostSystem("host-1")),
    )
    body = event_json(event)
    assert body["class"] == "VmRenamedEvent"
    assert (body["key"], body["chainId"], body["userName"]) == (7, 7, "u")
    assert body["createdTime"] == "2026-01-02T03:04:05Z"
    assert body["vm"] == {"name": "b", "type": "VirtualMachine", "id": "vm-42"}
    assert body["host"] == {"name": "esx1", "type": "HostSystem", "id": "host-1"}
    assert (body["oldName"], body["newName"]) == ("a", "b")
    assert "datacenter" not in body


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"password": None}, "password (or password_file) is required"),
        ({"password_file": "/x"}, "set either password or password_file, not both"),
        ({"url": "ftp://vc/sdk"}, "url must be http(s)://<vcenter host>[:port]/sdk"),
        ({"url": "https://admin:pw@vc/sdk"}, "put credentials in username/password"),
        ({"insecure": True, "tls_ca": "/ca.pem"}, "insecure = true skips the certificate check"),
        ({"event_types": ["Vm Powered"]}, "are not event class names"),
        ({"page_size": 5000}, "less than or equal to 1000"),
        ({"topic_style": "snake"}, "'dotted' or 'class'"),
        ({"begin": "oldest"}, "'checkpoint' or 'now'"),
        ({"checkpoint": {"type": "redis"}}, "checkpoint.type must be one of"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(change: dict[str, Any], expected: str) -> None:
    table = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        validate_config({"sources": [table]})
    text = str(info.value)
    assert "sources[0]" in text and expected in text, text
    assert "pw@" not in text


def test_credentials_from_files(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("admin\n")
    (tmp_path / "pass").write_text("s3cret\n")
    config = VcenterConfig.model_validate(
        {
            **BASE,
            "username": None,
            "password": None,
            "username_file": str(tmp_path / "user"),
            "password_file": str(tmp_path / "pass"),
        }
    )
    assert config.credentials() == ("admin", "s3cret")
    (tmp_path / "pass").write_text("")
    with pytest.raises(SourceError, match=r"source vcenter: password file .* is empty"):
        config.credentials()
    assert "s3cret" not in repr(VcenterConfig.model_validate(BASE | {"password": "s3cret"}))


def test_endpoint_defaults() -> None:
    assert VcenterConfig.model_validate(BASE).endpoint.port == 443
    sim = VcenterConfig.model_validate(BASE | {"url": "http://127.0.0.1:8989/sdk"}).endpoint
    assert (sim.protocol, sim.host, sim.port, sim.path) == ("http", "127.0.0.1", 8989, "/sdk")


def test_checkpoint_moves_only_over_settled_events() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    progress = Progress(Cursor("vc", 10, t0))
    for key in (12, 15, 20):
        progress.track(key, t0 + timedelta(seconds=key))
    assert not progress.settle(15)  # 12 is still in flight
    assert progress.checkpoint.key == 10
    assert progress.settle(12)
    assert progress.checkpoint == Cursor("vc", 15, t0 + timedelta(seconds=15))
    assert progress.outstanding == 1
    assert progress.settle(20) and progress.checkpoint.key == 20
    assert not progress.settle(20), "a second completion changes nothing"


def test_cursor_round_trip_and_a_bad_checkpoint() -> None:
    cursor = Cursor("dbed6e0c", 42, datetime(2026, 1, 1, 12, tzinfo=UTC))
    assert Cursor.decode(cursor.encode(), "x") == cursor
    with pytest.raises(SourceError, match=r"is not a vcenter checkpoint.*remove it"):
        Cursor.decode('{"offset": 3}', "source vc")


def test_key_restart_is_a_known_key_with_a_newer_time() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    seen = [_event(vim.event.VmPoweredOnEvent, key=5, when=t0 - timedelta(minutes=1))]
    assert not keys_restarted(seen, 9, t0)
    reused = [_event(vim.event.VmPoweredOnEvent, key=5, when=t0 + timedelta(minutes=1))]
    assert keys_restarted(reused, 9, t0)
    assert not keys_restarted(reused, 9, None)
