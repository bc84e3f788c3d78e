"""Core NATS source (``type = "nats"``) against a real nats-server."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from fastconn.config import validate_config
from fastconn.dispatcher import Dispatcher, DispatchOptions
from fastconn.functions import FunctionTarget
from fastconn.metrics import Metrics
from fastconn.source import SourceContext
from fastconn.sources import nats as nats_source
from fastconn.testing import DaemonProcess, FunctionDouble, wait_for
from nats_fixtures import (
    TOKEN,
    NatsServer,
    connected,
    daemon_config,
    nats_server,
    nats_token_server,
    unique,
)

__all__ = ["nats_server", "nats_token_server"]  # fixtures, used by name

SLOW_CONSUMER = 'fastconn_source_errors_total{kind="slow_consumer",source="nats"}'


def received(metrics: dict[str, float], source: str = "nats") -> float:
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("fastconn_messages_received_total{") and f'source="{source}"' in k
    )


async def test_wildcards_headers_and_routing(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    base = unique("orders")
    config = daemon_config(
        function_double,
        {"all": [f"{base}.*"], "eu": [f"{base}.eu"], "deep": [f"{base}.deep.>"]},
        [{"type": "nats", "servers": [nats_server.url], "subjects": [f"{base}.>"]}],
    )
    async with DaemonProcess(config, tmp_path) as daemon, connected(nats_server.url) as nc:
        await nc.publish(
            f"{base}.eu", b"one", headers={"X-Trace": "t-1", "Content-Length": "999", "X-Topic": "spoofed"}
        )
        await nc.publish(f"{base}.us", b"two")
        await nc.publish(f"{base}.deep.a.b", b"three")
        await nc.publish(f"{base}.nobody.x", b"four")
        await nc.flush()
        await wait_for(lambda: len(function_double.calls) >= 4, 10, what="4 calls")
        await asyncio.sleep(0.3)  # nothing more may come
        by_path = Counter(c.path for c in function_double.calls)
        assert by_path == {"/all": 2, "/eu": 1, "/deep": 1}
        eu = function_double.calls_to("/eu")[0]
        assert eu.body == b"one"
        assert eu.headers["X-Topic"] == f"{base}.eu"
        assert eu.headers["X-Trace"] == "t-1"
        assert eu.headers["X-Connector"] == "fastconn"
        assert eu.headers["X-Message-Id"]
        assert {c.headers["X-Topic"] for c in function_double.calls_to("/all")} == {
            f"{base}.eu",
            f"{base}.us",
        }
        assert function_double.calls_to("/deep")[0].headers["X-Topic"] == f"{base}.deep.a.b"
        metrics = await daemon.metrics()
        assert received(metrics) == 4
        assert metrics['fastconn_messages_acked_total{source="nats"}'] == 4  # one of them unrouted


async def test_queue_group_shares_work_between_two_daemons(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    subject = unique("work")
    config = daemon_config(
        function_double,
        {"work": [subject]},
        [{"type": "nats", "servers": [nats_server.url], "subjects": [subject]}],
    )
    n = 400
    async with (
        DaemonProcess(config, tmp_path) as one,
        DaemonProcess(config, tmp_path) as two,
        connected(nats_server.url) as nc,
    ):
        for i in range(n):
            await nc.publish(subject, str(i).encode())
        await nc.flush()
        await wait_for(lambda: len(function_double.calls) >= n, 15, what=f"{n} calls")
        await asyncio.sleep(0.3)
        payloads = Counter(c.body for c in function_double.calls)
        assert len(function_double.calls) == n, "each message is handled once"
        assert set(payloads) == {str(i).encode() for i in range(n)}
        first, second = received(await one.metrics()), received(await two.metrics())
        assert first + second == n
        assert first > 0 and second > 0, (first, second)


async def test_request_reply(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    base = unique("rpc")
    function_double.script("/echo", [200], headers={"Content-Type": "application/json"})
    function_double.script("/broken", [400])
    config = daemon_config(
        function_double,
        {"echo": [f"{base}.echo"], "broken": [f"{base}.broken"]},
        [{"type": "nats", "servers": [nats_server.url], "subjects": [f"{base}.>"]}],
        max_attempts=1,
    )
    async with DaemonProcess(config, tmp_path), connected(nats_server.url) as nc:
        reply = await nc.request(f"{base}.echo", b'{"x": 1}', timeout=5, headers={"X-Trace": "abc"})
        assert reply.data == b'{"x": 1}'
        assert reply.headers is not None
        assert reply.headers["X-Function-Status"] == "200"
        assert reply.headers["X-Function-Name"] == "echo"
        assert reply.headers["Content-Type"] == "application/json"
        assert reply.headers["X-Message-Id"] == function_double.calls_to("/echo")[0].headers["X-Message-Id"]
        assert float(reply.headers["X-Duration-Seconds"]) >= 0
        assert function_double.calls_to("/echo")[0].headers["X-Trace"] == "abc"

        failed = await nc.request(f"{base}.broken", b"bad input", timeout=5)
        assert failed.headers is not None and failed.headers["X-Function-Status"] == "400"
        assert failed.data == b"bad input"

        nobody = await nc.request(f"{base}.nobody", b"?", timeout=5)
        assert nobody.headers is not None and nobody.headers["X-Function-Status"] == "404"
        assert "no function" in nobody.headers["X-Fastconn-Error"]

        # Many requests at once: each gets its own answer.
        replies = await asyncio.gather(
            *(nc.request(f"{base}.echo", f"r{i}".encode(), timeout=10) for i in range(100))
        )
        assert [r.data for r in replies] == [f"r{i}".encode() for i in range(100)]


async def test_token_auth_and_broker_host(
    nats_token_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    subject = unique("secure")
    source = {"type": "nats", "subjects": [subject], "token": TOKEN}
    config = daemon_config(function_double, {"fn": [subject]}, [source])
    # No `servers`: the OpenFaaS env var names the host (and here the port).
    env = {"broker_host": f"127.0.0.1:{nats_token_server.port}"}
    async with DaemonProcess(config, tmp_path, env=env), connected(nats_token_server.url, token=TOKEN) as nc:
        await nc.publish(subject, b"authenticated")
        await nc.flush()
        await wait_for(lambda: function_double.calls_to("/fn"), 10, what="the call")
        assert function_double.calls_to("/fn")[0].body == b"authenticated"

    wrong = daemon_config(function_double, {"fn": [subject]}, [{**source, "token": "wrong"}])
    with pytest.raises(RuntimeError, match="authentication rejected"):
        await DaemonProcess(wrong, tmp_path, env=env).start(timeout=15)


def test_broker_host_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("broker_host", "nats")
    functions = [{"name": "f", "url": "http://127.0.0.1:1/f", "topics": ["t"]}]
    config = validate_config({"functions": functions, "sources": [{"type": "nats"}]})
    assert config.sources[0].servers == ("nats://nats:4222",)
    assert config.sources[0].queue_group == "fastconn"
    explicit = validate_config(
        {"functions": functions, "sources": [{"type": "nats", "servers": ["tls://a:4443"]}]}
    )
    assert explicit.sources[0].servers == ("tls://a:4443",)
    for bad in (
        {"subjects": ["a..b"]},
        {"subjects": ["a.>.b"]},
        {"token": "t", "user": "u"},
        {"tls_cert": "c"},
        {"servers": ["http://x"]},
        {"queue_group": "a b"},
    ):
        with pytest.raises(Exception, match="sources\\[0\\]"):
            validate_config({"functions": functions, "sources": [{"type": "nats", **bad}]})


async def test_slow_consumer_is_counted_not_fatal(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    subject = unique("flood")
    function_double.script("/slow", [200], delay=1.0)
    config = daemon_config(
        function_double,
        {"slow": [subject]},
        [{"type": "nats", "servers": [nats_server.url], "subjects": [subject], "pending_msgs_limit": 20}],
        max_inflight=2,
        batch_size=4,
    )
    daemon = DaemonProcess(config, tmp_path)
    await daemon.start()
    try:
        async with connected(nats_server.url) as nc:
            for i in range(500):
                await nc.publish(subject, b"x" * 100 + str(i).encode())
            await nc.flush()

            async def dropped() -> bool:
                return (await daemon.metrics()).get(SLOW_CONSUMER, 0) > 0

            await wait_for(dropped, 10, 0.1, "a slow-consumer event")
            metrics = await daemon.metrics()
            assert daemon.process is not None and daemon.process.poll() is None, "still running"
            # Bounded intake: the dispatcher queue (8) + one batch (4) + the client's pending
            # limit (20) per subscription, whatever was published.
            assert received(metrics) <= 8 + 4 + 20 + 4, received(metrics)
            assert metrics[SLOW_CONSUMER] >= 500 - (8 + 4 + 20 + 4)
            assert "slow consumer" in daemon.output()
    finally:
        daemon.kill()  # at-most-once: what is queued may be lost; no need to wait for it


async def test_subscriptions_follow_the_topic_map(
    nats_server: NatsServer, function_double: FunctionDouble
) -> None:
    """Without ``subjects`` the source subscribes to the topic map's topics, once each even
    when one covers another, and re-subscribes when the map changes."""
    base = unique("map")
    options = DispatchOptions(backoff_initial=0.01, max_attempts=1)
    async with Dispatcher(options) as dispatcher, connected(nats_server.url) as nc:

        async def ready(_timeout: float) -> bool:
            return True

        ctx = SourceContext(dispatcher=dispatcher, metrics=Metrics(), app=web.Application(), wait_ready=ready)
        source = nats_source.create(nats_source.NatsConfig(servers=(nats_server.url,)))
        source.register(ctx)

        def publish_map(targets: list[FunctionTarget]) -> None:  # what the daemon does
            dispatcher.set_functions(targets)
            ctx.publish_topics(tuple(sorted({t for target in targets for t in target.topics})))

        publish_map([FunctionTarget("a", (f"{base}.a",), function_double.url("/a"))])
        await source.start()
        try:
            # Core NATS drops what nobody subscribes to yet: publish once the server has the SUB
            # (a flush on the source's connection is a round trip behind it).
            await wait_for(lambda: f"{base}.a" in source._subs, 20, what="the first subscription")
            await source._nc.flush()
            await nc.publish(f"{base}.a", b"1")
            await nc.flush()
            await wait_for(lambda: function_double.calls_to("/a"), 20, what="call to a")

            publish_map(
                [
                    FunctionTarget("wild", (f"{base}.*",), function_double.url("/wild")),
                    FunctionTarget("b", (f"{base}.b",), function_double.url("/b")),
                ]
            )
            await wait_for(lambda: set(source._subs) == {f"{base}.*"}, 20, what="re-subscription")
            await nc.publish(f"{base}.b", b"2")
            await nc.publish(f"{base}.c", b"3")
            await nc.flush()
            await wait_for(lambda: len(function_double.calls) >= 4, 20, what="calls after the change")
            await asyncio.sleep(0.2)
            assert Counter(c.path for c in function_double.calls) == {"/a": 1, "/wild": 2, "/b": 1}
        finally:
            await source.stop()
            await dispatcher.close()
            await source.close()


async def test_graceful_stop_delivers_what_was_received(
    nats_server: NatsServer, function_double: FunctionDouble, tmp_path: Path
) -> None:
    subject = unique("drain")
    function_double.script("/fn", [200], delay=0.05)
    config = daemon_config(
        function_double,
        {"fn": [subject]},
        [{"type": "nats", "servers": [nats_server.url], "subjects": [subject]}],
        max_inflight=4,
    )
    daemon = DaemonProcess(config, tmp_path)
    await daemon.start()
    async with connected(nats_server.url) as nc:
        for i in range(100):
            await nc.publish(subject, str(i).encode())
        await nc.flush()
        await wait_for(lambda: function_double.calls_to("/fn"), 5, what="first call")
        assert received(await daemon.metrics()) == 100
        assert len(function_double.calls) < 100, "still working when the signal comes"
        assert await daemon.stop(signal.SIGTERM) == 0
    # Everything taken in before the signal reached the function before the daemon exited.
    assert sorted(int(c.body) for c in function_double.calls) == list(range(100))
    assert "(0 message(s) unfinished)" in daemon.output()


def test_client_options_map_tls_and_auth(tmp_path: Path) -> None:
    import ssl

    from fastconn.errors import SourceError
    from fastconn.sources._nats_common import NatsConnectionConfig, client_options

    plain = client_options(NatsConnectionConfig(), "src")
    assert plain["servers"] == ["nats://127.0.0.1:4222"]
    assert plain["max_reconnect_attempts"] == -1 and "tls" not in plain and "token" not in plain
    tls = client_options(
        NatsConnectionConfig(servers=("tls://nats.example:4443",), user="u", password="p"), "src"
    )
    assert isinstance(tls["tls"], ssl.SSLContext)
    assert (tls["user"], tls["password"]) == ("u", "p")
    assert client_options(NatsConnectionConfig(token="t"), "src")["token"] == "t"
    assert (
        client_options(NatsConnectionConfig(creds_file="/x.creds"), "src")["user_credentials"] == "/x.creds"
    )
    seed_file = tmp_path / "seed"
    seed_file.write_text("SUAM...")
    assert client_options(NatsConnectionConfig(nkey_seed=str(seed_file)), "src")["nkeys_seed"] == str(
        seed_file
    )
    assert client_options(NatsConnectionConfig(nkey_seed="SUAXYZ"), "src")["nkeys_seed_str"] == "SUAXYZ"
    with pytest.raises(SourceError, match="TLS"):
        client_options(NatsConnectionConfig(tls_ca=str(tmp_path / "missing.pem")), "src")
