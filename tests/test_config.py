"""valrun.toml parsing (docs/contract.md §12.1): defaults, types, unknown keys, host rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.config import (
    Config,
    LimitsConfig,
    PoolConfig,
    ServerConfig,
    StoreConfig,
    load_config,
    parse_config,
    resolve_store_path,
)
from runtime.errors import ConfigError


def test_empty_config_is_the_defaults() -> None:
    config = parse_config({})
    assert config == Config()
    assert config.server.bind == ("127.0.0.1:8080",)
    assert (config.server.api_host, config.server.web_domain) == ("api.localhost", "web.localhost")
    assert config.store.url == "sqlite:///valrun.db"
    # docs/contract.md §7 defaults.
    assert config.limits.wall_time_s == 10.0
    assert config.limits.memory_mb == 256
    assert config.limits.max_request_body_bytes == 2 * 1024 * 1024
    assert config.limits.max_response_body_bytes == 5 * 1024 * 1024
    assert config.limits.max_response_headers == 100
    assert config.limits.max_response_header_bytes == 64 * 1024
    assert config.limits.max_log_bytes == 64 * 1024


def test_empty_sections_are_the_defaults() -> None:
    assert parse_config({"server": {}, "store": {}, "limits": {}, "pool": {}}) == Config()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            {"server": {"bind": ["0.0.0.0:80", "[::]:80"]}},
            Config(server=ServerConfig(bind=("0.0.0.0:80", "[::]:80"))),
            id="bind-list",
        ),
        pytest.param(
            {"server": {"bind": "0.0.0.0:80"}},
            Config(server=ServerConfig(bind=("0.0.0.0:80",))),
            id="bind-bare-string",
        ),
        pytest.param(
            {"server": {"api_host": "api.example.com", "web_domain": "example-vals.net"}},
            Config(server=ServerConfig(api_host="api.example.com", web_domain="example-vals.net")),
            id="hosts",
        ),
        pytest.param(
            {"server": {"public_scheme": "https", "shutdown_timeout_s": 3}},
            Config(server=ServerConfig(public_scheme="https", shutdown_timeout_s=3.0)),
            id="scheme-and-int-for-float",
        ),
        pytest.param(
            {"store": {"url": "sqlite:////var/lib/valrun/valrun.db"}},
            Config(store=StoreConfig(url="sqlite:////var/lib/valrun/valrun.db")),
            id="store",
        ),
        pytest.param(
            {"limits": {"wall_time_s": 2.5, "memory_mb": 512, "max_log_bytes": 1024}},
            Config(limits=LimitsConfig(wall_time_s=2.5, memory_mb=512, max_log_bytes=1024)),
            id="limits",
        ),
        pytest.param(
            {"limits": {"wall_time_s": 3}},
            Config(limits=LimitsConfig(wall_time_s=3.0)),
            id="limits-int-for-float",
        ),
        pytest.param(
            {"pool": {"max_workers": 8, "idle_timeout_s": 1.5, "inherit_worker_stderr": True}},
            Config(pool=PoolConfig(max_workers=8, idle_timeout_s=1.5, inherit_worker_stderr=True)),
            id="pool",
        ),
    ],
)
def test_each_section_parses(raw: dict[str, object], expected: Config) -> None:
    assert parse_config(raw) == expected


def test_int_for_a_float_key_becomes_a_float() -> None:
    value = parse_config({"limits": {"wall_time_s": 3}}).limits.wall_time_s
    assert type(value) is float


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        pytest.param({"server": {"bnd": "x:1"}}, "server.bnd", id="server"),
        pytest.param({"store": {"path": "x.db"}}, "store.path", id="store"),
        pytest.param({"limits": {"wal_time_s": 1}}, "limits.wal_time_s", id="limits"),
        pytest.param({"pool": {"max_worker": 1}}, "pool.max_worker", id="pool"),
        pytest.param(
            {"limits": {"memory_mb": 128, "Memory_mb": 128}}, "limits.Memory_mb", id="case"
        ),
    ],
)
def test_unknown_key_is_an_error_naming_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config(raw)


@pytest.mark.parametrize("section", ["serve", "limit", "Server", "worker"])
def test_unknown_section_is_an_error_naming_it(section: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(section)):
        parse_config({section: {}})


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        pytest.param({"limits": {"memory_mb": "256"}}, "limits.memory_mb", id="string-for-int"),
        pytest.param({"limits": {"memory_mb": True}}, "limits.memory_mb", id="bool-for-int"),
        pytest.param({"limits": {"memory_mb": 256.0}}, "limits.memory_mb", id="float-for-int"),
        pytest.param({"limits": {"wall_time_s": "10"}}, "limits.wall_time_s", id="str-for-float"),
        pytest.param({"limits": {"wall_time_s": True}}, "limits.wall_time_s", id="bool-for-flt"),
        pytest.param({"pool": {"max_workers": False}}, "pool.max_workers", id="bool-for-pool-int"),
        pytest.param(
            {"pool": {"inherit_worker_stderr": 1}}, "pool.inherit_worker_stderr", id="int-for-bool"
        ),
        pytest.param(
            {"pool": {"inherit_worker_stderr": "yes"}},
            "pool.inherit_worker_stderr",
            id="str-for-bool",
        ),
        pytest.param({"server": {"api_host": 1}}, "server.api_host", id="int-for-str"),
        pytest.param({"server": {"bind": 8080}}, "server.bind", id="int-for-bind"),
        pytest.param({"server": {"bind": ["a:1", 2]}}, "server.bind", id="list-with-int-bind"),
        pytest.param({"store": {"url": ["sqlite:///x"]}}, "store.url", id="list-for-str"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(named)):
        parse_config(raw)


@pytest.mark.parametrize("section", ["server", "store", "limits", "pool"])
@pytest.mark.parametrize("value", [1, "x", ["a"]])
def test_section_that_is_not_a_table_is_an_error(section: str, value: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(section)):
        parse_config({section: value})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("limits", "wall_time_s", 0),
        ("limits", "wall_time_s", -1.5),
        ("limits", "wall_time_s", float("nan")),
        ("limits", "memory_mb", 0),
        ("limits", "memory_mb", -256),
        ("limits", "cpu_time_s", 0),
        ("limits", "worker_cpu_time_s", 0),
        ("limits", "max_request_body_bytes", 0),
        ("limits", "max_response_body_bytes", -1),
        ("limits", "max_response_headers", 0),
        ("limits", "max_response_header_bytes", 0),
        ("limits", "max_log_bytes", 0),
        ("limits", "max_source_bytes", 0),
        ("pool", "max_queue_per_val", 0),
        ("pool", "max_workers", 0),
        ("pool", "idle_timeout_s", 0.0),
        ("pool", "idle_timeout_s", float("nan")),
        ("pool", "load_timeout_s", -1),
        ("server", "shutdown_timeout_s", -1),
    ],
)
def test_non_positive_limit_is_an_error_naming_the_key(
    section: str, key: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{section}.{key}")):
        parse_config({section: {key: value}})


def test_bind_needs_an_address() -> None:
    with pytest.raises(ConfigError, match=re.escape("server.bind")):
        parse_config({"server": {"bind": []}})


@pytest.mark.parametrize("scheme", ["ftp", "HTTP", ""])
def test_public_scheme_is_http_or_https(scheme: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("server.public_scheme")):
        parse_config({"server": {"public_scheme": scheme}})


@pytest.mark.parametrize(
    ("api_host", "web_domain"),
    [
        pytest.param("api.localhost", "api.localhost", id="same"),
        pytest.param("api.localhost", "localhost", id="web-is-parent"),
        pytest.param("api.example.com", "example.com", id="web-is-parent-2"),
        pytest.param("api.localhost", "vals.api.localhost", id="web-is-child"),
        pytest.param("api.localhost", "a.b.api.localhost", id="web-is-grandchild"),
        pytest.param("localhost", "web.localhost", id="api-is-parent"),
        pytest.param("api.web.localhost", "web.localhost", id="api-is-child"),
    ],
)
def test_web_domain_same_site_with_api_host_is_refused(api_host: str, web_domain: str) -> None:
    raw = {"server": {"api_host": api_host, "web_domain": web_domain}}
    with pytest.raises(ConfigError, match=re.escape("separate registrable domain")):
        parse_config(raw)


@pytest.mark.parametrize(
    ("api_host", "web_domain"),
    [
        pytest.param("api.localhost", "web.localhost", id="siblings"),
        pytest.param("api.example.com", "example-vals.net", id="separate-domains"),
        pytest.param("api.localhost", "xapi.localhost", id="suffix-without-dot"),
        pytest.param("pi.localhost", "api.localhost", id="api-is-suffix-of-web"),
    ],
)
def test_web_domain_apart_from_api_host_is_allowed(api_host: str, web_domain: str) -> None:
    server = parse_config({"server": {"api_host": api_host, "web_domain": web_domain}}).server
    assert (server.api_host, server.web_domain) == (api_host, web_domain)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("api_host", "API.localhost"),
        ("api_host", "api.Localhost"),
        ("web_domain", "Web.localhost"),
        ("web_domain", "WEB.LOCALHOST"),
        ("api_host", "api.localhost."),
        ("web_domain", "web.localhost."),
    ],
)
def test_host_names_must_be_lower_case_and_normalized(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"server.{key}")):
        parse_config({"server": {key: value}})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param("api_host", "", id="api-empty"),
        pytest.param("api_host", "api.localhost:8080", id="api-with-port"),
        pytest.param("api_host", "api localhost", id="api-with-space"),
        pytest.param("web_domain", "", id="web-empty"),
        pytest.param("web_domain", "web.localhost:8080", id="web-with-port"),
        pytest.param("web_domain", "*.web.localhost", id="web-wildcard"),
    ],
)
def test_host_names_that_no_host_header_can_match_are_refused(key: str, value: str) -> None:
    # route_host compares against the bare, validated host name: these would never match.
    with pytest.raises(ConfigError, match=re.escape(f"server.{key}")):
        parse_config({"server": {key: value}})


@pytest.mark.parametrize(
    "url", ["mysql://x", "sqlite://relative.db", "valrun.db", "postgresql:/x", "pg://u:pw@h/d"]
)
def test_store_url_that_is_not_supported_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=re.escape("store.url")) as caught:
        parse_config({"store": {"url": url}})
    assert ":pw@" not in str(caught.value)


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_a_postgres_store_needs_no_storage_directory(scheme: str, tmp_path: Path) -> None:
    url = f"{scheme}://valrun:pw@db.internal:5432/valrun"
    config = parse_config({"store": {"url": url}})  # the storage lives in PostgreSQL too
    assert config.store.postgres
    assert config.store.location == url
    assert resolve_store_path(config, tmp_path) == config  # a URL is not a relative path


def test_load_config_reads_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "valrun.toml"
    path.write_text(
        """
