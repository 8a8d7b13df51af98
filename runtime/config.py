"""valrun.toml, parsed by a pure function into frozen values.

Unknown keys are errors that name the key (hypercorn silently drops them; a typo in a limit
should not silently leave the default in force).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from runtime.egress import EgressPolicy
from runtime.errors import ConfigError
from runtime.hosts import is_hostname
from runtime.pgdb import POSTGRES_SCHEMES, redact
from sandbox.confine import LAYERS
from sandbox.limits import WorkerLimits
from sandbox.messages import MAX_PIPELINE_WINDOW
from sandbox.wire import DEFAULT_MAX_BODY_BYTES

MIB = 1024 * 1024
MIN_SECRET_KEY_CHARS = 32
SECRET_KEY_ENV = "VALRUN_SECRET_KEY"
#: More front-end processes than this is a typo, not a machine.
MAX_PROCESSES = 256


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
    #: Addresses (or networks, `10.0.0.0/8`) of the reverse proxies whose `X-Forwarded-For`
    #: and `Forwarded` headers name the client. From anyone else those headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    #: The one header trusted proxies name the client in: `x-forwarded-for` (nginx, Caddy)
    #: or `forwarded` (RFC 7239).
    forwarded_header: str = "x-forwarded-for"
    #: Connections the kernel queues before they are accepted (listen(2)); a burst beyond
    #: it waits a second for the client's SYN retry. Capped by net.core.somaxconn.
    backlog: int = 4096
    #: Connections open at once, all clients together, and from one client address
    #: (runtime.frontdoor): beyond either, a new connection is closed as soon as it is
    #: accepted, so slow clients cannot use up the process's file descriptors.
    max_connections: int = 4096
    max_connections_per_address: int = 256
    #: A request's body must arrive within this long of its head (408 body_timeout); its
    #: head within `keep_alive_timeout_s` of the connection's start or of the last answer.
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0
    #: Cleartext HTTP/2 (prior knowledge, or `Upgrade: h2c`). Off: such a connection gets
    #: 400 h2c_refused; HTTP/2 negotiated over TLS (ALPN) is unaffected.
    h2c: bool = False
    #: Front-end processes serving the listening sockets, each with its own worker pool,
    #: fork servers and store connections (docs/deploy.md §3). 1: one process, no supervisor.
    processes: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    #: After SIGTERM, /healthz answers 503 "draining" for this long while requests are served
    #: as usual, so a load balancer's health check takes the node out before it stops
    #: accepting (docs/deploy.md §4). 0: stop accepting at once.
    drain_s: float = 0.0

    def __post_init__(self) -> None:
        if type(self.processes) is not int or not 1 <= self.processes <= MAX_PROCESSES:
            raise ConfigError(f"server.processes must be a whole number from 1 to {MAX_PROCESSES}")
        for name in ("max_connections", "max_connections_per_address"):
            if type(getattr(self, name)) is not int or not getattr(self, name) > 0:
                raise ConfigError(f"server.{name} must be a positive whole number")
        if self.max_connections_per_address > self.max_connections:
            raise ConfigError(
                "server.max_connections_per_address must not be over server.max_connections"
            )
        for name in ("body_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"server.{name} must be positive")
        if self.forwarded_header not in ("x-forwarded-for", "forwarded"):
            raise ConfigError("server.forwarded_header must be 'x-forwarded-for' or 'forwarded'")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"server.trusted_proxies: {proxy!r} is not an IP address or network "
                    "(like 127.0.0.1 or 10.0.0.0/8)"
                ) from None
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
            # docs/contract.md §3.6: a val's HTML must never be same-site with the API host, or
            # its scripts get the API host's cookies (the Val Town exploit, docs/design.md §2.8).
            raise ConfigError(
                f"server.web_domain {web!r} must not be the API host {api!r} nor a parent or "
                "child of it; use a separate registrable domain (e.g. api.example.com and "
                "example-vals.net)"
            )
        if self.public_scheme not in ("http", "https"):
            raise ConfigError("server.public_scheme must be 'http' or 'https'")
        if not self.shutdown_timeout_s >= 0:
            raise ConfigError("server.shutdown_timeout_s must be zero or more")
        if not 0 <= self.drain_s <= 600:
            raise ConfigError("server.drain_s must be from 0 to 600 seconds")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = "sqlite:///valrun.db"
    #: Invocation records kept per val; older ones are deleted as new ones arrive.
    max_runs_per_val: int = 100
    #: When set (here or in $VALRUN_SECRET_KEY), env values are encrypted at rest with a key
    #: derived from it (runtime.secrets). Empty: stored as plain text.
    secret_key: str = field(default="", repr=False)
    #: All invocation records together (their logs and error messages) stay under this;
    #: the oldest, whichever val they belong to, go first.
    max_runs_bytes: int = 256 * MIB

    def __post_init__(self) -> None:
        if not self.max_runs_per_val > 0:
            raise ConfigError("store.max_runs_per_val must be positive")
        check_secret_key(self.secret_key, "store.secret_key")
        if not self.max_runs_bytes > 0:
            raise ConfigError("store.max_runs_bytes must be positive")
        if not self.url.startswith(("sqlite:///", *POSTGRES_SCHEMES)):
            raise ConfigError(
                f"store.url {redact(self.url)!r}: use sqlite:///PATH or "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
            )

    @property
    def postgres(self) -> bool:
        return self.url.startswith(POSTGRES_SCHEMES)

    @property
    def sqlite_path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    @property
    def location(self) -> str:
        """What `Store` opens: the SQLite file's path, or the PostgreSQL URL."""
        return self.url if self.postgres else self.sqlite_path


