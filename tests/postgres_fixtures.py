"""PostgreSQL fixtures: a throw-away cluster (:mod:`fastconn.testing_pg`) per session or per
test, the postgres source in process, and a function double lean enough for large runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.source import SourceContext
from fastconn.sources.postgres import PostgresConfig, create
from fastconn.testing import FunctionDouble, RecordedCall
from fastconn.testing_pg import Cluster

_NAMES = itertools.count()


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
