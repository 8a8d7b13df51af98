"""Operating valrun: health probes by IP, client addresses behind proxies, the access line,
backups of a live database, schema versions, and env values sealed at rest."""

from __future__ import annotations

import base64
import io
import logging
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from runtime import accesslog
from runtime.accesslog import PIPE_BUF, LineBatchHandler, access_line, escape
from runtime.config import ServerConfig
from runtime.errors import ConfigError
from runtime.forwarded import client_address, parse_networks
from runtime.schema import MIGRATIONS, SCHEMA_VERSION, SchemaError
from runtime.sealing import Sealer, SealError
from runtime.store import Store
from tests.helpers import (
    AccessLines,
    Service,
    capture_access_lines,
    cli,
    configured_service,
    write_config,
)

KEY = "k" * 32
OTHER_KEY = "o" * 32

# Health probes


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "10.0.0.5:8080"},  # a load balancer probing by address
        {"host": "some-other-name.example"},
        {"host": "api.localhost"},
    ],
)
async def test_healthz_answers_on_any_host_but_a_vals(
    service: Service, headers: dict[str, str]
) -> None:
    response = await service.client.get("/healthz", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


async def test_healthz_answers_a_request_without_host(service: Service) -> None:
    # HTTP/1.0 has no Host; some probes send none.
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", service.port)
        async with stream:
            await stream.send_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.0 200") or answer.startswith(b"HTTP/1.1 200"), answer[:80]
    assert b'"status":"ok"' in answer


async def test_a_vals_own_healthz_path_stays_the_vals(service: Service) -> None:
    await service.put_val("app", "def app(req):\n    return 'mine: ' + req.path")
    with trio.fail_after(15):
        response = await service.web("alice", "app", "/healthz")
    assert response.text == "mine: /healthz"


# Client addresses and the access line (pure)

PROXIES = parse_networks(["127.0.0.1", "10.0.0.0/8"])


def headers(name: str, value: str) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode())]


