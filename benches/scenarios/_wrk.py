"""``wrk`` (Debian's HTTP load generator, C + LuaJIT): the ceiling, i.e. the sink driven
directly by the fastest client available with the same number of connections as the
scenarios' in-flight bound, and the load generator of the webhook scenario."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scenarios._base import Context, Role, Sample

_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "text/plain"
wrk.body = string.rep("x", {payload})
{request}
local stop_after = {stop_after}
local ok = 0
{response}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
# Only when a run must stop after a count: a response() hook costs wrk some speed.
_STOP = """\
function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    if ok >= stop_after then wrk.thread:stop() end
  end
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: `apt-get install -y wrk` (make setup installs it)")
    return path


async def run_wrk(
    url: str,
    workdir: Path,
    *,
    payload: int,
    connections: int,
    seconds: float,
    stop_after: int | None = None,
    until: Callable[[], Awaitable[bool]] | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> WrkResult:
    """``wrk`` POSTing ``payload`` bytes for ``seconds`` or, with ``stop_after``, until that
    many 2xx answers (spread over its threads; wrk may finish a few more in flight).

    A wrk thread that stops early does not end wrk (its main thread sleeps the whole
    duration); SIGINT does, and still prints the summary. So with ``until`` (polled every
    few ms), wrk is interrupted as soon as it returns true."""
    threads = min(2, connections)
    per_thread = -(-stop_after // threads) if stop_after else 0
    request = _request_lines(workdir, headers or {}, body)
    script = workdir / f"wrk-{payload}-{per_thread}-{abs(hash(request))}.lua"
    script.write_text(
        _SCRIPT.format(
            payload=payload, stop_after=per_thread, response=_STOP if stop_after else "", request=request
        )
    )
    process = await asyncio.create_subprocess_exec(
        wrk_binary(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    communicate = asyncio.create_task(process.communicate())
    if until is not None:
        while not communicate.done():
            if await until():
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                break
            await asyncio.sleep(0.005)
    out, err = await communicate
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode()}{out.decode()}")
    data = json.loads(lines[-1])
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout") if data[k]}
    return WrkResult(
        int(data["requests"]), data["duration_us"] / 1e6, data["p50_us"] / 1e3, data["p99_us"] / 1e3, errors
    )


def _request_lines(workdir: Path, headers: Mapping[str, str], body: bytes | None) -> str:
    """Lua setting the request's own headers and body (read from a file: any bytes, no escaping)."""
    lines = [f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}" for name, value in headers.items()]
    if body is not None:
        path = workdir / f"wrk-body-{abs(hash(body))}.bin"
        path.write_bytes(body)
        lines.append(f'local body_file = io.open({json.dumps(str(path))}, "rb")')
        lines.append("wrk.body = body_file:read('*a')")
        lines.append("body_file:close()")
    return "\n".join(lines)


_MEASURED: dict[tuple[int, int], list[WrkResult]] = {}
"""Ceiling rounds measured so far in this run, per (payload, connections): ``--quick`` reuses
them instead of measuring the same ceiling again in every scenario (it must fit in 2 minutes;
a full run measures every scenario's ceiling in its own alternation)."""


class WrkCeiling:
    """The ceiling: what the sink takes from ``wrk`` with ``connections`` keep-alive
    connections. Its latency is wrk's request round trip at saturation. With ``per_message``
    calls per message (fan-out), its rate is in messages: requests / ``per_message``."""

    role: Role = "ceiling"

    def __init__(self, payload: int, connections: int, per_message: int = 1) -> None:
        self.payload = payload
        self.connections = connections
        self.per_message = per_message
        self.rounds = 0
        self.label = f"wrk → sink, {connections} connection{'s' if connections > 1 else ''}"
        if per_message > 1:
            self.label += f", ÷ {per_message} calls per message"

    async def round(self, ctx: Context) -> Sample:
        self.rounds += 1
        measured = _MEASURED.setdefault((self.payload, self.connections), [])
        if ctx.options.quick and len(measured) >= self.rounds:
            result = measured[self.rounds - 1]
        else:
            result = await self._measure(ctx)
            measured.append(result)
        n = self.per_message
        return Sample(result.rate / n, result.requests // n, result.p50_ms, result.p99_ms)

    async def _measure(self, ctx: Context) -> WrkResult:
        await ctx.sink.reset()
        result = await run_wrk(
            ctx.function_url(),
            ctx.options.workdir,
            payload=self.payload,
            connections=self.connections,
            seconds=ctx.options.wrk_seconds,
        )
        received = await ctx.sink.count()
        # Requests still in flight when wrk stops reach the sink without being counted by wrk.
        if not result.requests <= received <= result.requests + self.connections or result.errors:
            raise RuntimeError(
                f"wrk counted {result.requests:,} answers (errors {result.errors}), "
                f"the sink {received:,} requests"
            )
        return result
