"""Command line: ``python -m fastconn [run|check|topics|invoke|demo|bench]``.

``python -m fastconn --config PATH`` is the same as ``python -m fastconn run --config PATH``.
Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from fastconn.config import Config, load_config
from fastconn.errors import ConfigError, FastconnError
from fastconn.logs import setup_logging
from fastconn.preflight import preflight

T = TypeVar("T")

COMMANDS = ("run", "check", "topics", "invoke", "demo", "bench", "postgres")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:
        # Everything after `bench` belongs to the suite's own parser (options included).
        from fastconn.bench import cli as bench_cli

        return bench_cli(args[1:])
    if not args or args[0] not in (*COMMANDS, "-h", "--help", "--version"):
        args.insert(0, "run")
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command == "bench":
        from fastconn.bench import cli as bench_cli

        return bench_cli(list(ns.bench_args))
    handler = {
        "run": _run,
        "check": _check,
        "topics": _topics,
        "invoke": _invoke,
        "demo": _demo,
        "postgres": _postgres,
    }[ns.command]
    try:
        return handler(ns)
    except ConfigError as exc:
        print(f"fastconn: invalid configuration:\n{_indent(str(exc))}", file=sys.stderr)
        return 2
    except FastconnError as exc:
        print(f"fastconn: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    from fastconn import __version__

    parser = argparse.ArgumentParser(prog="fastconn", description="Event connector for serverless functions.")
    parser.add_argument("--version", action="version", version=f"fastconn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="TOML configuration (default: $FASTCONN_CONFIG)")
        return p

    run = with_config(sub.add_parser("run", help="run the daemon (default)"))
    run.add_argument("--log-format", choices=["text", "json"], help="override log_format")
    run.add_argument("--log-level", help="override log_level")

    with_config(sub.add_parser("check", help="validate a configuration; exit 2 when invalid"))

    topics = with_config(sub.add_parser("topics", help="print the resolved topic map"))
    topics.add_argument("--json", action="store_true", help="print JSON")

    invoke = with_config(sub.add_parser("invoke", help="call a function with stdin as the body"))
    invoke.add_argument("name", help="function name (name or name.namespace)")
    invoke.add_argument(
        "-a",
        "--async",
        dest="asynchronous",
        action="store_true",
        help="invoke asynchronously and print the call id",
    )
    invoke.add_argument("-H", "--header", action="append", default=[], metavar="K=V", help="extra header")
    invoke.add_argument("--callback-url", help="X-Callback-Url for an async invocation")
    invoke.add_argument("--gateway", help="gateway URL (default: [gateway] url, $gateway_url, or :8080)")
    invoke.add_argument("--topic", default="cli", help="X-Topic to send (default: cli)")

    demo = sub.add_parser("demo", help="a self-contained pipeline: webhook → fastconn → sample function")
    demo.add_argument("--seconds", type=float, default=5.0, help="how long to feed events (default 5)")
    demo.add_argument("--listen", default="127.0.0.1:0", help="admin/webhook address (default: a free port)")

    postgres = with_config(
        sub.add_parser(
            "postgres", help="inspect or drop a postgres source's slot; install its NOTIFY trigger"
        )
    )
    postgres.add_argument("action", choices=["status", "drop-slot", "install-trigger"])
    postgres.add_argument("--source", help="the source's name (default: the only postgres source)")
    postgres.add_argument("--table", help="install-trigger: table or schema.table")

    bench = sub.add_parser("bench", help="run the benchmark suite (see benches/README.md)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _load(ns: argparse.Namespace) -> Config:
    path = ns.config or os.environ.get("FASTCONN_CONFIG")
    return load_config(path)


def _run(ns: argparse.Namespace) -> int:
    config = _load(ns)
    preflight(config)
    setup_logging(ns.log_format or config.log_format, ns.log_level or config.log_level)
    from fastconn.daemon import Daemon

    async def run() -> None:
        await Daemon(config).run()

    _event_loop_run(run())
    return 0


def _check(ns: argparse.Namespace) -> int:
    config = _load(ns)
    preflight(config)
    print(
        f"ok: {len(config.functions)} static function(s), {len(config.sources)} source(s), "
        f"gateway {config.gateway.url if config.gateway else 'none'}"
    )
    return 0


def _topics(ns: argparse.Namespace) -> int:
    config = _load(ns)
    setup_logging("text", "warning")
    from fastconn.registry import GatewayRegistry, static_targets

    async def resolve() -> dict[str, list[str]]:
        gw = config.gateway
        targets = static_targets(config.functions, gw.url if gw else None)
        if gw is not None:
            async with GatewayRegistry(
                gw.url,
                credentials=gw.credentials(),
                topic_delimiter=gw.topic_delimiter,
                listing_timeout=gw.listing_timeout,
                namespaces=list(gw.namespaces) or None,
                ssl_context=gw.ssl_context(),
            ) as registry:
                targets += await registry.fetch()
        table: dict[str, list[str]] = {}
        for t in targets:
            for topic in t.topics:
                table.setdefault(topic, []).append(t.name)
        return {topic: sorted(set(names)) for topic, names in sorted(table.items())}

    table = asyncio.run(resolve())
    if ns.json:
        print(json.dumps(table, indent=2))
    else:
        width = max((len(t) for t in table), default=5)
        for topic, names in table.items():
            print(f"{topic:<{width}}  {', '.join(names)}")
    return 0


def _invoke(ns: argparse.Namespace) -> int:
    from fastconn.daemon import dispatch_options
    from fastconn.invoke import invoke

    config = _load(ns) if (ns.config or os.environ.get("FASTCONN_CONFIG")) else None
    gateway = (
        ns.gateway
        or (config.gateway.url if config and config.gateway else None)
        or os.environ.get("gateway_url")
        or "http://127.0.0.1:8080"
    )
    headers = []
    for item in ns.header:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"fastconn: bad header {item!r}: expected K=V", file=sys.stderr)
            return 2
        headers.append((key, value))
    body = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    credentials = config.gateway.credentials() if config and config.gateway else None
    return _event_loop_run(
        invoke(
            gateway,
            ns.name,
            body,
            headers=headers,
            asynchronous=ns.asynchronous,
            callback_url=ns.callback_url,
            topic=ns.topic,
            credentials=credentials,
            options=dispatch_options(config) if config else None,
        )
    )


def _postgres(ns: argparse.Namespace) -> int:
    from fastconn.sources.postgres import PostgresConfig, admin

    config = _load(ns)
    found = [
        s
        for s in config.sources
        if isinstance(s, PostgresConfig) and (ns.source is None or s.name == ns.source)
    ]
    if len(found) != 1:
        what = f"named {ns.source!r}" if ns.source else "(name one with --source)" if found else ""
        print(f"fastconn: expected one postgres source {what}, found {len(found)}".rstrip(), file=sys.stderr)
        return 2
    source = found[0]
    if ns.action == "install-trigger":
        if not ns.table:
            print("fastconn: install-trigger needs --table", file=sys.stderr)
            return 2
        print(asyncio.run(admin.install_trigger(source, ns.table)))
    elif ns.action == "drop-slot":
        print(asyncio.run(admin.drop_slot(source)))
    else:
        print(asyncio.run(admin.status(source)))
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from fastconn.demo import demo

    setup_logging("text", "warning")
    return _event_loop_run(demo(seconds=ns.seconds, listen=ns.listen))


def _event_loop_run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs on uvloop (faster loop, coalesced cross-thread wake-ups) when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; embedders may lack it
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
