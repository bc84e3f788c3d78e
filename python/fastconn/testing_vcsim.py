"""govmomi's vCenter simulator for tests and benchmarks, and a pyvmomi driver that makes events.

The simulator is ``tests/vcsim/main.go`` (govmomi's ``simulator`` package, a VPX model, plain
HTTP) built with Debian's Go against Debian's ``golang-github-vmware-govmomi-dev`` sources, with
no network (GOPATH mode over ``/usr/share/gocode``). The binary is built once into a cache folder
keyed by the source's hash (``$FASTCONN_CACHE_DIR`` or ``~/.cache/fastconn``); ``scripts/setup.sh``
installs both packages when missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastconn.testing import ServerProcess, free_port

__all__ = ["Vcsim", "VcsimDriver", "driver", "vcsim_binary"]

_GOPATH = "/usr/share/gocode"
_SOURCE = Path(__file__).resolve().parents[2] / "tests" / "vcsim" / "main.go"


def _cache_dir() -> Path:
    root = os.environ.get("FASTCONN_CACHE_DIR") or str(Path.home() / ".cache" / "fastconn")
    return Path(root) / "vcsim"


def vcsim_binary() -> Path:
    """The simulator binary, built on first use (a minute or more on a small machine)."""
    if not _SOURCE.is_file():
        raise FileNotFoundError(f"the simulator's source is missing: {_SOURCE}")
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
    folder = _cache_dir() / digest
    binary = folder / "vcsim"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None or not (Path(_GOPATH) / "src/github.com/vmware/govmomi/simulator").is_dir():
        raise FileNotFoundError(
            "building vcsim needs Debian's golang-go and golang-github-vmware-govmomi-dev: run "
            "scripts/setup.sh"
        )
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several processes start at once
        if binary.is_file():
            return binary
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": _GOPATH,
            "GOFLAGS": "",
            "GOCACHE": str(_cache_dir() / "gocache"),
        }
        partial = folder / f"vcsim.{os.getpid()}.tmp"
        result = subprocess.run(
            [go, "build", "-o", str(partial), "."],
            cwd=_SOURCE.parent,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"go build of {_SOURCE} failed:\n{result.stdout}{result.stderr}")
        partial.replace(binary)
    return binary


class Vcsim(ServerProcess):
    """A running simulator on 127.0.0.1:``port``; ``restart()`` starts a fresh one (a new event
    store, keys from 1 again) on the same port; ``kill()`` is kill -9."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        username: str = "",
        password: str = "",
        *,
        tls: bool = False,
    ) -> None:
        self.workdir = workdir
        self.username = username
        self.password = password
        self.tls = tls
        port = port if port is not None else free_port()
        argv = [str(vcsim_binary()), "-l", f"127.0.0.1:{port}"]
        if username:
            argv += ["-username", username, "-password", password]
        if tls:
            argv.append("-tls")  # httptest's self-signed certificate
        self._argv = argv
        super().__init__("vcsim", argv, port, workdir / "vcsim.log")

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/sdk"

    def restart(self) -> None:
        self.stop()
        ServerProcess.__init__(self, "vcsim", self._argv, self.port, self.log_path)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class VcsimDriver:
    """A pyvmomi session that makes events: power, create, rename, destroy VMs (blocking)."""

    def __init__(self, url: str, username: str = "user", password: str = "pass") -> None:
        from urllib.parse import urlsplit

        from pyVim import connect

        parts = urlsplit(url)
        self.si: Any = connect.SmartConnect(
            protocol=parts.scheme,
            host=parts.hostname,
            port=parts.port,
            path=parts.path,
            user=username,
            pwd=password,
            # the simulator's -tls certificate is httptest's self-signed one: trusted knowingly
            disableSslCertValidation=parts.scheme == "https",
            # A simulator that stops answering (killed by a test, stalled on a loaded machine)
            # fails the call instead of blocking its thread, and the test run, forever.
            httpConnectionTimeout=30,
        )
        self.content: Any = self.si.RetrieveContent()

    def close(self) -> None:
        from pyVim import connect

        with contextlib.suppress(Exception):
            connect.Disconnect(self.si)

    def vms(self) -> dict[str, Any]:
        from pyVmomi import vim

        view = self.content.viewManager.CreateContainerView(
            self.content.rootFolder, [vim.VirtualMachine], True
        )
        try:
            return {vm.name: vm for vm in view.view}
        finally:
            view.Destroy()

    def vm(self, name: str) -> Any:
        return self.vms()[name]

    @staticmethod
    def _wait(task: Any) -> Any:
        from pyVim.task import WaitForTask

        WaitForTask(task)
        return task.info.result

    def power_off(self, name: str) -> None:
        self._wait(self.vm(name).PowerOffVM_Task())

    def power_on(self, name: str) -> None:
        self._wait(self.vm(name).PowerOnVM_Task())

    def rename(self, name: str, new_name: str) -> None:
        """Renames the VM. govmomi 0.24's simulator records no event for a rename, so the
        ``VmRenamedEvent`` vCenter would record is posted through ``EventManager.PostEvent`` (the
        API vCenter extensions use), with the VM, host and datacenter arguments vCenter sets."""
        from pyVmomi import vim

        vm = self.vm(name)
        self._wait(vm.Rename_Task(newName=new_name))
        host = vm.runtime.host
        datacenter = self._datacenter(vm)
        self.post_event(
            vim.event.VmRenamedEvent(
                oldName=name,
                newName=new_name,
                vm=vim.event.VmEventArgument(name=new_name, vm=vm),
                host=vim.event.HostEventArgument(name=host.name, host=host),
                datacenter=vim.event.DatacenterEventArgument(name=datacenter.name, datacenter=datacenter),
                fullFormattedMessage=f"Renamed {name} to {new_name} in {datacenter.name}",
            )
        )

    def post_event(self, event: Any) -> None:
        """``EventManager.PostEvent``: vCenter stamps the key, chain id and time."""
        from datetime import UTC, datetime

        event.key = 0
        event.chainId = 0
        event.createdTime = datetime.now(UTC)
        event.userName = event.userName or ""
        self.content.eventManager.PostEvent(eventToPost=event)

    @staticmethod
    def _datacenter(entity: Any) -> Any:
        from pyVmomi import vim

        while not isinstance(entity, vim.Datacenter):
            entity = entity.parent
        return entity

    def destroy(self, name: str) -> None:
        vm = self.vm(name)
        if vm.runtime.powerState == "poweredOn":
            self._wait(vm.PowerOffVM_Task())
        self._wait(vm.Destroy_Task())

    def create(self, name: str, like: str = "DC0_H0_VM0") -> None:
        """A new VM next to ``like`` (same folder, pool and host)."""
        from pyVmomi import vim

        template = self.vm(like)
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId="otherGuest",
            numCPUs=1,
            memoryMB=32,
            files=vim.vm.FileInfo(vmPathName=template.config.files.vmPathName.split("]")[0] + "]"),
        )
        self._wait(
            template.parent.CreateVM_Task(config=spec, pool=template.resourcePool, host=template.runtime.host)
        )

    def newest_key(self) -> int:
        """The newest event's key (any type): one ``QueryEvents`` of one event."""
        from pyVmomi import vim

        page = self.content.eventManager.QueryEvents(filter=vim.event.EventFilterSpec(maxCount=1)) or []
        return max((int(e.key) for e in page), default=0)


@contextlib.contextmanager
def driver(url: str, username: str = "user", password: str = "pass") -> Iterator[VcsimDriver]:
    session = VcsimDriver(url, username, password)
    try:
        yield session
    finally:
        session.close()