@dataclass(frozen=True, slots=True)
class LimitsConfig(WorkerLimits):
    """`[limits]`: the worker's own limits (inherited: memory, CPU, log, response body,
    source, open files), and those the front end enforces."""

    wall_time_s: float = 10.0
    max_request_body_bytes: int = 2 * MIB
    #: A request's header block (request line and header lines), and how many lines (each
    #: name is also hashed in a val's worker): over either, 431 before any worker is used.
    max_request_header_bytes: int = 64 * 1024
    max_request_headers: int = 100
    max_response_headers: int = 100
    max_response_header_bytes: int = 64 * 1024

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
    #: ...or once its resident memory passes this (looked at after every request).
    max_worker_rss_mb: int = 128
    #: Fair shares between users (docs/fairness.md): warm workers one user's vals may hold
    #: (busy, idle or loading; at most max_workers) ...
    max_workers_per_user: int = 16
    #: ... their requests waiting for a worker, all their vals together (then 429) ...
    max_queued_per_user: int = 64
    #: ... their Evals running at once (then 429) ...
    max_evals_per_user: int = 4
    #: ... and the new workers their vals may start per second (a burst of as many at once):
    #: more wait their turn, within load_timeout_s, or get 429. A cold start is CPU (fork,
    #: confine, load), and a tenant cycling through vals must not spend it all.
    cold_starts_per_user_per_s: float = 20.0
    #: The resident memory of all workers together; over it, the largest worker is stopped
    #: (looked at every quarter second, and before a new worker is made).
    max_total_worker_mib: int = 4096
    #: A request still running after this long runs at idle CPU priority until it answers,
    #: so a val spinning on CPU slows the others as little as possible.
    demote_after_s: float = 0.05
    #: Requests one warm worker may have in flight (sent, answered in order; 1: one at a
    #: time). Only a worker whose recent requests took under `pipeline_below_s` on average,
    #: and whose current one has not run longer, is sent more (docs/design.md §7.1).
    pipeline_window: int = 4
    pipeline_below_s: float = 0.05
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
        if self.pipeline_window > MAX_PIPELINE_WINDOW:
            raise ConfigError(f"pool.pipeline_window must be at most {MAX_PIPELINE_WINDOW}")


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    #: Confinement layers valrun refuses to start without (docs/contract.md §11.5). Every layer
    #: the probe finds is applied whether required or not; requiring one turns "unavailable" into a
    #: refusal to start. The default is everything these machines support. `drop_user` is
    #: met without a drop when the service does not run as root.
    require: tuple[str, ...] = LAYERS
    #: The unprivileged user (and group) workers drop to when the service runs as root.
    worker_uid: int = 65534
    #: Each user's workers come from a fork server of their own, so no two users' vals share
    #: a hash secret or a memory layout (runtime.tenants). False: one fork server for all.
    fork_server_per_user: bool = True
    #: Fork servers kept running for users who have no worker left.
    max_idle_fork_servers: int = 8

    def __post_init__(self) -> None:
        unknown = sorted(set(self.require) - set(LAYERS))
        if unknown:
            raise ConfigError(
                f"sandbox.require names unknown layers {unknown}; known: {', '.join(LAYERS)}"
            )
        if not 0 < self.worker_uid < 2**31:
            raise ConfigError("sandbox.worker_uid must be a positive uid")
        if self.max_idle_fork_servers < 0:
            raise ConfigError("sandbox.max_idle_fork_servers must be zero or more")


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """`[fetch]`: outbound HTTP for vals (`std.fetch`), made by the front end under the egress
    policy of `runtime.egress`."""

    enabled: bool = True
    #: Networks (CIDRs) exempt from the block on non-public addresses; none by default.
    allow_networks: tuple[str, ...] = ()
    #: Host names refused outright (and their subdomains).
    deny_hosts: tuple[str, ...] = ()
    max_requests_per_invocation: int = 50
    #: The response body a fetch may receive; a larger one fails the fetch.
    max_response_bytes: int = 5 * MIB
    #: A fetch's time limit (a val may ask for less), never beyond the val's remaining time.
    timeout_s: float = 10.0
    #: Fetches one user's vals may have in flight at once; more wait for a slot.
    max_concurrent_per_user: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type not in ("bool", "tuple[str, ...]") and not getattr(self, f.name) > 0:
                raise ConfigError(f"fetch.{f.name} must be positive")
        if self.max_response_bytes > DEFAULT_MAX_BODY_BYTES:
            # The response travels to the worker as one frame body.
            raise ConfigError(f"fetch.max_response_bytes must be at most {DEFAULT_MAX_BODY_BYTES}")
        try:
            EgressPolicy.from_config(self.allow_networks, self.deny_hosts)
        except ValueError as exc:
            raise ConfigError(f"fetch.allow_networks: {exc}") from None

    def policy(self) -> EgressPolicy:
        return EgressPolicy.from_config(self.allow_networks, self.deny_hosts)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """`[storage]`: each user's blob store and SQL database (runtime.storage)."""

    #: Where the storage lives; empty: a directory beside the store's database
    #: (`valrun.db` -> `valrun-data/`).
    data_dir: str = ""
    #: Blob bytes (keys and values) a user may keep.
    max_user_bytes: int = 100 * MIB
    #: One blob value. A value travels to the val in one message, so the smaller of this and
    #: limits.max_response_body_bytes applies.
    max_value_bytes: int = 5 * MIB
    #: One user's SQL database file.
    max_sql_bytes: int = 100 * MIB
    #: A SQL call (one statement or one batch) is interrupted after this long, or when the
    #: val's own time is up, whichever comes first.
    sql_timeout_s: float = 2.0
    #: SQL calls running at once, all users together (each holds a thread); one user's
    #: calls run one at a time.
    sql_threads: int = 4
    #: Storage calls of one user waiting for their turn; more are refused (`busy`).
    max_waiting_per_user: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type != "str" and not getattr(self, f.name) > 0:
                raise ConfigError(f"storage.{f.name} must be positive")
        if self.max_value_bytes > self.max_user_bytes:
            raise ConfigError("storage.max_value_bytes must not be over storage.max_user_bytes")

    def data_path(self, store_path: str) -> Path:
        if self.data_dir:
            return Path(self.data_dir)
        store = Path(store_path)
        return store.with_name(store.stem + "-data")


