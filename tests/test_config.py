"""Configuration loading: TOML, OpenFaaS env overrides, validation errors, durations."""

from __future__ import annotations

import importlib
import pickle
import sys
import textwrap
import types
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

import fastconn.sources
from fastconn.config import (
    Config,
    DispatchConfig,
    FunctionConfig,
    GatewayConfig,
    ServerConfig,
    known_source_types,
    load_config,
    source_config_model,
    validate_config,
)
from fastconn.durations import Duration, parse_duration
from fastconn.errors import (
    MISSING,
    ConfigError,
    ConfigProblem,
    DispatcherClosed,
    FastconnError,
    ForkError,
    RegistryError,
    SourceError,
)
from fastconn.sources.webhook import WebhookConfig

FULL_EXAMPLE = """
topics = ["a", "b"]
log_format = "json"
log_level = "DEBUG"

[gateway]
url = "http://gateway.openfaas:8080/"
upstream_timeout = "1m30s"
rebuild_interval = "10s"
basic_auth = true
secret_mount_path = "/run/secrets"
topic_delimiter = ";"
namespaces = ["openfaas-fn", "staging"]
listing_timeout = "5s"
startup_wait = "2s"

[dispatch]
content_type = "application/json"
max_inflight = 1024
max_inflight_per_function = 256
max_attempts = 5
retry_on = [408, 429, 500, 502, 503, 504]
backoff_initial = "100ms"
backoff_max = "30s"
asynchronous_invocation = false
print_response = true
print_response_body = true
print_request_body = false
workers = 4
batch_size = 512
shutdown_timeout = "1.5s"

[server]
listen = "0.0.0.0:8081"
public_url = ""

[[functions]]
name = "resize"
url = "http://127.0.0.1:9000/"
topics = ["images.uploaded"]
namespace = "openfaas-fn"
max_inflight = 16
timeout = "5s"
asynchronous = false

[[functions]]
name = "thumb"
topics = ["images.uploaded", "images.changed"]

[[sources]]
type = "webhook"
auth_token = "s3cret"
"""