@pytest.mark.parametrize(
    ("peer", "header", "value", "client"),
    [
        # An untrusted peer's header is ignored, whatever it says.
        ("203.0.113.9", "x-forwarded-for", "1.2.3.4", "203.0.113.9"),
        ("127.0.0.1", "x-forwarded-for", "203.0.113.7", "203.0.113.7"),
        # A client that forges a hop: the right-most untrusted one is the client.
        ("127.0.0.1", "x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),
        ("127.0.0.1", "x-forwarded-for", "", "127.0.0.1"),
        ("127.0.0.1", "x-forwarded-for", "10.0.0.3", "10.0.0.3"),
        ("127.0.0.1", "x-forwarded-for", "garbage, 203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", "x-forwarded-for", "203.0.113.7, garbage", "127.0.0.1"),
        ("127.0.0.1", "forwarded", 'for=203.0.113.7;proto=https, for="10.0.0.2:80"', "203.0.113.7"),
        ("127.0.0.1", "forwarded", 'for="[2001:db8::1]:4711"', "2001:db8::1"),
        ("127.0.0.1", "forwarded", "for=unknown", "127.0.0.1"),
    ],
)
def test_client_address_trusts_only_configured_proxies(
    peer: str, header: str, value: str, client: str
) -> None:
    assert client_address(peer, headers(header, value), PROXIES, header) == client


def test_only_the_configured_forwarding_header_is_read() -> None:
    # The proxy sets X-Forwarded-For and passes the client's own Forwarded along untouched.
    sent = [(b"forwarded", b"for=6.6.6.6"), (b"x-forwarded-for", b"203.0.113.7")]
    assert client_address("127.0.0.1", sent, PROXIES, "x-forwarded-for") == "203.0.113.7"


@pytest.mark.parametrize("proxy", ["not-an-ip", "10.0.0.0/33"])
def test_a_trusted_proxy_that_is_no_address_is_a_config_error(proxy: str) -> None:
    with pytest.raises(ConfigError, match="trusted_proxies"):
        ServerConfig(trusted_proxies=(proxy,))


@pytest.fixture
def access_lines() -> Iterator[AccessLines]:
    with capture_access_lines() as lines:
        yield lines


class Writes(io.StringIO):
    """A stream that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


def batch_handler(
    monkeypatch: pytest.MonkeyPatch, max_lines: int = 256
) -> tuple[LineBatchHandler, Writes, list[float]]:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # the one the handler reads
    stream = Writes()
    return LineBatchHandler(stream, max_lines=max_lines), stream, clock


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("valrun.access", logging.INFO, "", 0, message, (), None)


def messages(text: str) -> list[str]:
    return [line.split(" INFO valrun.access: ", 1)[1] for line in text.splitlines()]


def test_access_lines_are_written_in_batches_of_whole_lines_under_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, stream, clock = batch_handler(monkeypatch, max_lines=100)
    lines = [f"line {i} " + "x" * (i % 97) + "é" * (i % 5) for i in range(99)]
    for line in lines:
        handler.handle(record(line))
    assert stream.writes == []  # held: fewer than max_lines, and none due yet
    handler.flush_due()
    assert stream.writes == []
    clock[0] += accesslog.FLUSH_AFTER_S
    handler.flush_due()
    assert messages("".join(stream.writes)) == lines
    assert len(stream.writes) > 1
    assert all(len(w.encode()) <= PIPE_BUF and w.endswith("\n") for w in stream.writes)
    # A line longer than PIPE_BUF is written alone; max_lines waiting are written at once.
    stream.writes.clear()
    handler.handle(record("y" * (PIPE_BUF + 10)))
    for i in range(99):
        handler.handle(record(f"after {i}"))
    assert messages(stream.writes[0]) == ["y" * (PIPE_BUF + 10)]
    assert messages("".join(stream.writes[1:])) == [f"after {i}" for i in range(99)]
    handler.flush_due()  # nothing left: nothing written
    assert len("".join(stream.writes).splitlines()) == 100


@pytest.mark.parametrize("tag", ["", " [1]"])
def test_a_batched_access_line_reads_as_the_clis_log_lines_do(tag: str) -> None:
    """The handler formats its lines itself, as the CLI's logging format would."""
    cli_format = logging.Formatter(accesslog.LOG_FORMAT.format(tag=tag))
    stream = Writes()
    handler = LineBatchHandler(stream, tag)
    for created in (1796061242.0, 1796061242.9996, 1796061243.25):
        line = record("127.0.0.1 GET h / 200 1.0ms 5B")
        line.created, line.msecs = created, int((created - int(created)) * 1000)
        handler.handle(line)
        handler.flush()
        assert stream.writes.pop() == cli_format.format(line) + "\n"


def test_log_access_goes_straight_to_the_clis_handler_else_through_logging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = Writes()
    logger = accesslog.access_logger
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    logger.addHandler(LineBatchHandler(stream))  # as configure_logging adds it
    logger.propagate = False
    made: list[str] = []

    def make_record(*args: object) -> logging.LogRecord:
        made.append(str(args[4]))
        return record(str(args[4]))

    monkeypatch.setattr(logger, "makeRecord", make_record)
    accesslog.log_access("direct")
    logger.handlers[0].flush()
    assert messages("".join(stream.writes)) == ["direct"]
    assert made == []  # no LogRecord
    with capture_access_lines() as seen:  # a second handler: each gets a record
        accesslog.log_access("recorded")
    logger.handlers[0].flush()
    assert messages("".join(stream.writes)) == ["direct", "recorded"]
    assert seen.lines == ["recorded"]
    assert made == ["recorded"]


def test_access_line_escapes_control_characters() -> None:
    line = access_line(
        "127.0.0.1", "GET", "evil\r\nhost", "/a\n127.0.0.1 GET / 200", 200, 0.0012, 5
    )
    assert "\n" not in line
    assert "\r" not in line
    assert line == "127.0.0.1 GET evil\\x0d\\x0ahost /a\\x0a127.0.0.1 GET / 200 200 1.2ms 5B"
    assert escape("a\\x0a") == "a\\x5cx0a"  # a forged escape is escaped itself


async def test_access_log_names_the_forwarded_client_only_from_a_trusted_proxy(
    tmp_path: Path, access_lines: AccessLines
) -> None:
    async with configured_service(tmp_path, server={"trusted_proxies": ("127.0.0.1",)}) as svc:
        await svc.api("GET", "/v1/me", headers={"x-forwarded-for": "6.6.6.6, 203.0.113.7"})
        await access_lines.wait_for("203.0.113.7 GET api.localhost")
    (tmp_path / "untrusted").mkdir()
    async with configured_service(tmp_path / "untrusted") as untrusted:
        await untrusted.api("GET", "/v1/healthz", headers={"x-forwarded-for": "203.0.113.7"})
        await access_lines.wait_for("127.0.0.1 GET api.localhost")
    assert not any(line.startswith("6.6.6.6") for line in access_lines.lines)


async def test_a_path_with_a_newline_cannot_forge_an_access_line(
    service: Service, access_lines: AccessLines
) -> None:
    await service.api("GET", "/nothing%0a127.0.0.1%20GET%20/forged%20200")
    line = await access_lines.wait_for("127.0.0.1 GET api.localhost")
    assert "/nothing\\x0a127.0.0.1 GET /forged 200 404" in line, line
    assert all("\n" not in line for line in access_lines.lines)


# Database files, backups, restores


async def test_database_files_are_private(service: Service) -> None:
    await service.put_val("hello", "def hello(req):\n    return 'hi'")
    for suffix in ("", "-wal", "-shm"):
        path = Path(f"{service.db_path}{suffix}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_backup_of_a_live_database_holds_the_latest_writes_and_restores(
    tmp_path: Path,
) -> None:
    async with configured_service(tmp_path) as service:
        write_config(tmp_path, service)
        await service.put_val("kept", "def kept(req):\n    return 'v1'")
        await service.put_val("kept", "def kept(req):\n    return 'v2'")
        # The running service holds the database open in WAL mode: a plain copy of the main
        # file would miss these writes until a checkpoint.
        backed = await cli("backup", "snapshot.db", cwd=tmp_path)
        assert backed.returncode == 0, backed.stderr
        again = await cli("backup", "snapshot.db", cwd=tmp_path)
        assert again.returncode == 2
        assert b"already exists" in again.stderr
        await service.api("DELETE", "/v1/vals/alice/kept")
        refused = await cli("restore", "snapshot.db", cwd=tmp_path)
        assert refused.returncode == 2
        assert b"a valrun is serving from" in refused.stderr
        assert b"stop it first" in refused.stderr
        rekey = await cli("rotate-key", cwd=tmp_path, env={"VALRUN_NEW_SECRET_KEY": KEY})
        assert rekey.returncode == 2
        assert b"a valrun is serving from" in rekey.stderr
    copy = tmp_path / "snapshot.db"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    with sqlite3.connect(copy) as db:
        (versions,) = db.execute("SELECT COUNT(*) FROM versions").fetchone()
        (version,) = db.execute("PRAGMA user_version").fetchone()
    db.close()
    assert (versions, version) == (2, SCHEMA_VERSION)

    restored = await cli("restore", "snapshot.db", cwd=tmp_path)  # the service has stopped
    assert restored.returncode == 0, restored.stderr
    assert b"the database it replaced is kept at" in restored.stdout
    store = Store(service.db_path)
    try:
        kept = store.get_val("alice", "kept", None)
    finally:
        store.close()
    assert kept is not None
    assert kept.version == 2


async def test_restore_refuses_what_is_not_a_valrun_database(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a database")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    for name in ("notes.txt", "other.db", "missing.db"):
        done = await cli("restore", name, cwd=tmp_path)
        assert done.returncode == 2, name
        assert b"valrun" in done.stderr
        assert b"Traceback" not in done.stderr
    assert not (tmp_path / "valrun.db").exists()


# Schema versions


def test_a_database_from_before_versions_is_migrated_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0])  # the schema as it was, version 0
        db.execute("INSERT INTO users (name, created_at) VALUES ('alice', 0)")
        db.execute("INSERT INTO env (user_id, key, value) VALUES (1, 'K', 'plain')")
    db.close()
    store = Store(path)
    try:
        assert store.env("alice") == {"K": "plain"}
        (version,) = store._db.execute("PRAGMA user_version").fetchone()
    finally:
        store.close()
    assert version == SCHEMA_VERSION