@dataclass(frozen=True, slots=True)
class ScheduleConfig:
    """Scheduled vals (docs/schedules.md)."""

    #: Run schedules on this node. Off: schedules are kept and served by the API, and other
    #: nodes on the same store still run them.
    enabled: bool = True
    #: The shortest schedule a user may set (every_s; a cron expression's gaps). Lower it only
    #: for tests and on a machine you own: each tick is a full invocation.
    min_interval_s: int = 60
    #: Scheduled runs at once on this node, so that schedules cannot starve web traffic. Vals
    #: cannot wait on the network, so runs are CPU work, and a herd of them is mostly cold
    #: starts, which the one fork server makes one at a time: more slots queue runs in the
    #: pool without running more of them (docs/schedules.md, "Measured").
    max_concurrent: int = 4
    #: Scheduled runs of one user's vals at once (on the store, across nodes); their further
    #: due ticks wait, so one tenant cannot take all of max_concurrent.
    max_concurrent_per_user: int = 2
    #: Vals with a schedule per user.
    max_per_user: int = 50

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type != "bool" and not getattr(self, f.name) > 0:
                raise ConfigError(f"schedule.{f.name} must be positive")


@dataclass(frozen=True, slots=True)
class QuotasConfig:
    """`[quotas]`: what one user may keep in the store (runtime.quotas). Blob and SQL bytes
    are `[storage]`'s; val code is bounded by max_vals x max_versions_per_val x
    limits.max_source_bytes."""

    max_vals: int = 1000
    #: Versions kept per val: a save beyond it drops the oldest (never the latest).
    max_versions_per_val: int = 100
    max_env_keys: int = 100
    #: Keys and values of one user's env, in UTF-8; the env must also fit in the message
    #: that loads a worker, whatever this says (runtime.quotas.check_env_fits).
    max_env_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or not value > 0:
                raise ConfigError(f"quotas.{f.name} must be a positive whole number")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    #: With a PostgreSQL store, the storage is there too (runtime.pg_storage): data_dir is
    #: SQLite's only.
    storage: StorageConfig = field(default_factory=StorageConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)


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
        fetch=_section(FetchConfig, "fetch", raw.get("fetch", {})),
        storage=_section(StorageConfig, "storage", raw.get("storage", {})),
        schedule=_section(ScheduleConfig, "schedule", raw.get("schedule", {})),
        quotas=_section(QuotasConfig, "quotas", raw.get("quotas", {})),
    )


