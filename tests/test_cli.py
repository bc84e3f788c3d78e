"""The command line as users run it: ``python -m fastconn check|topics|invoke|run`` in subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fastconn import __version__
from fastconn.testing import FunctionDouble, to_toml, wait_for
from gateway_double import FunctionSpec, GatewayDouble


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def _env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FASTCONN_CONFIG"}
    return {**env, **(extra or {})}


async def fastconn(
    *args: str,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> Run:
    """``python -m fastconn ARGS`` without blocking the loop (the gateway double runs on it)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastconn",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(env),
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


# ---------------------------------------------------------------------------- check

GOOD_FUNCTION = '[[functions]]\nname = "a"\nurl = "http://127.0.0.1:9000/"\ntopics = ["t"]\n'

BROKEN: dict[str, tuple[str, str | None, Sequence[str]]] = {
    # case: (TOML, env override "NAME=value" or None, fragments the message must contain)
    "unknown key": (
        "[dispatch]\nmax_inflite = 3\n" + GOOD_FUNCTION,
        None,
        ["dispatch.max_inflite: unknown key, did you mean 'max_inflight'?", "(got 3)"],
    ),
    "top-level key under a table": (
        '[gateway]\ntopics = ["a"]\n',
        None,
        ["gateway.topics: unknown key", "'topics' is a top-level key"],
    ),
    "bad gateway url": (
        '[gateway]\nurl = "ftp://gw"\n',
        None,
        ["gateway.url: expected an http:// or https:// URL with a host (got 'ftp://gw')"],
    ),
    "https gateway with a missing CA file": (
        '[gateway]\nurl = "https://gw:8443"\ntls_ca = "/nonexistent/fastconn-ca.pem"\n',
        None,
        ['gateway.tls_ca: cannot read "/nonexistent/fastconn-ca.pem"', "No such file"],
    ),
    "function url the dispatcher cannot call": (
        '[[functions]]\nname = "a"\nurl = "https://gw..example/f"\ntopics = ["t"]\n',
        None,
        ['functions[0].url: "gw..example" is not a valid host name for TLS'],
    ),
    "bad duration": (
        '[gateway]\n[dispatch]\nbackoff_initial = "10 parsecs"\n',
        None,
        ["dispatch.backoff_initial: invalid duration", "(got '10 parsecs')"],
    ),
    "zero max_inflight": (
        "[gateway]\n[dispatch]\nmax_inflight = 0\n",
        None,
        ["dispatch.max_inflight:", "greater than or equal to 1", "(got 0)"],
    ),
    "backoff out of order": (
        '[gateway]\n[dispatch]\nbackoff_initial = "2s"\nbackoff_max = "1s"\n',
        None,
        ["dispatch.backoff_max: must be >= backoff_initial (2s) (got '1s')"],
    ),
    "status out of range": (
        "[gateway]\n[dispatch]\nretry_on = [503, 600]\n",
        None,
        ["dispatch.retry_on[1]:", "599", "(got 600)"],
    ),
    "nothing to invoke": ('log_level = "info"\n', None, ["gateway: nothing to invoke"]),
    "function without url or gateway": (
        '[[functions]]\nname = "a"\ntopics = ["t"]\n',
        None,
        ["functions[0].url: no url and no [gateway] to derive one from"],
    ),
    "duplicate function": (
        '[gateway]\n[[functions]]\nname = "a"\ntopics = ["t"]\n[[functions]]\nname = "a"\ntopics = ["u"]\n',
        None,
        ["functions[1].name: duplicate function name (also functions[0])"],
    ),
    "function with empty topics": (
        '[gateway]\n[[functions]]\nname = "a"\ntopics = []\n',
        None,
        ["functions[0].topics: must not be empty"],
    ),
    "unknown source type": (
        '[gateway]\n[[sources]]\ntype = "carrier-pigeon"\n',
        None,
        ["sources[0].type: unknown source type (known:", "webhook", "(got 'carrier-pigeon')"],
    ),
    "bad source option": (
        '[gateway]\n[[sources]]\ntype = "webhook"\nmax_body_bytes = 0\nsecret = "x"\n',
        None,
        ["sources[0].max_body_bytes:", "(got 0)", "sources[0].secret: unknown key"],
    ),
    "bad listen address": (
        '[gateway]\n[server]\nlisten = "localhost"\n',
        None,
        ["server.listen: expected host:port", "(got 'localhost')"],
    ),
    "bad log level": ('log_level = "loud"\n[gateway]\n', None, ["log_level: expected one of debug"]),
    "invalid toml": ("[gateway\nurl = 1\n", None, ["invalid TOML", "(at line 1", "(got '[gateway')"]),
    "duration beyond what the core takes": (
        "[gateway]\n[dispatch]\nshutdown_timeout = 1e300\nbackoff_max = 99999999999\n",
        None,
        [
            "dispatch.shutdown_timeout: invalid duration: too large: at most 24 days",
            "dispatch.backoff_max: invalid duration: too large",
        ],
    ),
    "integer beyond 64 bits": (
        "[gateway]\n[dispatch]\nmax_pending_callbacks = 99999999999999999999999\nmax_attempts = 1e400\n",
        None,
        [
            "dispatch.max_pending_callbacks: integer out of range: TOML integers are 64-bit",
            "(got 99999999999999999999999)",
            "dispatch.max_attempts:",
        ],
    ),
    "huge per-function timeout": (
        '[gateway]\n[[functions]]\nname = "a"\ntopics = ["t"]\ntimeout = "100000000h"\n',
        None,
        ["functions[0].timeout: invalid duration: too large"],
    ),
    "two webhook sources": (
        '[gateway]\n[[sources]]\ntype = "webhook"\n[[sources]]\ntype = "webhook"\nname = "w2"\n',
        None,
        ["sources[1].type: a second webhook source (also sources[0]): both would serve POST /webhook/"],
    ),
    "duplicate source names": (
        '[gateway]\n[[sources]]\ntype = "nats"\n[[sources]]\ntype = "jetstream"\nname = "nats"\n'
        'stream = "s"\nsubjects = ["a"]\n',
        None,
        ["sources[1].name: duplicate source name (also sources[0])"],
    ),
    "function url with CR/LF": (
        '[[functions]]\nname = "a"\nurl = "http://127.0.0.1:9000/f\\r\\nX-Injected: 1"\ntopics = ["t"]\n',
        None,
        ["functions[0].url: must not contain spaces or control characters"],
    ),
    "content type with CR/LF": (
        '[gateway]\n[dispatch]\ncontent_type = "text/plain\\r\\nX-Injected: 1"\n',
        None,
        ["dispatch.content_type: a header value must not contain CR, LF"],
    ),
    "gateway url with LF": (
        '[gateway]\nurl = "http://gw:8080/\\n"\n',
        None,
        ["gateway.url: must not contain spaces or control characters"],
    ),
    "env duration beyond the cap": (
        "[gateway]\n",
        "upstream_timeout=10000000h",
        ["env:upstream_timeout: invalid duration '10000000h': too large"],
    ),
    "bad env override": (
        "[gateway]\n",
        "upstream_timeout=abc",
        ["env:upstream_timeout: invalid duration 'abc'"],
    ),
    "env override without gateway": (
        GOOD_FUNCTION,
        "rebuild_interval=5s",
        ["env:rebuild_interval: applies to [gateway], which is not configured"],
    ),
}