async def test_a_schema_newer_than_the_code_is_refused_in_one_line(tmp_path: Path) -> None:
    Store(tmp_path / "valrun.db").close()
    with sqlite3.connect(tmp_path / "valrun.db") as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(SchemaError, match="newer than this valrun"):
        Store(tmp_path / "valrun.db")
    for args in (("user", "create", "x"), ("serve", "--bind", "127.0.0.1:0")):
        done = await cli(*args, cwd=tmp_path)
        assert done.returncode == 2, args
        (line,) = done.stderr.decode().splitlines()
        assert f"schema version {SCHEMA_VERSION + 1}" in line
        assert "newer" in line


# Env values sealed at rest


def test_sealed_values_open_only_in_their_own_row_and_with_their_key() -> None:
    sealer = Sealer(KEY)
    sealed = sealer.seal(1, "TOKEN", "hunter2")
    assert "hunter2" not in sealed
    assert sealer.open(1, "TOKEN", sealed) == "hunter2"
    for user_id, key, opener in (
        (2, "TOKEN", sealer),
        (1, "OTHER", sealer),
        (1, "TOKEN", Sealer(OTHER_KEY)),
    ):
        with pytest.raises(SealError):
            opener.open(user_id, key, sealed)
    # Flip a bit of the ciphertext itself: a changed base64 character may only change bits
    # the decoding drops (the padding's), which would leave the value intact.
    prefix = "v1."  # runtime.sealing.PREFIX
    assert sealed.startswith(prefix)
    raw = bytearray(base64.urlsafe_b64decode(sealed[len(prefix) :]))
    raw[-1] ^= 1
    tampered = prefix + base64.urlsafe_b64encode(bytes(raw)).decode("ascii")
    with pytest.raises(SealError):
        sealer.open(1, "TOKEN", tampered)