def load_config(path: str | Path | None) -> Config:
    """The config in `path` (the defaults when None), with a relative database path taken
    as relative to the file's folder, so a service started from any directory finds it."""
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return resolve_store_path(parse_config(raw), Path(path).parent)


def resolve_store_path(config: Config, base: Path) -> Config:
    """`config` with its SQLite path made absolute against `base`."""
    path = Path(config.store.sqlite_path)
    if config.store.postgres or path.is_absolute():
        return config
    url = "sqlite:///" + str((base / path).resolve())
    return replace(config, store=replace(config.store, url=url))


def check_secret_key(key: str, where: str) -> str:
    """`key` if it is empty (no encryption) or long enough to be a secret."""
    if key and len(key) < MIN_SECRET_KEY_CHARS:
        raise ConfigError(
            f"{where} must be at least {MIN_SECRET_KEY_CHARS} characters "
            "(make one with: openssl rand -base64 32)"
        )
    return key


def with_secret_key_from_env(config: Config, environ: Mapping[str, str] = os.environ) -> Config:
    """$VALRUN_SECRET_KEY, when set, is the secret key (it keeps the key out of the file)."""
    key = check_secret_key(environ.get(SECRET_KEY_ENV, ""), f"${SECRET_KEY_ENV}")
    return replace(config, store=replace(config.store, secret_key=key)) if key else config


def with_bind(config: Config, bind: tuple[str, ...]) -> Config:
    return replace(config, server=replace(config.server, bind=bind))
