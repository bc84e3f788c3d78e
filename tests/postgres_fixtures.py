"""A throw-away PostgreSQL cluster for tests and benchmarks: Debian's initdb/pg_ctl (run as the
``postgres`` user: they refuse root) in a temp folder, ``wal_level = logical``, trust auth, on a
free port of 127.0.0.1 with its unix socket in that folder. The machine's own server is left
alone."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.source import SourceContext
from fastconn.sources.postgres import PostgresConfig, create
from fastconn.testing import FunctionDouble, RecordedCall, free_port

_NAMES = itertools.count()


def pg_bindir() -> Path:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for path in candidates:
        if (path / "initdb").exists():
            return path
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: run scripts/setup.sh")


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


class Cluster:
    def __init__(self, *, wal_level: str = "logical") -> None:
        self.bindir = pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="fastconn-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )
        settings = {
            "wal_level": wal_level,
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "max_replication_slots": "20",
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "50",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str) -> None:
        result = subprocess.run(_as_postgres(*argv), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}\n{log}")

    def _ctl(self, *args: str) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._ctl("stop", "-m", "immediate")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def connect(self) -> Any:
        return await asyncpg.connect(self.dsn)

    async def execute(self, sql: str, *args: Any) -> Any:
        conn = await self.connect()
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        conn = await self.connect()
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def confirmed(self, slot: str) -> int | None:
        """The slot's confirmed_flush_lsn as an int (None: no slot)."""
        rows = await self.fetch(
            "SELECT (confirmed_flush_lsn - '0/0')::bigint AS lsn FROM pg_replication_slots "
            "WHERE slot_name = $1",
            slot,
        )
        return int(rows[0]["lsn"]) if rows else None


def unique(prefix: str) -> str:
    """A fresh lower-case name for a table, slot or publication."""
    return f"{prefix}_{os.getpid()}_{next(_NAMES)}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def own_pg_cluster() -> Iterator[Cluster]:
    """A cluster of the test's own (for tests that restart the server)."""
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@contextlib.asynccontextmanager
async def connection(cluster: Cluster) -> AsyncIterator[Any]:
    conn = await cluster.connect()
    try:
        yield conn
    finally:
        await conn.close()


# -- the source in process ------------------------------------------------------------------------


@dataclass
class Harness:
    source: Any
    ctx: SourceContext
    dispatcher: Dispatcher
    metrics: Metrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)


@contextlib.asynccontextmanager
async def running_source(
    config: Mapping[str, Any], functions: Sequence[FunctionTarget], options: DispatchOptions | None = None
) -> AsyncIterator[Harness]:
    """One postgres source wired to a real dispatcher as the daemon does it, shut down in the
    daemon's order (stop intake, drain the dispatcher, close the source)."""
    dispatcher = Dispatcher(
        options or DispatchOptions(max_attempts=2, backoff_initial=0.01, backoff_max=0.05, timeout=10.0)
    )
    await dispatcher.start()
    metrics = Metrics()
    metrics.bind_core(dispatcher.stats, lambda: dispatcher.inflight, lambda: dispatcher.queued)

    async def ready(_seconds: float) -> bool:
        return True

    ctx = SourceContext(dispatcher=dispatcher, metrics=metrics, app=web.Application(), wait_ready=ready)
    source = create(PostgresConfig.model_validate(dict(config)))
    harness = Harness(source, ctx, dispatcher, metrics)
    dispatcher.set_functions(functions)
    ctx.publish_topics(tuple(sorted({t for f in functions for t in f.topics})))
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


@dataclass
class ChangeFunction(FunctionDouble):
    """Answers 200 (after ``delay``) and records the call. FunctionDouble's per-path scripting
    scans every earlier call per request: too slow for tens of thousands of changes."""

    delay: float = 0.0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        self.calls.append(RecordedCall(request.path, headers, body, time.monotonic(), 200))
        return web.Response(status=200)