async def test_env_values_are_sealed_at_rest_and_reach_vals(tmp_path: Path) -> None:
    async with configured_service(tmp_path, store={"secret_key": KEY}) as svc:
        await svc.api("PUT", "/v1/env/API_KEY", content=b"sk-live-0123456789")
        await svc.put_val("key", "def key(req=None):\n    return env['API_KEY'][-4:]")
        with trio.fail_after(15):
            assert (await svc.api("GET", "/v1/run/alice.key")).json() == "6789"
    raw = b"".join(
        Path(f"{svc.db_path}{suffix}").read_bytes()
        for suffix in ("", "-wal")
        if Path(f"{svc.db_path}{suffix}").exists()
    )
    assert b"sk-live-0123456789" not in raw
    with pytest.raises(ConfigError, match="encrypted: set"):
        Store(svc.db_path)  # no key
    with pytest.raises(ConfigError, match="not the one"):
        Store(svc.db_path, secret_key=OTHER_KEY)


def test_a_key_given_later_seals_the_values_already_stored(tmp_path: Path) -> None:
    path = tmp_path / "valrun.db"
    store = Store(path)
    store.create_user("alice")
    store.set_env("alice", "K", "plain-value")
    store.close()
    store = Store(path, secret_key=KEY)
    try:
        assert store.env("alice") == {"K": "plain-value"}
        (value, sealed) = store._db.execute("SELECT value, sealed FROM env").fetchone()
    finally:
        store.close()
    assert sealed == 1
    assert "plain-value" not in value


async def test_rotate_key_reseals_every_value_with_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "valrun.db"
    store = Store(path, secret_key=KEY)
    store.create_user("alice")
    store.set_env("alice", "K", "the-value")
    store.close()
    missing = await cli("rotate-key", cwd=tmp_path, env={"VALRUN_SECRET_KEY": KEY})
    assert missing.returncode != 0
    assert b"VALRUN_NEW_SECRET_KEY" in missing.stderr
    rotated = await cli(
        "rotate-key",
        cwd=tmp_path,
        env={"VALRUN_SECRET_KEY": KEY, "VALRUN_NEW_SECRET_KEY": OTHER_KEY},
    )
    assert rotated.returncode == 0, rotated.stderr
    assert b"1 env values re-stored with the new key" in rotated.stdout
    with pytest.raises(ConfigError, match="not the one"):
        Store(path, secret_key=KEY)
    store = Store(path, secret_key=OTHER_KEY)
    try:
        assert store.env("alice") == {"K": "the-value"}
    finally:
        store.close()
    plain = await cli("rotate-key", "--decrypt", cwd=tmp_path, env={"VALRUN_SECRET_KEY": OTHER_KEY})
    assert plain.returncode == 0, plain.stderr
    store = Store(path)
    try:
        assert store.env("alice") == {"K": "the-value"}
    finally:
        store.close()


async def test_config_check_never_prints_the_secret_key(tmp_path: Path) -> None:
    (tmp_path / "valrun.toml").write_text(f'[store]\nsecret_key = "{KEY}"\n')
    done = await cli("config", "check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert KEY.encode() not in done.stdout
    assert b'"secret_key": "(set)"' in done.stdout
    short = await cli("config", "check", cwd=tmp_path, env={"VALRUN_SECRET_KEY": "short"})
    assert short.returncode == 2
    assert b"at least 32 characters" in short.stderr
