"""HTTPS to functions and to the gateway: the Rust core's TLS client against aiohttp HTTPS servers
whose certificates come from a private CA (``trustme``), configured the way operators do it
(``[gateway] tls_ca`` / ``tls_cert`` / ``tls_key``)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import trustme

from fastconn import Dispatcher, DispatchOptions, ErrorKind, Message, Outcome, Verdict
from fastconn.config import Config, validate_config
from fastconn.daemon import dispatch_options
from fastconn.errors import ConfigError, RegistryError
from fastconn.registry import GatewayRegistry, static_targets
from fastconn.testing import FunctionDouble, to_toml
from gateway_double import FunctionSpec, GatewayDouble

if TYPE_CHECKING:
    from conftest import DaemonFactory

FAST = {"backoff_initial": 0.01, "backoff_max": 0.5, "timeout": 5.0}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def client_identity(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A client certificate from the private CA: (cert file, key file)."""
    leaf = ca.issue_cert("fastconn-client")
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    for index, blob in enumerate(leaf.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def server_context(ca: trustme.CA, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 and localhost from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    if require_client_cert:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.fixture
async def https_function(ca: trustme.CA) -> AsyncIterator[FunctionDouble]:
    async with FunctionDouble(ssl_context=server_context(ca)) as double:
        yield double


@pytest.fixture
async def mtls_function(ca: trustme.CA) -> AsyncIterator[FunctionDouble]:
    async with FunctionDouble(ssl_context=server_context(ca, require_client_cert=True)) as double:
        yield double


def config_for(function: FunctionDouble, **gateway: Any) -> Config:
    """A config whose one static function is ``function``'s ``/f``, with ``[gateway]`` TLS keys."""
    return validate_config(
        {
            "gateway": {"url": function.url(""), **gateway},
            "functions": [{"name": "f", "url": function.url("/f"), "topics": ["t"]}],
        }
    )


async def call_once(options: DispatchOptions, config: Config, payload: bytes = b"hello") -> Outcome:
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions(static_targets(config.functions, None))
        [outcome] = await dispatcher.call([Message("t", payload)], capture=True)
    return outcome


def with_fast_retries(options: DispatchOptions) -> DispatchOptions:
    return replace(options, **FAST)


# ---------------------------------------------------------------------------- dispatch over https


async def test_dispatch_over_https_with_a_private_ca_from_config(
    https_function: FunctionDouble, ca_file: str
) -> None:
    assert https_function.url("/f").startswith("https://127.0.0.1:")
    config = config_for(https_function, tls_ca=ca_file)
    options = with_fast_retries(dispatch_options(config))
    async with Dispatcher(options) as dispatcher:
        dispatcher.set_functions(static_targets(config.functions, None))
        outcomes = await dispatcher.call([Message("t", f"m{i}".encode()) for i in range(20)], capture=True)
    assert [o.verdict for o in outcomes] == [Verdict.OK] * 20
    assert [o.results[0].body for o in outcomes] == [f"m{i}".encode() for i in range(20)]
    assert sorted(c.body for c in https_function.calls_to("/f")) == sorted(
        f"m{i}".encode() for i in range(20)
    )


async def test_an_untrusted_certificate_fails_once_and_says_why(https_function: FunctionDouble) -> None:
    # No tls_ca: the system's roots do not know the private CA.
    config = config_for(https_function)
    outcome = await call_once(with_fast_retries(dispatch_options(config)), config)
    [result] = outcome.results
    assert (outcome.verdict, result.error, result.status, result.attempts) == (
        Verdict.FAILED,
        ErrorKind.TLS,
        0,
        1,
    ), "a certificate error is final: no retries"
    assert result.status_label == "tls"
    assert b"UnknownIssuer" in (result.body or b"") and b"tls_ca" in (result.body or b""), result.body
    assert https_function.calls == []


async def test_insecure_skip_verify_accepts_any_certificate_and_warns(
    https_function: FunctionDouble, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(https_function, tls_insecure_skip_verify=True)
    with caplog.at_level(logging.WARNING, logger="fastconn.dispatcher"):
        outcome = await call_once(with_fast_retries(dispatch_options(config)), config)
    assert outcome.verdict is Verdict.OK
    warnings = [r for r in caplog.records if "CERTIFICATE VERIFICATION IS OFF" in r.getMessage()]
    assert len(warnings) == 1


async def test_mutual_tls_needs_the_client_certificate(
    mtls_function: FunctionDouble, ca_file: str, client_identity: tuple[str, str]
) -> None:
    without = config_for(mtls_function, tls_ca=ca_file)
    outcome = await call_once(with_fast_retries(dispatch_options(without)), without)
    [result] = outcome.results
    assert (outcome.verdict, result.error) == (Verdict.FAILED, ErrorKind.TLS), result
    assert b"tls_cert" in (result.body or b""), result.body

    cert, key = client_identity
    with_identity = config_for(mtls_function, tls_ca=ca_file, tls_cert=cert, tls_key=key)
    outcome = await call_once(with_fast_retries(dispatch_options(with_identity)), with_identity)
    assert outcome.verdict is Verdict.OK, outcome.results
    assert [c.body for c in mtls_function.calls_to("/f")] == [b"hello"]


async def test_the_runtime_refuses_bad_tls_files(tmp_path: Path) -> None:
    dispatcher = Dispatcher(DispatchOptions(tls_ca=str(tmp_path / "absent.pem")))
    with pytest.raises(ValueError, match=r"tls_ca: cannot read .*absent\.pem"):
        await dispatcher.start()


# ---------------------------------------------------------------------------- configuration


def tls_problem(**gateway: str) -> tuple[str, str]:
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"gateway": {"url": "https://gw:8443", **gateway}})
    [problem] = excinfo.value.problems
    return problem.location, problem.message


def test_bad_tls_material_is_a_config_error_at_its_key(
    ca: trustme.CA, ca_file: str, client_identity: tuple[str, str], tmp_path: Path
) -> None:
    cert, key = client_identity
    other_key = tmp_path / "other.key"
    ca.issue_cert("other").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")

    location, message = tls_problem(tls_ca=str(tmp_path / "absent.pem"))
    assert (location, "cannot read") == ("gateway.tls_ca", message[: len("cannot read")])
    location, message = tls_problem(tls_ca=str(garbage))
    assert location == "gateway.tls_ca" and "no certificate found" in message
    location, message = tls_problem(tls_cert=cert)
    assert location == "gateway.tls_key" and "required with tls_cert" in message
    location, message = tls_problem(tls_key=key)
    assert location == "gateway.tls_cert" and "required with tls_key" in message
    location, message = tls_problem(tls_cert=cert, tls_key=str(other_key))
    assert location == "gateway.tls_key" and "cannot be used with the certificate" in message

    good = validate_config(
        {"gateway": {"url": "https://gw", "tls_ca": ca_file, "tls_cert": cert, "tls_key": key}}
    )
    assert good.gateway is not None and good.gateway.tls_key == key


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://user:pw@gw/f", "no credentials in the URL"),
        ("https://gw..example/f", "not a valid host name for TLS"),
    ],
)
def test_urls_the_core_cannot_call_are_config_errors(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"functions": [{"name": "f", "url": url, "topics": ["t"]}]})
    [problem] = excinfo.value.problems
    assert problem.location == "functions[0].url"
    assert fragment in problem.message