def write(tmp_path: Path, text: str, name: str = "fastconn.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> dict[str, ConfigProblem]:
    return {problem.location: problem for problem in excinfo.value.problems}


# A minimal valid base that broken configs are appended to.
GATEWAY = '[gateway]\nurl = "http://127.0.0.1:8080"\n'


# --------------------------------------------------------------------------------------------------
# Loading valid configs
# --------------------------------------------------------------------------------------------------


def test_full_example_parses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_EXAMPLE), env={})

    assert config.topics == ("a", "b")
    assert config.log_format == "json"
    assert config.log_level == "debug"

    gateway = config.gateway
    assert gateway is not None
    assert gateway.url == "http://gateway.openfaas:8080"  # trailing slash normalised away
    assert gateway.upstream_timeout == 90.0
    assert gateway.rebuild_interval == 10.0
    assert gateway.basic_auth is True
    assert gateway.secret_mount_path == "/run/secrets"
    assert gateway.topic_delimiter == ";"
    assert gateway.namespaces == ("openfaas-fn", "staging")
    assert gateway.listing_timeout == 5.0
    assert gateway.startup_wait == 2.0

    dispatch = config.dispatch
    assert dispatch.content_type == "application/json"
    assert (dispatch.max_inflight, dispatch.max_inflight_per_function, dispatch.max_attempts) == (
        1024,
        256,
        5,
    )
    assert dispatch.retry_on == (408, 429, 500, 502, 503, 504)
    assert dispatch.backoff_initial == pytest.approx(0.1)
    assert dispatch.backoff_max == 30.0
    assert dispatch.asynchronous_invocation is False
    assert dispatch.print_response is True
    assert dispatch.print_response_body is True
    assert dispatch.print_request_body is False
    assert (dispatch.workers, dispatch.batch_size) == (4, 512)
    assert dispatch.shutdown_timeout == 1.5

    assert config.server.listen == "0.0.0.0:8081"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8081)
    assert config.public_url == "http://127.0.0.1:8081"

    resize, thumb = config.functions
    assert resize == FunctionConfig(
        name="resize",
        url="http://127.0.0.1:9000/",
        topics=("images.uploaded",),
        namespace="openfaas-fn",
        max_inflight=16,
        timeout=5.0,
        asynchronous=False,
    )
    assert resize.label == "resize.openfaas-fn"
    assert resize.invoke_urls(gateway) == ("http://127.0.0.1:9000/", None)
    assert thumb.url is None
    assert thumb.topics == ("images.uploaded", "images.changed")
    assert thumb.invoke_urls(gateway) == (
        "http://gateway.openfaas:8080/function/thumb",
        "http://gateway.openfaas:8080/async-function/thumb",
    )

    (source,) = config.sources
    assert isinstance(source, WebhookConfig)
    assert source.auth_token == "s3cret"
    assert source.name == "webhook"


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[gateway]\n"), env={})

    assert config.topics == ()
    assert config.gateway == GatewayConfig()
    assert config.gateway.url == "http://127.0.0.1:8080"
    assert config.gateway.upstream_timeout == 30.0
    assert config.gateway.rebuild_interval == 10.0
    assert config.gateway.basic_auth is False
    assert config.gateway.secret_mount_path == "/var/openfaas/secrets"
    assert config.gateway.topic_delimiter == ","
    assert config.gateway.namespaces == ()
    assert config.gateway.listing_timeout == 5.0
    assert config.gateway.startup_wait == 30.0

    assert config.dispatch == DispatchConfig()
    assert config.dispatch.content_type == "text/plain"
    assert config.dispatch.max_inflight == 1024
    assert config.dispatch.max_inflight_per_function == 256
    assert config.dispatch.max_attempts == 5
    assert config.dispatch.retry_on == (408, 429, 500, 502, 503, 504)
    assert config.dispatch.backoff_initial == pytest.approx(0.1)
    assert config.dispatch.backoff_max == 30.0
    assert config.dispatch.workers == 2
    assert config.dispatch.batch_size == 512
    assert config.dispatch.shutdown_timeout == 30.0
    assert not any(
        (
            config.dispatch.asynchronous_invocation,
            config.dispatch.print_response,
            config.dispatch.print_response_body,
            config.dispatch.print_request_body,
        )
    )

    assert config.server == ServerConfig()
    assert config.public_url == "http://127.0.0.1:8081"
    assert config.functions == ()
    assert config.sources == ()
    assert (config.log_format, config.log_level) == ("text", "info")


def test_static_functions_alone_need_no_gateway(tmp_path: Path) -> None:
    path = write(tmp_path, '[[functions]]\nname = "f"\nurl = "https://example.com/f"\ntopics = ["t"]\n')
    config = load_config(path, env={})
    assert config.gateway is None
    assert config.functions[0].invoke_urls(None) == ("https://example.com/f", None)


def test_models_are_frozen() -> None:
    config = validate_config({"gateway": {}})
    with pytest.raises(ValidationError):
        config.dispatch.max_inflight = 3  # type: ignore[misc, unused-ignore]  # frozen


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ({"listen": "127.0.0.1:9999"}, "http://127.0.0.1:9999"),
        ({"listen": "0.0.0.0:80"}, "http://127.0.0.1:80"),
        ({"listen": "[::1]:80"}, "http://[::1]:80"),
        ({"listen": "[::]:8081"}, "http://[::1]:8081"),
        ({"listen": "fastconn:8081"}, "http://fastconn:8081"),
        ({"public_url": "https://hooks.example.com/"}, "https://hooks.example.com"),
    ],
)
def test_public_url(server: dict[str, str], expected: str) -> None:
    assert validate_config({"gateway": {}, "server": server}).public_url == expected