_CHECKS_AT_ONCE = 4


@pytest.fixture(scope="module")
def check_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    """Runs ``check`` on every broken config, a few at a time (each is a process start of
    ~0.4 s; all at once would starve each other on a busy two-core machine)."""
    directory = tmp_path_factory.mktemp("check")
    results = {}
    cases = list(BROKEN.items())
    for start in range(0, len(cases), _CHECKS_AT_ONCE):
        processes = {}
        for index, (case, (text, env, _)) in enumerate(cases[start : start + _CHECKS_AT_ONCE], start):
            path = directory / f"case{index}.toml"
            path.write_text(text)
            extra = dict([env.split("=", 1)]) if env else {}
            processes[case] = (
                subprocess.Popen(
                    [sys.executable, "-m", "fastconn", "check", "--config", str(path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=_env(extra),
                ),
                path,
            )
        for case, (process, path) in processes.items():
            out, err = process.communicate(timeout=120)
            results[case] = (Run(process.returncode, out.decode(), err.decode()), path)
    return results


@pytest.mark.parametrize("case", list(BROKEN))
def test_check_reports_each_broken_config(case: str, check_results: dict[str, tuple[Run, Path]]) -> None:
    run, path = check_results[case]
    assert run.code == 2, run
    assert run.stdout == ""
    assert run.stderr.startswith("fastconn: invalid configuration:\n"), run.stderr
    for fragment in BROKEN[case][2]:
        assert fragment in run.stderr, f"{fragment!r} not in:\n{run.stderr}"
    if case == "invalid toml":
        assert str(path) in run.stderr, "a file problem names the file"


async def test_check_good_config_and_config_sources(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    # Port 0: `check` binds the listen address (as `run` would), so no fixed port may be assumed free.
    path.write_text(
        '[server]\nlisten = "127.0.0.1:0"\n[gateway]\nurl = "http://gw:8080/"\n'
        + '[[sources]]\ntype = "webhook"\n'
        + GOOD_FUNCTION
    )
    good = await fastconn("check", "--config", str(path))
    assert good == Run(0, "ok: 1 static function(s), 1 source(s), gateway http://gw:8080\n", "")
    # FASTCONN_CONFIG instead of --config; env overrides apply on top.
    via_env = await fastconn("check", env={"FASTCONN_CONFIG": str(path), "gateway_url": "http://other:8080"})
    assert via_env == Run(0, "ok: 1 static function(s), 1 source(s), gateway http://other:8080\n", "")
    missing = await fastconn("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.code == 2 and "nope.toml: config file not found" in missing.stderr
    version = await fastconn("--version")
    assert (version.code, version.stdout.strip()) == (0, f"fastconn {__version__}")


async def test_run_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[dispatch]\nmax_inflite = 3\n" + GOOD_FUNCTION)
    for args in (("run", "--config", str(path)), ("--config", str(path))):  # `run` is the default
        result = await fastconn(*args, timeout=20)
        assert result.code == 2, result
        assert "dispatch.max_inflite: unknown key" in result.stderr


async def test_check_and_run_refuse_a_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("this is not a certificate\n")
    path = tmp_path / "tls.toml"
    path.write_text(
        to_toml(
            {
                "gateway": {"url": "https://127.0.0.1:1", "tls_ca": str(ca)},
                "server": {"listen": "127.0.0.1:0"},
            }
        )
    )
    for command in ("check", "run"):
        result = await fastconn(command, "--config", str(path), timeout=20)
        assert result.code == 2, result
        assert f'gateway.tls_ca: no certificate found in "{ca}"' in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


async def test_run_with_missing_basic_auth_secrets_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(
        to_toml(
            {
                "gateway": {
                    "url": "http://127.0.0.1:1",
                    "basic_auth": True,
                    "secret_mount_path": str(tmp_path),
                },
                "server": {"listen": "127.0.0.1:0"},
            }
        )
    )
    result = await fastconn("run", "--config", str(path), timeout=20)
    assert result.code == 2, result
    assert "gateway.secret_mount_path: basic_auth is enabled but" in result.stderr
    assert "basic-auth-user" in result.stderr and "basic-auth-password" in result.stderr


def _refused_configs(tmp_path: Path, busy_port: int) -> dict[str, tuple[dict[str, Any], str]]:
    """Configs `run` cannot start with: (config, fragment of the message)."""
    function = {"name": "a", "url": "http://127.0.0.1:9/", "topics": ["t"]}
    return {
        "listen address in use": (
            {"functions": [function], "server": {"listen": f"127.0.0.1:{busy_port}"}},
            f"server.listen: address already in use: another process listens there; choose another "
            f"port (got '127.0.0.1:{busy_port}')",
        ),
        "listen host unresolvable": (
            {"functions": [function], "server": {"listen": "no-such-host.invalid:8081"}},
            "server.listen: cannot resolve the listen host",
        ),
        "listen address not of this host": (
            {"functions": [function], "server": {"listen": "192.0.2.1:8081"}},
            "server.listen: address not available",
        ),
        "basic-auth secrets missing": (
            {
                "gateway": {
                    "url": "http://127.0.0.1:9",
                    "basic_auth": True,
                    "secret_mount_path": str(tmp_path),
                },
                "server": {"listen": "127.0.0.1:0"},
            },
            "gateway.secret_mount_path: basic_auth is enabled but",
        ),
        "backoff beyond the core's range": (
            {
                "functions": [function],
                "server": {"listen": "127.0.0.1:0"},
                "dispatch": {"backoff_initial": 1e300, "backoff_max": 1e300},
            },
            "dispatch.backoff_initial: invalid duration: too large",
        ),
    }


async def test_check_and_run_refuse_the_same_configs_with_the_same_message(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for case, (config, fragment) in _refused_configs(tmp_path, busy.getsockname()[1]).items():
            path = tmp_path / "refused.toml"
            path.write_text(to_toml(config))
            check = await fastconn("check", "--config", str(path))
            run = await fastconn("run", "--config", str(path), timeout=20)
            assert check.code == 2, (case, check)
            assert check.stderr.startswith("fastconn: invalid configuration:\n"), (case, check)
            assert fragment in check.stderr, (case, check.stderr)
            assert run == Run(2, "", check.stderr), f"{case}: run and check disagree"


# ---------------------------------------------------------------------------- topics


@pytest.fixture
def topics_gateway(gateway: GatewayDouble) -> GatewayDouble:
    gateway.set_functions(
        [
            FunctionSpec("resize", topic="images.uploaded, images.*"),
            FunctionSpec("audit", topic="images.uploaded"),
            FunctionSpec("bill", namespace="dev", topic="invoices|orders.>"),
            FunctionSpec("idle"),
        ]
    )
    return gateway


async def test_topics_json_against_the_gateway(topics_gateway: GatewayDouble, tmp_path: Path) -> None:
    path = tmp_path / "topics.toml"
    path.write_text(
        to_toml(
            {
                "gateway": {"url": topics_gateway.url, "topic_delimiter": ","},
                "functions": [
                    {"name": "static", "url": "http://127.0.0.1:9/", "topics": ["images.uploaded", "cron"]}
                ],
            }
        )
    )
    result = await fastconn("topics", "--config", str(path), "--json")
    assert result.code == 0, result
    assert json.loads(result.stdout) == {
        "cron": ["static"],
        "images.*": ["resize.openfaas-fn"],
        "images.uploaded": ["audit.openfaas-fn", "resize.openfaas-fn", "static"],
        "invoices|orders.>": ["bill.dev"],  # "," is the delimiter, so this is one topic
    }
    assert list(json.loads(result.stdout)) == sorted(json.loads(result.stdout))

    # The text form; the topic_delimiter environment override changes how annotations split.
    text = await fastconn("topics", "--config", str(path), env={"topic_delimiter": "|"})
    table = {
        "cron": "static",
        "images.uploaded": "audit.openfaas-fn, static",
        "images.uploaded, images.*": "resize.openfaas-fn",
        "invoices": "bill.dev",
        "orders.>": "bill.dev",
    }
    width = max(map(len, table))
    assert text == Run(0, "".join(f"{t:<{width}}  {n}\n" for t, n in table.items()), "")


async def test_topics_with_the_gateway_down_fails_cleanly(gateway: GatewayDouble, tmp_path: Path) -> None:
    gateway.set_down()
    path = tmp_path / "topics.toml"
    path.write_text(to_toml({"gateway": {"url": gateway.url}}))
    result = await fastconn("topics", "--config", str(path), "--json")
    assert result.code == 1, result
    assert "HTTP 500" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- invoke


async def test_invoke_sync_prints_the_response(gateway: GatewayDouble) -> None:
    gateway.set_functions([FunctionSpec("echo"), FunctionSpec("upper", namespace="dev")])
    gateway.script("upper.dev", body="HELLO")
    result = await fastconn(
        "invoke", "echo", "--gateway", gateway.url, "-H", "X-Trace=abc", "-H", "X-Empty=", stdin=b"hi there\n"
    )
    assert result == Run(0, "hi there\n", "")
    [call] = gateway.requests_for("echo")
    assert call.path == "/function/echo" and call.body == b"hi there\n"
    assert call.headers["X-Trace"] == "abc" and call.headers["X-Empty"] == ""
    assert call.headers["X-Topic"] == "cli"
    assert call.headers["User-Agent"] == f"fastconn/{__version__}"
    # name.namespace, and the gateway from the gateway_url environment variable.
    result = await fastconn("invoke", "upper.dev", stdin=b"hello", env={"gateway_url": gateway.url})
    assert result == Run(0, "HELLO", "")
    assert [r.path for r in gateway.requests_for("upper.dev")] == ["/function/upper.dev"]


async def test_invoke_sync_failures(gateway: GatewayDouble) -> None:
    gateway.set_functions([FunctionSpec("picky")])
    gateway.script("picky", statuses=400, body="bad input")
    result = await fastconn("invoke", "picky", "--gateway", gateway.url, stdin=b"x")
    assert result.code == 1 and result.stdout == ""
    assert "picky failed: 400: bad input" in result.stderr
    assert len(gateway.requests_for("picky")) == 1
    bad_header = await fastconn("invoke", "picky", "--gateway", gateway.url, "-H", "novalue")
    assert bad_header.code == 2 and "bad header 'novalue'" in bad_header.stderr


async def test_invoke_with_basic_auth_from_the_config(
    gateway: GatewayDouble, tmp_path: Path, secrets_dir: Callable[[str, str], Path]
) -> None:
    gateway.set_functions([FunctionSpec("echo")])
    path = tmp_path / "invoke.toml"
    secrets = secrets_dir("admin", "pw")
    path.write_text(
        to_toml({"gateway": {"url": gateway.url, "basic_auth": True, "secret_mount_path": str(secrets)}})
    )
    result = await fastconn("invoke", "echo", "--config", str(path), stdin=b"auth")
    assert result == Run(0, "auth", "")
    [call] = gateway.requests_for("echo")
    assert call.headers["Authorization"] == "Basic " + base64.b64encode(b"admin:pw").decode()


async def test_invoke_async_prints_the_call_id_and_the_callback_arrives(
    gateway: GatewayDouble, function_double: FunctionDouble
) -> None:
    gateway.set_functions([FunctionSpec("worker")])
    gateway.script("worker", body="done", queue_delay=0.1)
    callback_url = function_double.url("/callback")
    result = await fastconn(
        "invoke", "worker", "-a", "--callback-url", callback_url, "--gateway", gateway.url, stdin=b"job"
    )
    assert result.code == 0, result
    prefix = "Function queued for asynchronous processing. Call id: "
    assert result.stdout.startswith(prefix), result.stdout
    call_id = result.stdout.removeprefix(prefix).strip()
    assert call_id and call_id != "(none returned)"

    [request] = gateway.requests_for("worker")
    assert request.kind == "async" and request.path == "/async-function/worker"
    assert request.headers["X-Callback-Url"] == callback_url
    assert request.headers["X-Call-Id"] == call_id
    await wait_for(lambda: function_double.calls_to("/callback"), 5, what="the callback")
    [callback] = function_double.calls_to("/callback")
    assert callback.body == b"done"
    assert callback.headers["X-Call-Id"] == call_id
    assert callback.headers["X-Function-Status"] == "200"
    assert callback.headers["X-Function-Name"] == "worker"