# ---------------------------------------------------------------------------- the gateway over https


async def test_gateway_listing_uses_the_same_tls_settings(ca: trustme.CA, ca_file: str) -> None:
    async with GatewayDouble([FunctionSpec("echo", topic="orders")], ssl_context=server_context(ca)) as gw:
        config = validate_config({"gateway": {"url": gw.url, "tls_ca": ca_file}})
        assert config.gateway is not None
        async with GatewayRegistry(gw.url, ssl_context=config.gateway.ssl_context()) as registry:
            [target] = await registry.fetch()
        assert target.url.startswith("https://")
        async with GatewayRegistry(gw.url) as untrusting:
            with pytest.raises(RegistryError, match="certificate verify failed"):
                await untrusting.fetch()


async def test_daemon_with_an_https_gateway_becomes_ready_and_delivers(
    ca: trustme.CA,
    ca_file: str,
    daemon_factory: DaemonFactory,
    http: aiohttp.ClientSession,
    fast_dispatch: dict[str, Any],
) -> None:
    """The reported failure: an https gateway left the daemon not-ready, refusing every webhook."""
    async with GatewayDouble([FunctionSpec("echo", topic="orders")], ssl_context=server_context(ca)) as gw:
        daemon = await daemon_factory(
            {
                "gateway": {
                    "url": gw.url,
                    "tls_ca": ca_file,
                    "rebuild_interval": "200ms",
                    "startup_wait": "5s",
                },
                "dispatch": fast_dispatch,
                "sources": [{"type": "webhook"}],
            }
        )
        async with http.post(f"{daemon.url}/webhook/orders?wait=true", data=b"over tls") as reply:
            assert reply.status == 200, await reply.text()
            assert reply.headers["X-Function-Name"] == "echo.openfaas-fn"
        assert [r.body for r in gw.requests if r.kind == "sync"] == [b"over tls"]


async def test_invoke_through_an_https_gateway_uses_the_configured_ca(
    ca: trustme.CA, ca_file: str, tmp_path: Path
) -> None:
    from test_cli import fastconn

    async with GatewayDouble([FunctionSpec("echo")], ssl_context=server_context(ca)) as gw:
        path = tmp_path / "invoke.toml"
        path.write_text(to_toml({"gateway": {"url": gw.url, "tls_ca": ca_file}}))
        result = await fastconn("invoke", "echo", "--config", str(path), stdin=b"secret")
        assert (result.code, result.stdout) == (0, "secret"), result
        # Without the CA: one attempt, and the reason.
        untrusting = await fastconn("invoke", "echo", "--gateway", gw.url, stdin=b"x")
        assert untrusting.code == 1
        assert "echo failed: tls: TLS with 127.0.0.1:" in untrusting.stderr, untrusting.stderr
        assert "UnknownIssuer" in untrusting.stderr
        assert [r.body for r in gw.requests_for("echo")] == [b"secret"]