def test_config_path_from_fastconn_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "[dispatch]\nworkers = 7\n")
    assert load_config(None, env={"FASTCONN_CONFIG": str(path)}).dispatch.workers == 7
    # An explicit path wins over the variable.
    other = write(tmp_path, GATEWAY, name="other.toml")
    assert load_config(other, env={"FASTCONN_CONFIG": str(path)}).dispatch.workers == 2


def test_env_none_means_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCONN_CONFIG", str(write(tmp_path, GATEWAY)))
    monkeypatch.setenv("content_type", "application/cloudevents+json")
    assert load_config(None).dispatch.content_type == "application/cloudevents+json"


def test_no_file_and_no_env_is_nothing_to_invoke() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={})
    assert str(excinfo.value) == "gateway: nothing to invoke: configure [gateway] or [[functions]]"


# --------------------------------------------------------------------------------------------------
# OpenFaaS environment overrides
# --------------------------------------------------------------------------------------------------


def test_gateway_url_env_creates_gateway_section() -> None:
    config = load_config(None, env={"gateway_url": "http://gateway.openfaas:8080/"})
    assert config.gateway == GatewayConfig(url="http://gateway.openfaas:8080")


def test_env_overrides_every_key(tmp_path: Path) -> None:
    # asynchronous_invocation comes on through the environment: callbacks then need a public URL.
    path = write(
        tmp_path, FULL_EXAMPLE.replace('public_url = ""', 'public_url = "http://fc.example.com:8081"')
    )
    env = {
        "gateway_url": "https://gw.example.com",
        "topics": " x, y ,,z ",
        "upstream_timeout": "2m",
        "rebuild_interval": "250ms",
        "basic_auth": "false",
        "secret_mount_path": "/var/secrets",
        "topic_delimiter": "|",
        "content_type": "application/octet-stream",
        "asynchronous_invocation": "TRUE",
        "print_response": "0",
        "print_response_body": "no",
        "print_request_body": "Yes",
        # Keys are matched exactly, like the connector-sdk: these are not overrides.
        "GATEWAY_URL": "http://ignored:1",
        "Topics": "ignored",
    }
    config = load_config(path, env=env)
    assert config.gateway is not None
    assert config.gateway.url == "https://gw.example.com"
    assert config.topics == ("x", "y", "z")
    assert config.gateway.upstream_timeout == 120.0
    assert config.gateway.rebuild_interval == 0.25
    assert config.gateway.basic_auth is False
    assert config.gateway.secret_mount_path == "/var/secrets"
    assert config.gateway.topic_delimiter == "|"
    assert config.dispatch.content_type == "application/octet-stream"
    assert config.dispatch.asynchronous_invocation is True
    assert config.dispatch.print_response is False
    assert config.dispatch.print_response_body is False
    assert config.dispatch.print_request_body is True
    # Keys the environment does not touch keep their file values.
    assert config.gateway.namespaces == ("openfaas-fn", "staging")
    assert config.dispatch.workers == 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        (" no ", False),
    ],
)
def test_env_bool_parsing(text: str, expected: bool) -> None:
    config = load_config(None, env={"gateway_url": "http://gw:8080", "print_response": text})
    assert config.dispatch.print_response is expected


def test_env_duration_numbers_are_seconds() -> None:
    config = load_config(None, env={"gateway_url": "http://gw:8080", "upstream_timeout": "45"})
    assert config.gateway is not None
    assert config.gateway.upstream_timeout == 45.0


def test_empty_env_values_are_ignored(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL_EXAMPLE), env={"topics": "", "content_type": ""})
    assert config.topics == ("a", "b")
    assert config.dispatch.content_type == "application/json"