[server]
bind = ["127.0.0.1:9000"]
api_host = "api.example.com"
web_domain = "example-vals.net"

[store]
url = "sqlite:///data/valrun.db"

[limits]
wall_time_s = 5
max_log_bytes = 4096

[pool]
max_workers = 4
inherit_worker_stderr = true
""",
        encoding="utf-8",
    )
    assert load_config(path) == Config(
        server=ServerConfig(
            bind=("127.0.0.1:9000",), api_host="api.example.com", web_domain="example-vals.net"
        ),
        # Relative to the config file's folder, not to wherever valrun was started.
        store=StoreConfig(url=f"sqlite:///{tmp_path / 'data' / 'valrun.db'}"),
        limits=LimitsConfig(wall_time_s=5.0, max_log_bytes=4096),
        pool=PoolConfig(max_workers=4, inherit_worker_stderr=True),
    )


def test_load_config_without_a_path_is_the_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("[limits\nwall_time_s = 1\n", "not valid TOML", id="unclosed-table"),
        pytest.param("[limits]\nwall_time_s = \n", "not valid TOML", id="missing-value"),
        pytest.param("[limits]\nwall_time_s = 1\nwall_time_s = 2\n", "not valid TOML", id="dup"),
        pytest.param("[limits]\nwal_time_s = 1\n", "limits.wal_time_s", id="unknown-key"),
        pytest.param("[limits]\nwall_time_s = nan\n", "limits.wall_time_s", id="nan"),
    ],
)
def test_load_config_on_a_bad_file_is_a_config_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "valrun.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(path)


def test_load_config_on_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("cannot read config")):
        load_config(tmp_path / "nope.toml")
