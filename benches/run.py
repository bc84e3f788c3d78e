"""The fastconn benchmark suite: one command, every figure against baselines measured in the
same run (the machine is shared; absolute figures drift, ratios much less).

    python -m fastconn bench [SCENARIO...] [--messages N] [--payload BYTES] [--inflight N]
                             [--rounds N] [--quick] [--out DIR]

Scenarios (default: all, in this order): dispatch, webhook, webhook-durable, webhook-https,
cloudevents, nats, jetstream, kafka, rabbitmq, sqs, mqtt, postgres, pushbullet, async-callback,
fanout, backpressure, scaling, https, bridge, cron, vcenter. Writes ``results.json`` (with an
environment header), ``results.md`` (the README table) and ``results.png`` to ``--out``
(default ``bench-results/``). See ``benches/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from _common import ROOT, Sink, environment, sink_binary
from scenarios import SCENARIOS
from scenarios._base import Context, Options, ScenarioResult, SinkClient, progress


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fastconn bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"any of: {', '.join(SCENARIOS)}")
    parser.add_argument("--messages", type=int, help="messages per round (default 200000; --quick 10000)")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--inflight", type=int, default=64, help="calls in flight, for every system (64)")
    parser.add_argument("--rounds", type=int, help="rounds per system (default 3; --quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds: under 2 minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results", help="report directory")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `python -m fastconn bench -- --quick`: fastconn's CLI passes the separator through.
        argv = argv[1:]
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    if args.rounds is not None and args.rounds < 2:
        parser.error("--rounds must be at least 2 (medians and spreads need them)")
    return args


def options(args: argparse.Namespace, workdir: Path) -> Options:
    quick = bool(args.quick)
    return Options(
        messages=args.messages or (10_000 if quick else 200_000),
        payload=args.payload,
        inflight=args.inflight,
        rounds=args.rounds or (2 if quick else 3),
        quick=quick,
        wrk_seconds=1 if quick else 3,
        probe_messages=200 if quick else 1000,
        probe_rate=1000.0,
        stall_seconds=1.0 if quick else 10.0,
        workdir=workdir,
    )


async def run_all(names: list[str], opts: Options) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    with Sink() as sink:
        client = SinkClient(sink)
        ctx = Context(opts, client)
        try:
            for name in names:
                module = importlib.import_module(SCENARIOS[name])
                progress(f"== {name}")
                started = time.perf_counter()
                try:
                    results.extend(await module.run(ctx))
                except Exception as exc:  # a broker that does not start fails its scenario only
                    failed = ScenarioResult(name, name, {}, error=f"{type(exc).__name__}: {exc}")
                    failed.seconds = time.perf_counter() - started
                    results.append(failed)
                    progress(f"  [{name}] FAILED: {failed.error}")
                progress(f"   ({time.perf_counter() - started:.0f} s)")
        finally:
            await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    out: Path = args.out
    workdir = out / "work"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    opts = options(args, workdir)
    sink_binary()  # built before anything is timed
    env = environment()
    progress(
        f"fastconn bench: {', '.join(names)} | {opts.messages:,} x {opts.payload} B, {opts.inflight} in "
        f"flight, {opts.rounds} rounds | {env['cpu']}, {env['cores']} cores, load {env['load_average']}"
    )
    started = time.perf_counter()
    results = asyncio.run(run_all(names, opts))
    elapsed = time.perf_counter() - started
    paths = report.write(out, env, opts, results, elapsed)
    progress("")
    progress(report.markdown(results, env, report.settings(opts)))
    progress(f"total {elapsed:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
