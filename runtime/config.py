"""valrun.toml, parsed by a pure function into frozen values.

Unknown keys are errors that name the key (hypercorn silently drops them; a typo in a limit
should not silently leave the default in force).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from runtime.errors import ConfigError
from runtime.hosts import is_hostname
from sandbox.confine import LAYERS

MIB = 1024 * 1024


def check_bind(address: str) -> None:
    """`HOST:PORT`, `[IPV6]:PORT`, `unix:PATH` or `fd://N`, or a ConfigError naming it.

    Strict where hypercorn is lenient: it serves `127.0.0.1` (no port) on :8000, which
    nobody who wrote that meant.
    """
    if address.startswith("unix:") and len(address) > len("unix:"):
        return
    if address.startswith("fd://") and address[len("fd://") :].isdigit():
        return
    host, colon, port = address.rpartition(":")
    # A bare IPv6 address is ambiguous (which colon ends it?): it needs brackets.
    host_ok = host.endswith("]") and len(host) > 2 if host.startswith("[") else ":" not in host
    if not colon or not host or not host_ok or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"server.bind {address!r} is not an address to listen on: use HOST:PORT "
            "('127.0.0.1:8080', '0.0.0.0:80'), '[::1]:8080', 'unix:/path/to.sock' or 'fd://3'"
        )


@dataclass(frozen=True, slots=True)
class ServerConfig:
    bind: tuple[str, ...] = ("127.0.0.1:8080",)
    api_host: str = "api.localhost"
    web_domain: str = "web.localhost"
    #: `http` or `https`: the scheme used in redirects and val URLs (behind a TLS proxy).
    public_scheme: str = "http"
    #: How long graceful shutdown waits for in-flight requests.
    shutdown_timeout_s: float = 10.0
    #: The Eval API runs arbitrary code as the token's user; without a token it would run
    #: as nobody, with no env. Off unless an operator opts in.
    anonymous_eval: bool = False
    #: Connections the kernel queues before they are accepted (listen(2)); a burst beyond
    #: it waits a second for the client's SYN retry. Capped by net.core.somaxconn.
    backlog: int = 4096

    def __post_init__(self) -> None:
        if not self.bind:
            raise ConfigError("server.bind needs at least one HOST:PORT")
        for address in self.bind:
            check_bind(address)
        if type(self.backlog) is not int or not 1 <= self.backlog <= 65535:
            raise ConfigError("server.backlog must be a whole number from 1 to 65535")
        for name in ("api_host", "web_domain"):
            value = getattr(self, name)
            if not is_hostname(value) or value != value.lower() or value.endswith("."):
                raise ConfigError(
                    f"server.{name} {value!r} must be a lower-case host name, "
                    "without port or trailing dot"
                )
        api, web = self.api_host, self.web_domain
        if api == web or api.endswith("." + web) or web.endswith("." + api):
            # SPEC §3: a val's HTML must never be same-site with the API host, or its
            # scripts get the API host's cookies (the Val Town exploit in seeds/002).
            raise ConfigError(
                f"server.web_domain {web!r} must not be the API host {api!r} nor a parent or "
                "child of it; use a separate registrable domain (e.g. api.example.com and "
                "example-vals.net)"
            )
        if self.public_scheme not in ("http", "https"):
            raise ConfigError("server.public_scheme must be 'http' or 'https'")
        if not self.shutdown_timeout_s >= 0:
            raise ConfigError("server.shutdown_timeout_s must be zero or more")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///valrun.db"
    #: Invocation records kept per val; older ones are deleted as new ones arrive.
    max_runs_per_val: int = 100
    #: All invocation records together (their logs and error messages) stay under this;
    #: the oldest, whichever val they belong to, go first.
    max_runs_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        if not self.max_runs_per_val > 0:
            raise ConfigError("store.max_runs_per_val must be positive")
        if not self.max_runs_bytes > 0:
            raise ConfigError("store.max_runs_bytes must be positive")
        if not self.url.startswith("sqlite:///"):
            raise ConfigError(f"store.url {self.url!r}: only sqlite:///PATH is supported so far")

    @property
    def sqlite_path(self) -> str:
        return self.url.removeprefix("sqlite:///")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    wall_time_s: float = 10.0
    memory_mb: int = 256
    cpu_time_s: int = 10
    worker_cpu_time_s: int = 600
    max_request_body_bytes: int = 2 * MIB
    #: A request's header block (request line and header lines), and how many lines.
    max_request_header_bytes: int = 64 * 1024
    max_request_headers: int = 100
    max_response_body_bytes: int = 5 * MIB
    max_response_headers: int = 100
    max_response_header_bytes: int = 64 * 1024
    max_log_bytes: int = 64 * 1024
    max_source_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0:  # `not >`: NaN is refused too
                raise ConfigError(f"limits.{f.name} must be positive")


@dataclass(frozen=True, slots=True)
class PoolConfig:
    #: Generic workers kept forked, confined and ready for whichever val is called next.
    prewarm_workers: int = 4
    #: Warm workers one val version may have, each serving one request at a time.
    max_workers_per_val: int = 2
    #: Requests waiting for one val version's workers before new ones get 503.
    max_queue_per_val: int = 64
    #: Warm workers kept across all vals; the least recently used idle one goes first.
    max_workers: int = 64
    #: A worker retires after this many requests (bounds slow leaks in module state)...
    max_requests_per_worker: int = 10000
    #: ...or once its resident memory passes this (checked every 32 requests).
    max_worker_rss_mb: int = 128
    #: A request still running after this long runs at idle CPU priority until it answers,
    #: so a val spinning on CPU slows the others as little as possible.
    demote_after_s: float = 0.05
    #: A warm worker idle this long exits.
    idle_timeout_s: float = 300.0
    #: A new worker must load its val within this time.
    load_timeout_s: float = 10.0
    #: Let workers write to the service's stderr (for debugging the sandbox itself).
    inherit_worker_stderr: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type != "bool" and not getattr(self, f.name) > 0:
                raise ConfigError(f"pool.{f.name} must be positive")


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    #: Confinement layers valrun refuses to start without (SPEC §8). Every layer the probe
    #: finds is applied whether required or not; requiring one turns "unavailable" into a
    #: refusal to start. The default is everything these machines support. `drop_user` is
    #: met without a drop when the service does not run as root.
    require: tuple[str, ...] = LAYERS
    #: The unprivileged user (and group) workers drop to when the service runs as root.
    worker_uid: int = 65534

    def __post_init__(self) -> None:
        unknown = sorted(set(self.require) - set(LAYERS))
        if unknown:
            raise ConfigError(
                f"sandbox.require names unknown layers {unknown}; known: {', '.join(LAYERS)}"
            )
        if not 0 < self.worker_uid < 2**31:
            raise ConfigError("sandbox.worker_uid must be a positive uid")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


T = TypeVar("T")


def _coerce(section: str, key: str, expected: object, value: object) -> object:
    # Types are checked by hand, not by a schema library: there are a dozen keys.
    if expected == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{section}.{key} must be a string or a list of strings")
        return tuple(value)
    if expected == "float" and type(value) in (int, float):
        return float(value)  # type: ignore[arg-type]
    if expected == "int" and type(value) is int:
        return value
    if expected == "bool" and isinstance(value, bool):
        return value
    if expected == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"{section}.{key} must be {expected}, not {type(value).__name__}")


def _section(cls: type[T], section: str, raw: object) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {section}.{key}; known keys: {', '.join(sorted(known))}"
            )
        values[key] = _coerce(section, key, known[key].type, value)
    return cls(**values)


def parse_config(raw: Mapping[str, object]) -> Config:
    """valrun.toml as a mapping -> Config. Raises ConfigError naming the offending key."""
    known = [f.name for f in fields(Config)]
    for name in raw:
        if name not in known:
            raise ConfigError(f"unknown section [{name}]; known: {', '.join(known)}")
    return Config(
        server=_section(ServerConfig, "server", raw.get("server", {})),
        store=_section(StoreConfig, "store", raw.get("store", {})),
        limits=_section(LimitsConfig, "limits", raw.get("limits", {})),
        pool=_section(PoolConfig, "pool", raw.get("pool", {})),
        sandbox=_section(SandboxConfig, "sandbox", raw.get("sandbox", {})),
    )


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(raw)


def with_bind(config: Config, bind: tuple[str, ...]) -> Config:
    return replace(config, server=replace(config.server, bind=bind))