@pytest.mark.parametrize(
    ("env", "location", "message"),
    [
        ({"upstream_timeout": "30 parsecs"}, "env:upstream_timeout", "invalid duration '30 parsecs'"),
        ({"rebuild_interval": "-5s"}, "env:rebuild_interval", "must not be negative"),
        # Converts fine but fails the model's "> 0": still reported against the variable.
        ({"rebuild_interval": "0s"}, "env:rebuild_interval", "greater than 0"),
        ({"basic_auth": "maybe"}, "env:basic_auth", "expected true/false, 1/0 or yes/no"),
        ({"print_request_body": "on"}, "env:print_request_body", "invalid boolean"),
        ({"gateway_url": "gateway:8080"}, "env:gateway_url", "http:// or https:// URL"),
        ({"content_type": "   "}, "env:content_type", "must not be empty"),
    ],
)
def test_bad_env_override_points_at_variable(env: dict[str, str], location: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, env={"gateway_url": "http://gw:8080", **env})
    problems = problems_of(excinfo)
    assert list(problems) == [location]
    assert message in problems[location].message


def test_gateway_env_without_gateway_section_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[[functions]]\nname = "f"\nurl = "http://f:8080"\ntopics = ["t"]\n')
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"upstream_timeout": "10s"})
    problem = problems_of(excinfo)["env:upstream_timeout"]
    assert "[gateway]" in problem.message
    assert problem.value == "10s"


def test_env_and_file_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "[dispatch]\nworkers = 0\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={"basic_auth": "perhaps"})
    assert set(problems_of(excinfo)) == {"env:basic_auth", "dispatch.workers"}


# --------------------------------------------------------------------------------------------------
# Broken configs: each names its location, says what was expected and shows the value
# --------------------------------------------------------------------------------------------------

