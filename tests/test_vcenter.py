"""The vcenter source against govmomi's simulator (real SOAP over HTTP, events made by pyvmomi
calls), with the daemon run as users run it."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import DaemonFactory
from fastconn.testing import FunctionDouble, wait_for
from fastconn.testing_vcsim import Vcsim
from vcsim_fixtures import daemon_config, drive, vcenter_source, vcsim  # noqa: F401


async def test_dotted_topics_body_and_headers(
    vcsim: Vcsim, function_double: FunctionDouble, daemon_factory: DaemonFactory, tmp_path: Path
) -> None:
    functions = {"power": ["vm.powered.off", "vm.powered.on"], "renamed": ["vm.renamed"]}
    config = daemon_config(function_double, functions, [vcenter_source(vcsim, tmp_path)])
    await daemon_factory(config)
    instance = await drive(vcsim, lambda d: d.content.about.instanceUuid)

    def act(d: object) -> None:
        d.power_off("DC0_H0_VM0")  # type: ignore[attr-defined]
        d.power_on("DC0_H0_VM0")  # type: ignore[attr-defined]
        d.rename("DC0_H0_VM1", "renamed-vm")  # type: ignore[attr-defined]

    await drive(vcsim, act)
    await wait_for(lambda: len(function_double.calls_to("/power")) == 2, what="power off and on")
    await wait_for(lambda: len(function_double.calls_to("/renamed")) == 1, what="the rename")
    off, on = function_double.calls_to("/power")
    assert off.headers["X-Topic"] == "vm.powered.off"
    assert on.headers["X-Topic"] == "vm.powered.on"
    body = json.loads(off.body)
    print(json.dumps(body, indent=1), dict(off.headers))
    assert body["class"] == "VmPoweredOffEvent"
    assert body["vm"]["name"] == "DC0_H0_VM0"
    assert off.headers["X-Message-Id"] == f"{instance}:{body['key']}"
