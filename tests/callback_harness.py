"""The async-callback tests' set-up: a dispatcher with callbacks enabled against the gateway
double, its callback endpoint served either by Python's aiohttp routes (``harness_factory``) or
by the ingress server in the core (``core_harness``). Import the fixture a test module uses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from fastconn import Dispatcher, DispatchOptions, FunctionTarget, Outcome
from fastconn.callbacks import CallbackMetrics, Callbacks, CallbackSettings
from fastconn.ingress import Ingress
from fastconn.testing import free_port
from gateway_double import FunctionSpec, GatewayDouble


@dataclass
class Harness:
    gateway: GatewayDouble
    dispatcher: Dispatcher
    callbacks: Callbacks
    public_url: str
    outcomes: list[Outcome] = field(default_factory=list)
    observed: list[Outcome] = field(default_factory=list)
    deployed: list[FunctionSpec] = field(default_factory=list)

    def collect(self, batch: list[Outcome]) -> None:
        self.outcomes.extend(batch)

    def target(self, name: str, topic: str, *, asynchronous: bool = True) -> FunctionTarget:
        """A function deployed on the gateway double, and its target as the registry builds it."""
        self.deployed.append(FunctionSpec(name))
        self.gateway.set_functions(self.deployed)
        return FunctionTarget(
            name,
            (topic,),
            f"{self.gateway.url}/function/{name}",
            async_url=f"{self.gateway.url}/async-function/{name}",
            asynchronous=asynchronous,
        )

    def url_for(self, call_id: str) -> str:
        return f"{self.public_url}/callback/{self.callbacks.token(call_id)}"

    def rejected(self) -> dict[str, float]:
        return {
            s.labels["reason"]: s.value
            for m in self.callbacks.metrics.rejected.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }


def _dispatcher(
    public_url: str, max_inflight: int, settings: dict[str, object]
) -> tuple[Dispatcher, Callbacks]:
    """A dispatcher (not started) with callbacks to ``public_url``: short timeouts and backoffs,
    three attempts, unless ``settings`` (``CallbackSettings`` keys) say otherwise."""
    dispatcher = Dispatcher(
        DispatchOptions(max_inflight=max_inflight, backoff_initial=0.01, backoff_max=0.1, max_attempts=3)
    )
    defaults: dict[str, object] = {
        "public_url": public_url,
        "timeout": 5.0,
        "max_attempts": 3,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
    }
    callbacks = dispatcher.enable_callbacks(
        CallbackSettings(**{**defaults, **settings}),  # type: ignore[arg-type]
        CallbackMetrics(),
    )
    return dispatcher, callbacks


@pytest.fixture
async def harness_factory(gateway: GatewayDouble) -> AsyncIterator[Callable[..., object]]:
    """Callbacks answered by Python's aiohttp routes; ``observed`` gets what the response hook sees."""
    started: list[tuple[Dispatcher, web.AppRunner]] = []

    async def make(**settings: object) -> Harness:
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        dispatcher, callbacks = _dispatcher(public_url, 16, settings)
        app = web.Application()
        callbacks.register_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await dispatcher.start()
        started.append((dispatcher, runner))
        h = Harness(gateway, dispatcher, callbacks, public_url)
        dispatcher.add_observer(h.observed.extend)
        return h

    yield make
    for dispatcher, runner in started:
        await dispatcher.close(5)
        await runner.cleanup()


@pytest.fixture
async def core_harness(gateway: GatewayDouble) -> AsyncIterator[Callable[..., object]]:
    """Callbacks answered by the ingress server in the core."""
    started: list[tuple[Dispatcher, Ingress]] = []

    async def make(**settings: object) -> Harness:
        port = free_port()
        public_url = f"http://127.0.0.1:{port}"
        dispatcher, callbacks = _dispatcher(public_url, 64, settings)
        await dispatcher.start()
        ingress = Ingress(dispatcher, f"127.0.0.1:{port}")
        ingress.add_callbacks(callbacks)
        await ingress.start()
        started.append((dispatcher, ingress))
        return Harness(gateway, dispatcher, callbacks, public_url)

    yield make
    for dispatcher, ingress in started:
        await ingress.stop()
        await dispatcher.close(5)