BROKEN = [
    pytest.param("colour = 1\n" + GATEWAY, "colour", "unknown key", 1, id="unknown-top-level-key"),
    pytest.param(
        GATEWAY + "[dispatch]\nmax_inflite = 3\n",
        "dispatch.max_inflite",
        "unknown key, did you mean 'max_inflight'?",
        3,
        id="unknown-dispatch-key",
    ),
    pytest.param(
        GATEWAY.replace("\n", '\nupstream_timeout = "30 parsecs"\n', 1),
        "gateway.upstream_timeout",
        "invalid duration: expected a duration such as '30s'",
        "30 parsecs",
        id="bad-duration",
    ),
    pytest.param(
        GATEWAY + "[dispatch]\nmax_inflight = 0\n",
        "dispatch.max_inflight",
        "greater than or equal to 1",
        0,
        id="max-inflight-zero",
    ),
    pytest.param(
        GATEWAY + "[dispatch]\nretry_on = [500, 42]\n",
        "dispatch.retry_on[1]",
        "greater than or equal to 100",
        42,
        id="retry-on-bad-status",
    ),
    pytest.param(
        GATEWAY + '[dispatch]\nbackoff_initial = "1s"\nbackoff_max = "10ms"\n',
        "dispatch.backoff_max",
        "must be >= backoff_initial",
        "10ms",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        GATEWAY + "[dispatch]\nworkers = 65\n",
        "dispatch.workers",
        "less than or equal to 64",
        65,
        id="workers",
    ),
    pytest.param(
        GATEWAY.replace("8080", "8080/x").replace("http", "ftp"),
        "gateway.url",
        "expected an http:// or https:// URL",
        "ftp://127.0.0.1:8080/x",
        id="gateway-url-scheme",
    ),
    pytest.param(
        GATEWAY + '[server]\nlisten = "localhost:99999"\n',
        "server.listen",
        "port must be 0..65535",
        "localhost:99999",
        id="listen-port",
    ),
    pytest.param(
        GATEWAY + '[server]\nlisten = "::1:8081"\n',
        "server.listen",
        "IPv6 addresses must be in brackets",
        "::1:8081",
        id="listen-ipv6-unbracketed",
    ),
    pytest.param('log_format = "xml"\n' + GATEWAY, "log_format", "'text' or 'json'", "xml", id="log-format"),
    pytest.param(
        'log_level = "loud"\n' + GATEWAY, "log_level", "expected one of debug", "loud", id="log-level"
    ),
    pytest.param(
        GATEWAY + '[[functions]]\nname = "f"\n',
        "functions[0].topics",
        "required key is missing",
        MISSING,
        id="function-without-topics",
    ),
    pytest.param(
        GATEWAY + '[[functions]]\nname = "f"\ntopics = []\n',
        "functions[0].topics",
        "must not be empty",
        [],
        id="function-empty-topics",
    ),
    pytest.param(
        GATEWAY + '[[functions]]\nname = "no spaces"\ntopics = ["t"]\n',
        "functions[0].name",
        "letters, digits",
        "no spaces",
        id="function-bad-name",
    ),
    pytest.param(
        '[[functions]]\nname = "f"\ntopics = ["t"]\n',
        "functions[0].url",
        "no url and no [gateway] to derive one from",
        MISSING,
        id="function-without-url-or-gateway",
    ),
    pytest.param(
        GATEWAY + '[[functions]]\nname = "f"\nurl = "http://f"\ntopics = ["t"]\nasynchronous = true\n',
        "functions[0].asynchronous",
        "asynchronous invocation goes through the gateway",
        True,
        id="function-static-url-async",
    ),
    pytest.param('log_level = "info"\n', "gateway", "nothing to invoke", MISSING, id="nothing-to-invoke"),
    pytest.param(
        GATEWAY + '[[functions]]\nname = "f"\ntopics = ["a"]\n[[functions]]\nname = "f"\ntopics = ["b"]\n',
        "functions[1].name",
        "duplicate function name (also functions[0])",
        "f",
        id="duplicate-function-names",
    ),
    pytest.param(
        GATEWAY + '[[sources]]\ntype = "carrier-pigeon"\n',
        "sources[0].type",
        "unknown source type (known: ",
        "carrier-pigeon",
        id="unknown-source-type",
    ),
    pytest.param(
        GATEWAY + '[[sources]]\nname = "hook"\n',
        "sources[0].type",
        "required key is missing",
        MISSING,
        id="source-without-type",
    ),
    pytest.param(
        GATEWAY + "[[sources]]\ntype = 3\n",
        "sources[0].type",
        "expected a source type name",
        3,
        id="source-type-not-a-string",
    ),
    pytest.param(
        "sources = [1]\n" + GATEWAY,
        "sources[0]",
        "expected a table like [[sources]]",
        1,
        id="source-not-a-table",
    ),
    pytest.param(
        GATEWAY + '[[sources]]\ntype = "webhook"\nnope = true\n',
        "sources[0].nope",
        "unknown key (allowed: asynchronous_invocation, auth_token, decode, hmac_secret, max_body_bytes, "
        "name, signature_algorithm, signature_encoding, signature_header, signature_prefix, "
        "signature_scheme, signature_tolerance, store, type)",
        True,
        id="unknown-webhook-key",
    ),
    pytest.param(
        GATEWAY + '[[sources]]\ntype = "webhook"\nmax_body_bytes = 0\n',
        "sources[0].max_body_bytes",
        "greater than or equal to 1",
        0,
        id="webhook-field-constraint",
    ),
]


@pytest.mark.parametrize(("toml", "location", "message", "value"), BROKEN)
def test_broken_config(tmp_path: Path, toml: str, location: str, message: str, value: object) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, toml), env={})
    problems = problems_of(excinfo)
    assert location in problems, str(excinfo.value)
    problem = problems[location]
    assert message in problem.message
    assert problem.value == value or (value is MISSING and problem.value is MISSING)
    # Rendered form: "<location>: <message> (got <value!r>)".
    line = next(line for line in str(excinfo.value).splitlines() if line.startswith(f"{location}: "))
    assert line == str(problem)


def test_top_level_key_inside_a_section_gets_a_hint(tmp_path: Path) -> None:
    # TOML gotcha: keys after "[gateway]" belong to [gateway], however they are indented.
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, GATEWAY + 'log_level = "debug"\n'), env={})
    message = problems_of(excinfo)["gateway.log_level"].message
    assert "'log_level' is a top-level key: to mean that, move it above the first [section]" in message


