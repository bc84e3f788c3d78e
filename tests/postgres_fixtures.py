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

from fastconn.dispatcher import DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.sources.postgres import PostgresConfig, create
from fastconn.testing import FunctionDouble, RecordedCall, SourceHarness
from fastconn.testing import running_source as run_in_process
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


Harness = SourceHarness


@contextlib.asynccontextmanager
async def running_source(
    config: Mapping[str, Any], functions: Sequence[FunctionTarget], options: DispatchOptions | None = None
) -> AsyncIterator[Harness]:
    """One postgres source in process (:func:`fastconn.testing.running_source`)."""
    source = create(PostgresConfig.model_validate(dict(config)))
    async with run_in_process(source, functions, options) as harness:
        yield harness


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
