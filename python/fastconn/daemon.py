"""The daemon: wires configuration, registry, dispatcher, the ingress server (``[server]
listen``, in the core), the optional admin server (``[server] admin_listen``) and sources, and runs
them until a signal.

Readiness is computed here and pushed to the ingress when it changes (on the events that change
it, and by a short poll for the time-based ones), so ``/readyz`` costs no Python.

Shutdown order (SIGTERM/SIGINT): sources stop intake → the dispatcher drains in-flight work up
to ``shutdown_timeout`` while completions keep settling → sources close (final acks, commits)
→ the servers stop → exit 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Sequence

from aiohttp import web
from pydantic import BaseModel

from fastconn.admin import METRICS_CONTENT_TYPE, AdminServer
from fastconn.callbacks import CallbackMetrics, CallbackSettings
from fastconn.config import Config
from fastconn.conn_guard import ServerLimits
from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.errors import ConfigError
from fastconn.failure_log import FunctionFailureLog
from fastconn.fdlimit import raise_open_files_limit
from fastconn.functions import FunctionTarget
from fastconn.health import clock_text
from fastconn.http_routes import HttpRequest, HttpResponse, Route
from fastconn.ingress import Ingress, IngressLimits
from fastconn.message import Outcome
from fastconn.metrics import Metrics
from fastconn.preflight import listen_problem
from fastconn.registry import GatewayRegistry, TopicMapSync, static_targets
from fastconn.source import HealthReporting, Source, SourceContext
from fastconn.supervise import Supervisor

log = logging.getLogger("fastconn.daemon")


def dispatch_options(config: Config) -> DispatchOptions:
    d = config.dispatch
    gw = config.gateway
    return DispatchOptions(
        workers=d.workers,
        max_inflight=d.max_inflight,
        max_inflight_per_function=d.max_inflight_per_function,
        max_attempts=d.max_attempts,
        retry_on=tuple(d.retry_on),
        backoff_initial=d.backoff_initial,
        backoff_max=d.backoff_max,
        timeout=config.gateway.upstream_timeout if config.gateway else 30.0,
        content_type=d.content_type,
        batch_size=d.batch_size,
        capture_responses=d.print_response_body,
        tls_ca=gw.tls_ca if gw else None,
        tls_cert=gw.tls_cert if gw else None,
        tls_key=gw.tls_key if gw else None,
        tls_insecure_skip_verify=gw.tls_insecure_skip_verify if gw else False,
    )


def create_source(entry: BaseModel) -> Source:
    """Instantiates ``fastconn.sources.<type>`` from its validated config model."""
    type_name = str(getattr(entry, "type", "")).replace("-", "_")
    module = importlib.import_module(f"fastconn.sources.{type_name}")
    source: Source = module.create(entry)
    return source


class Daemon:
    def __init__(
        self, config: Config, *, metrics: Metrics | None = None, supervisor: Supervisor | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(self.metrics.task_restarts)
        self.dispatcher = Dispatcher(dispatch_options(config))
        self.failure_log = FunctionFailureLog()
        srv = config.server
        self.ingress = Ingress(
            self.dispatcher,
            srv.listen,
            IngressLimits(
                srv.header_timeout,
                srv.idle_timeout,
                srv.max_connections,
                tls_cert=srv.tls_cert,
                tls_key=srv.tls_key,
                http2=srv.http2,
                http2_max_concurrent_streams=srv.http2_max_concurrent_streams,
            ),
            count_python=lambda route, n: self.metrics.ingress_python_requests.labels(route).inc(n),
        )
        # /metrics on its own listener when asked (aiohttp: one scrape at a time needs no more),
        # else on the ingress, as a Python route.
        self.admin: AdminServer | None = None
        if srv.admin_listen:
            limits = ServerLimits(srv.header_timeout, srv.idle_timeout, srv.max_connections)
            self.admin = AdminServer(srv.admin_listen, self.metrics, self._readiness, limits=limits)
        else:
            self.ingress.add_route(Route("GET", "/metrics", self._serve_metrics, name="metrics"))
        self.sources: list[Source] = [create_source(entry) for entry in config.sources]
        self.stopping = asyncio.Event()
        self._sources_started = False
        self._started: list[Source] = []
        self._gateway_auth: tuple[tuple[str, str], ...] = ()
        gateway = config.gateway
        credentials = gateway.credentials() if gateway else None
        if credentials is not None:
            token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            self._gateway_auth = (("Authorization", f"Basic {token}"),)
        self.registry = (
            GatewayRegistry(
                gateway.url,
                credentials=credentials,
                topic_delimiter=gateway.topic_delimiter,
                listing_timeout=gateway.listing_timeout,
                namespaces=list(gateway.namespaces) or None,
                ssl_context=gateway.ssl_context(),
                max_listing_bytes=gateway.max_listing_bytes,
            )
            if gateway
            else None
        )
        self.sync = TopicMapSync(
            self.registry,
            self._static_targets(),
            gateway.rebuild_interval if gateway else 3600.0,
            self._apply_targets,
            logger=logging.getLogger("fastconn.registry"),
            on_failure=lambda _exc: self.metrics.registry_failures.inc(),
        )
        d = config.dispatch
        secret = d.callback_secret.encode() if d.callback_secret else secrets.token_bytes(32)
        self.callbacks = self.dispatcher.enable_callbacks(
            CallbackSettings(
                public_url=config.public_url,
                secret=secret,
                timeout=d.callback_timeout,
                max_pending=d.max_pending_callbacks,
                ack=d.async_ack,
                max_attempts=d.max_attempts,
                retry_on=tuple(d.retry_on),
                backoff_initial=d.backoff_initial,
                backoff_max=d.backoff_max,
                max_body_bytes=d.max_callback_bytes,
            ),
            CallbackMetrics(self.metrics.registry),
        )
        # Answered in the core: token check, claim (exactly once) and body limit, the result
        # handed to the call waiting in the core; no Python per callback.
        self.ingress.add_callbacks(self.callbacks)
        uses_async = d.asynchronous_invocation or any(
            getattr(source, "asynchronous_invocation", False) for source in config.sources
        )
        if uses_async and d.async_ack == "on_callback" and config.public_url_derived:
            log.warning(
                "callbacks of async invocations will go to %s, derived from [server] listen: only a "
                "gateway on this host can reach it; set [server] public_url to the address the "
                "gateway reaches fastconn at",
                config.public_url,
            )
        self.ctx = SourceContext(
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            app=self.admin.app if self.admin else web.Application(),
            wait_ready=self.sync.wait_ready,
            default_topics=tuple(config.topics),
            print_request_body=config.dispatch.print_request_body,
            startup_wait=gateway.startup_wait if gateway else 0.0,
            supervisor=self.supervisor,
            ingress=self.ingress,
        )

    async def _serve_metrics(self, _: HttpRequest) -> HttpResponse:
        return HttpResponse(200, (("Content-Type", METRICS_CONTENT_TYPE),), self.metrics.render())

    def _push_readiness(self) -> None:
        ready, why = self._readiness()
        self.ingress.set_ready(ready, "ready" if ready else why, self.sync.ready.is_set())

    async def _readiness_loop(self) -> None:
        """Pushes changes that come with time alone (a source down for longer than the grace,
        a task that keeps failing); the events that change readiness push at once."""
        while True:
            self._push_readiness()
            await asyncio.sleep(0.25)

    def _static_targets(self) -> list[FunctionTarget]:
        gateway_url = self.config.gateway.url if self.config.gateway else None
        targets = static_targets(self.config.functions, gateway_url)
        return [self._with_gateway_auth(t) for t in targets]

    def _with_gateway_auth(self, target: FunctionTarget) -> FunctionTarget:
        """Gateway credentials go only to calls through the gateway, never to static URLs."""
        gateway = self.config.gateway
        if not self._gateway_auth or gateway is None or not target.url.startswith(gateway.url + "/"):
            return target
        return dataclasses.replace(target, headers=(*target.headers, *self._gateway_auth))

    def _apply_targets(self, targets: list[FunctionTarget]) -> None:
        targets = [self._with_gateway_auth(t) for t in targets]
        if self.config.dispatch.asynchronous_invocation:
            targets = [dataclasses.replace(t, asynchronous=True) if t.async_url else t for t in targets]
        self.dispatcher.set_functions(targets)
        self.metrics.topic_map_functions.set(len(targets))
        self.ctx.publish_topics(tuple(sorted({topic for t in targets for topic in t.topics})))
        self.ctx.publish_functions(targets)
        log.info("topic map: %d function(s), %d topic(s)", len(targets), len(self.ctx.subscribed_topics))
        self._push_readiness()

    def _readiness(self) -> tuple[bool, str]:
        if not self.sync.ready.is_set():
            return False, f"topic map not loaded ({self.sync.last_error or 'first listing pending'})"
        if not self._sources_started:
            return False, "sources starting"
        if self.stopping.is_set():
            return False, "shutting down"
        failing = self.supervisor.failing
        if failing:
            tasks = "; ".join(f"{name} ({error})" for name, error in sorted(failing.items()))
            return False, f"background task(s) keep failing: {tasks}"
        return self._sources_healthy()

    def _sources_healthy(self) -> tuple[bool, str]:
        """Not ready while a source's broker has been unreachable for longer than the grace."""
        now = time.time()
        down = []
        for source in self.sources:
            if not isinstance(source, HealthReporting):
                continue  # no connection of its own (the webhook): always healthy
            health = source.health()
            if not health.ok and now - health.since >= self.config.server.readiness_grace:
                down.append(f"source {source.name}: {health.reason} since {clock_text(health.since)}")
        if down:
            return False, "; ".join(down)
        return True, "ready"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.dispatcher.start()
        self.metrics.bind_core(
            self.dispatcher.stats, lambda: self.dispatcher.inflight, lambda: self.dispatcher.queued
        )
        self.dispatcher.add_observer(self._print_responses)
        self.dispatcher.add_observer(self.failure_log)
        for source in self.sources:
            source.register(self.ctx)
        self._push_readiness()
        srv = self.config.server
        try:
            await self.ingress.start()
        except OSError as exc:
            # Free at preflight, taken since: the same message `check` gives, exit 2.
            raise ConfigError([listen_problem(srv.listen, exc)]) from None
        if self.admin is not None:
            try:
                await self.admin.start()
            except OSError as exc:
                raise ConfigError([listen_problem(srv.admin_listen or "", exc)]) from None
        self.supervisor.spawn("daemon.readiness", self._readiness_loop)
        await self.sync.start(self.supervisor)
        for source in self.sources:
            # Listed before its start: a start cut short (a stop signal) still gets stop/close.
            self._started.append(source)
            await source.start()
        self._sources_started = True
        self._push_readiness()
        log.info("fastconn listening on %s with %d source(s)", self.ingress.url, len(self.sources))
        if self.admin is not None:
            log.info("metrics on %s/metrics", self.admin.url)

    async def shutdown(self) -> None:
        self.stopping.set()
        self._push_readiness()
        timeout = self.config.dispatch.shutdown_timeout
        deadline = time.monotonic() + timeout
        for source in self._started:
            await _guard(source.stop(), f"stopping source {source.name}")
        # Async calls still waiting for their callback get the same grace as calls in flight.
        while self.callbacks.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = await self.dispatcher.close(max(0.0, deadline - time.monotonic()))
        self.failure_log.flush()
        for source in self._started:
            await _guard(source.close(), f"closing source {source.name}")
        await self.sync.stop()
        if self.registry is not None:
            await self.registry.close()
        await self.ingress.stop()
        if self.admin is not None:
            await self.admin.stop()
        log.info("fastconn stopped (%d message(s) unfinished)", left)

    async def run(self) -> None:
        """Runs until SIGTERM/SIGINT (or ``stopping`` is set), then shuts down gracefully."""
        raise_open_files_limit()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._start_unless_stopped()
            await self.stopping.wait()
        finally:
            await self.shutdown()
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _start_unless_stopped(self) -> None:
        """Starts, but gives up as soon as a stop signal arrives: a source's start may retry
        an unreachable broker for a long time, and the platform kills a daemon that ignores
        SIGTERM for its grace period (30 s in Kubernetes)."""
        starting = asyncio.ensure_future(self.start())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({starting, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not starting.done():
                starting.cancel()
                # Whatever the cancelled start raises while unwinding is moot: we are stopping.
                await asyncio.gather(starting, return_exceptions=True)
        if not starting.cancelled():
            starting.result()  # a start-up failure propagates

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info("%s: stopping intake, draining in-flight work", sig.name)
        self.stopping.set()

    # -- response printing (print_response / print_response_body) -------------------------

    def _print_responses(self, outcomes: Sequence[Outcome]) -> None:
        d = self.config.dispatch
        if not d.print_response:
            return
        for outcome in outcomes:
            for r in outcome.results:
                if d.print_response_body and r.body is not None:
                    log.info(
                        "%s => %s [%s] %.3fs body=%r",
                        outcome.message.topic,
                        r.function,
                        r.status_label,
                        r.latency,
                        r.body[:4096],
                    )
                else:
                    log.info(
                        "%s => %s [%s] %.3fs", outcome.message.topic, r.function, r.status_label, r.latency
                    )


async def _guard(step: Awaitable[object], what: str) -> None:
    try:
        await step
    except Exception:
        log.exception("error while %s", what)