def test_unknown_source_type_lists_webhook(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, GATEWAY + '[[sources]]\ntype = "nope"\n'), env={})
    assert "webhook" in problems_of(excinfo)["sources[0].type"].message


def test_all_problems_are_collected(tmp_path: Path) -> None:
    toml = """
        bogus = 1
        [dispatch]
        max_inflight = 0
        retry_on = [42]
        [[functions]]
        name = "f"
        topics = ["t"]
        [[functions]]
        name = "f"
        [[sources]]
        type = "webhook"
        nope = 1
    """
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, toml), env={})
    assert set(problems_of(excinfo)) == {
        "bogus",
        "dispatch.max_inflight",
        "dispatch.retry_on[0]",
        "functions[0].url",
        "functions[1].url",
        "functions[1].topics",
        "functions[1].name",
        "sources[0].nope",
    }
    assert len(str(excinfo.value).splitlines()) == 8


def test_same_function_name_in_different_namespaces_is_allowed() -> None:
    config = validate_config(
        {
            "gateway": {},
            "functions": [
                {"name": "f", "namespace": "a", "topics": ["t"]},
                {"name": "f", "namespace": "b", "topics": ["t"]},
            ],
        }
    )
    assert [f.label for f in config.functions] == ["f.a", "f.b"]


def test_toml_syntax_error_mentions_line(tmp_path: Path) -> None:
    path = write(tmp_path, GATEWAY + "[dispatch]\nmax_inflight 5\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    (problem,) = excinfo.value.problems
    assert problem.location == str(path)
    assert problem.message.startswith("invalid TOML: ")
    assert "line 4" in problem.message
    assert problem.value == "max_inflight 5"  # the offending line


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(path, env={})
    assert str(excinfo.value) == f"{path}: config file not found"


def test_missing_file_from_env(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None, env={"FASTCONN_CONFIG": str(path)})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path, env={})


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[gateway]\nurl = "http://caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


def test_validate_config_raises_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"gateway": {"rebuild_interval": 0}})
    assert list(problems_of(excinfo)) == ["gateway.rebuild_interval"]


def test_model_validate_also_collects_everything() -> None:
    # The friendlier messages and cross-field rules live in the model, not only in load_config.
    with pytest.raises(ValidationError) as excinfo:
        Config.model_validate({"dispatch": {"nope": 1}})
    locs = {err["loc"] for err in excinfo.value.errors()}
    assert locs == {("dispatch", "nope"), ("gateway",)}


# --------------------------------------------------------------------------------------------------
# Pluggable sources
# --------------------------------------------------------------------------------------------------


def test_known_source_types_include_webhook() -> None:
    types_ = known_source_types()
    assert "webhook" in types_
    assert not any(name.startswith("_") for name in types_)
    assert source_config_model("webhook") is WebhookConfig


class _FakeSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["fake-thing"] = "fake-thing"
    depth: int = 1


def test_new_source_needs_only_its_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # A module named after the type (hyphens -> underscores) with CONFIG_MODEL is all it takes.
    module = types.ModuleType("fastconn.sources.fake_thing")
    module.CONFIG_MODEL = _FakeSourceConfig  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastconn.sources.fake_thing", module)

    config = validate_config(
        {"gateway": {}, "sources": [{"type": "fake-thing", "depth": 3}, {"type": "webhook"}]}
    )
    assert config.sources == (_FakeSourceConfig(depth=3), WebhookConfig())

    with pytest.raises(ConfigError) as excinfo:
        validate_config({"gateway": {}, "sources": [{"type": "fake-thing", "dept": 3}]})
    assert "did you mean 'depth'?" in problems_of(excinfo)["sources[0].dept"].message


def test_module_without_config_model_is_not_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastconn.sources.helpers", types.ModuleType("fastconn.sources.helpers"))
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"gateway": {}, "sources": [{"type": "helpers"}]})
    assert problems_of(excinfo)["sources[0].type"].message.startswith("unknown source type (known: ")


def test_source_with_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needsdep.py").write_text("import fastconn_no_such_dependency_xyz\n", encoding="utf-8")
    monkeypatch.setattr(fastconn.sources, "__path__", [*fastconn.sources.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fastconn.sources.needsdep", raising=False)
    importlib.invalidate_caches()

    assert "needsdep" in known_source_types()
    with pytest.raises(ConfigError) as excinfo:
        validate_config({"gateway": {}, "sources": [{"type": "needsdep"}]})
    message = problems_of(excinfo)["sources[0].type"].message
    assert "unavailable" in message
    assert "fastconn_no_such_dependency_xyz" in message


def test_source_config_instances_are_accepted() -> None:
    config = Config(gateway=GatewayConfig(), sources=(WebhookConfig(name="a"),))
    assert config.sources == (WebhookConfig(name="a"),)


# --------------------------------------------------------------------------------------------------
# Basic-auth credentials
# --------------------------------------------------------------------------------------------------


def test_credentials_read_from_secret_mount(tmp_path: Path) -> None:
    (tmp_path / "basic-auth-user").write_text("admin\n", encoding="utf-8")
    (tmp_path / "basic-auth-password").write_text("  hunter2 \n", encoding="utf-8")
    gateway = GatewayConfig(basic_auth=True, secret_mount_path=str(tmp_path))
    assert gateway.credentials() == ("admin", "hunter2")


def test_credentials_none_without_basic_auth(tmp_path: Path) -> None:
    assert GatewayConfig(basic_auth=False, secret_mount_path=str(tmp_path)).credentials() is None


def test_credentials_missing_files(tmp_path: Path) -> None:
    (tmp_path / "basic-auth-user").write_text("admin", encoding="utf-8")
    gateway = GatewayConfig(basic_auth=True, secret_mount_path=str(tmp_path))
    with pytest.raises(ConfigError) as excinfo:
        gateway.credentials()
    (problem,) = excinfo.value.problems
    assert problem.location == "gateway.secret_mount_path"
    assert "basic-auth-password" in problem.message
    assert problem.value == str(tmp_path)


def test_credentials_empty_file(tmp_path: Path) -> None:
    (tmp_path / "basic-auth-user").write_text("\n", encoding="utf-8")
    (tmp_path / "basic-auth-password").write_text("pw", encoding="utf-8")
    with pytest.raises(ConfigError, match="basic-auth-user' is empty"):
        GatewayConfig(basic_auth=True, secret_mount_path=str(tmp_path)).credentials()


# --------------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("1m30s", 90.0),
        ("100ms", 0.1),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("10\u00b5s", 0.00001),  # MICRO SIGN
        ("10\u03bcs", 0.00001),  # GREEK SMALL LETTER MU
        ("500ns", 0.0000005),
        ("2h45m", 9900.0),
        ("1h0m0.5s", 3600.5),
        (".5s", 0.5),
        ("+3s", 3.0),
        ("0", 0.0),
        ("5", 5.0),
        ("0.5", 0.5),
        (" 7s ", 7.0),
        (5, 5.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parse_duration(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1s", "must not be negative"),
        ("-5", "must not be negative"),
        (-1, "must not be negative"),
        (-0.5, "must not be negative"),
        ("30 parsecs", "expected a duration"),
        ("", "expected a duration"),
        ("s", "expected a duration"),
        ("1d", "expected a duration"),
        ("1.2.3s", "expected a duration"),
        ("5 s", "expected a duration"),
        ("1e3", "expected a duration"),
        ("ten seconds", "expected a duration"),
        (float("inf"), "expected a duration"),
        (float("nan"), "expected a duration"),
        (True, "expected a duration"),
        ("9" * 400 + "h", "too large"),
    ],
)
def test_parse_duration_rejects(value: Any, reason: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as excinfo:
        parse_duration(value)
    assert reason in str(excinfo.value)
    assert repr(value) in str(excinfo.value)  # names the offending value


def test_duration_type_in_a_model() -> None:
    class Model(BaseModel):
        wait: Duration

    assert Model(wait="1m").wait == 60.0  # type: ignore[arg-type]
    assert Model(wait=2).wait == 2.0
    with pytest.raises(ValidationError, match="invalid duration"):
        Model(wait=[1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Exception tree
# --------------------------------------------------------------------------------------------------


def test_exception_tree() -> None:
    for cls in (ConfigError, DispatcherClosed, ForkError, RegistryError, SourceError):
        assert issubclass(cls, FastconnError)
    assert issubclass(FastconnError, Exception)


def test_config_error_rendering_and_pickling() -> None:
    error = ConfigError(
        [
            ConfigProblem("dispatch.max_inflight", "must be >= 1", 0),
            ConfigProblem("gateway", "nothing to invoke"),
        ]
    )
    assert str(error) == "dispatch.max_inflight: must be >= 1 (got 0)\ngateway: nothing to invoke"
    clone = pickle.loads(pickle.dumps(error))
    assert clone.problems == error.problems
    assert clone.problems[1].value is MISSING


def test_registry_error_carries_url_and_status() -> None:
    error = RegistryError("listing failed", "http://gw/system/functions", 503)
    assert (str(error), error.url, error.status) == ("listing failed", "http://gw/system/functions", 503)
    clone = pickle.loads(pickle.dumps(error))
    assert (str(clone), clone.url, clone.status) == ("listing failed", "http://gw/system/functions", 503)


@pytest.mark.parametrize("listen", ["0.0.0.0:8081", "[::]:8081"])
def test_async_callbacks_with_a_wildcard_listen_need_a_public_url(listen: str) -> None:
    data = {
        "gateway": {"url": "http://gateway:8080"},
        "server": {"listen": listen},
        "dispatch": {"asynchronous_invocation": True},
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    problems = problems_of(info)
    assert list(problems) == ["server.public_url"]
    assert "set server.public_url" in problems["server.public_url"].message
    # Either fix makes the configuration valid.
    validate_config({**data, "server": {"listen": listen, "public_url": "http://fastconn:8081"}})
    validate_config({**data, "dispatch": {"asynchronous_invocation": True, "async_ack": "on_accept"}})
    validate_config({**data, "dispatch": {}})


ASYNC_CAPABLE_SOURCES = {
    "postgres (wal)": {"type": "postgres", "dsn": "postgresql://fastconn@db/app", "tables": ["orders"]},
    "postgres (notify)": {
        "type": "postgres",
        "mode": "notify",
        "dsn": "postgresql://fastconn@db/app",
        "channels": ["events"],
    },
    "sqs": {"type": "sqs", "queue_urls": ["https://sqs.eu-west-1.amazonaws.com/123456789012/orders"]},
    "sns": {"type": "sns", "topic_arns": ["arn:aws:sns:eu-west-1:123456789012:orders"]},
    "vcenter": {"type": "vcenter", "url": "https://vc.example/sdk", "username": "u", "password": "p"},
    "pushbullet": {"type": "pushbullet", "access_token": "o.token"},
    "cloudevents": {"type": "cloudevents"},
}


@pytest.mark.parametrize("source", ASYNC_CAPABLE_SOURCES.values(), ids=ASYNC_CAPABLE_SOURCES.keys())
def test_every_source_takes_asynchronous_invocation_and_the_public_url_rule_sees_it(
    source: dict[str, Any],
) -> None:
    data = {
        "gateway": {"url": "http://gateway:8080"},
        "server": {"listen": "0.0.0.0:8081"},
        "sources": [{**source, "asynchronous_invocation": True}],
    }
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert list(problems_of(info)) == ["server.public_url"]
    config = validate_config({**data, "server": {"listen": "0.0.0.0:8081", "public_url": "http://fc:8081"}})
    assert getattr(config.sources[0], "asynchronous_invocation", None) is True
    # Off by default.
    plain = validate_config({"gateway": {"url": "http://gateway:8080"}, "sources": [source]})
    assert getattr(plain.sources[0], "asynchronous_invocation", None) is False
