"""The store, run whole against both backends (`store_location`: an SQLite file, then a
database on the test session's PostgreSQL): one meaning for every method, its errors and its
transactions."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from functools import partial
from pathlib import Path

import psycopg
import pytest
import trio

from runtime import sqlitefile
from runtime import store as store_module
from runtime.errors import (
    ConfigError,
    ExistsError,
    InvalidError,
    MissingError,
    QuotaError,
    RefusedError,
    StoreUnavailableError,
    http_error,
)
from runtime.feed import open_reader
from runtime.schedule import Schedule
from runtime.schema import SCHEMA_VERSION, SchemaError
from runtime.schema import migrate as schema_migrate
from runtime.sealing import Sealer
from runtime.store import AsyncStore, Record, Store
from runtime.storecopy import CopyError, copy_store
from tests.helpers import cli

KEY = "k" * 32
OTHER_KEY = "o" * 32


def code(n: int) -> str:
    return f"def hello(req):\n    return {n}"


@pytest.fixture
def store(store_location: str) -> Iterator[Store]:
    with closing(Store(store_location)) as store:
        store.create_user("alice")
        yield store


def test_users_are_unique_and_named_by_the_rules(store: Store) -> None:
    with pytest.raises(ExistsError, match="already exists"):
        store.create_user("alice")
    with pytest.raises(InvalidError):
        store.create_user("Not-Valid")
    with pytest.raises(MissingError):
        store.user("nobody")
    assert store.user_exists("alice")
    assert not store.user_exists("bob")
    token = store.create_user("bob")  # the failed insert left nothing behind
    assert (store.user_for_token(token) or store.user("alice")).name == "bob"


def test_versions_count_up_and_names_ignore_case(store: Store) -> None:
    first, created = store.put_val("alice", "Hello", code(1), None)
    assert (first.version, first.name, first.privacy, created) == (1, "Hello", "public", True)
    second, created = store.put_val("alice", "HELLO", code(2), "unlisted")
    assert (second.version, second.name, second.privacy, created) == (2, "Hello", "unlisted", False)
    assert second.val_id == first.val_id
    assert [v.code for v in store.versions("alice", "hello")] == [code(1), code(2)]
    assert (store.get_val("alice", "hello", 1) or second).code == code(1)
    assert (store.get_val("alice", "hello", None) or first).version == 2
    assert store.get_val("alice", "hello", 3) is None
    resolved = store.resolve("alice", "hello", None)
    assert resolved is not None
    assert resolved[0] == second
    assert resolved[1] == {}


def test_listing_privacy_and_deletes(store: Store) -> None:
    store.put_val("alice", "b", code(1), "private")
    store.put_val("alice", "a", code(1), None)
    store.put_val("alice", "a", code(2), None)
    assert [(v.name, v.version) for v in store.list_vals("alice", ("public",))] == [("a", 2)]
    everything = store.list_vals("alice", ("public", "unlisted", "private"))
    assert [v.name for v in everything] == ["a", "b"]
    changed = store.set_privacy("alice", "b", "public")
    assert changed is not None
    assert changed.privacy == "public"
    assert store.set_privacy("alice", "nothing", "public") is None
    with pytest.raises(InvalidError):
        store.set_privacy("alice", "b", "secret")
    with pytest.raises(RefusedError):
        store.delete_version("alice", "a", 2)  # the latest
    assert store.delete_version("alice", "a", 1) == everything[0].val_id
    with pytest.raises(MissingError):
        store.delete_version("alice", "a", 1)
    with pytest.raises(MissingError):
        store.delete_version("alice", "zzz", 1)
    old_id = store.delete_val("alice", "a")
    assert old_id == everything[0].val_id
    assert store.delete_val("alice", "a") is None
    again, created = store.put_val("alice", "a", code(9), None)
    assert created
    assert again.version == 1
    assert again.val_id > old_id  # ids are never reused


def test_env_set_replace_delete(store: Store) -> None:
    store.set_env("alice", "B", "2")
    store.set_env("alice", "A", "1")
    store.set_env("alice", "A", "one")
    assert store.env("alice") == {"A": "one", "B": "2"}
    assert store.delete_env("alice", "A")
    assert not store.delete_env("alice", "A")
    assert store.env("alice") == {"B": "2"}


def test_sealed_env_needs_its_key_and_can_be_resealed(store_location: str) -> None:
    with closing(Store(store_location, secret_key=KEY)) as store:
        store.create_user("alice")
        store.set_env("alice", "K", "secret value")
        (stored,) = store._db.execute("SELECT value, sealed FROM env").fetchall()
        assert stored[1] == 1
        assert "secret value" not in stored[0]
    with pytest.raises(ConfigError, match="encrypted"):
        Store(store_location)
    with pytest.raises(ConfigError, match="not the one"):
        Store(store_location, secret_key=OTHER_KEY)
    with closing(Store(store_location, secret_key=KEY)) as store:
        assert store.reseal(Sealer(OTHER_KEY)) == 1
    with closing(Store(store_location, secret_key=OTHER_KEY)) as store:
        assert store.env("alice") == {"K": "secret value"}
        assert store.reseal(None) == 1
    with closing(Store(store_location)) as store:
        assert store.env("alice") == {"K": "secret value"}


def test_tokens_revoke_once(store: Store) -> None:
    token = store.create_token("alice")
    infos = store.tokens("alice")
    assert len(infos) == 2
    store.revoke_token(infos[1].id)
    assert store.user_for_token(token) is None
    with pytest.raises(MissingError):
        store.revoke_token(infos[1].id)
    assert store.tokens("alice")[1].revoked_at is not None


def record(val_id: int | None, owner: str | None, log: str, source: str = "run") -> Record:
    return Record(val_id, owner, source, 1, time.time(), 1.5, 200, log)  # type: ignore[arg-type]


def test_records_are_trimmed_per_bucket_and_by_size(store: Store) -> None:
    val, _ = store.put_val("alice", "hello", code(1), None)
    store.add_records([record(val.val_id, "alice", f"v{n}") for n in range(5)], keep=3)
    store.add_records([record(None, "alice", f"e{n}", "eval") for n in range(4)], keep=2)
    store.add_records([record(None, None, f"anon{n}", "eval") for n in range(3)], keep=1)
    assert [r.log for r in store.records(val, 10)] == ["v4", "v3", "v2"]
    assert [r.log for r in store.eval_records("alice", 10)] == ["e3", "e2"]
    oldest = store.records(val, 10)[-1].id
    assert oldest is not None
    assert [r.log for r in store.records(val, 10, after=oldest)] == ["v3", "v4"]
    store.add_records([record(val.val_id, "alice", "x" * 1000)], keep=10, max_bytes=500)
    assert [r.log for r in store.records(val, 10)] == []  # over the ceiling alone
    store.add_records([record(val.val_id, "alice", "y" * 100) for _ in range(8)], keep=10)
    store.add_records([record(val.val_id, "alice", "z" * 100)], keep=10, max_bytes=500)
    logs = [r.log for r in store.records(val, 20)]
    assert sum(len(log) for log in logs) <= 450  # down to 90 %
    assert logs[0] == "z" * 100  # the oldest went first


def test_records_of_a_deleted_val_are_dropped_and_nul_is_kept_out(store: Store) -> None:
    val, _ = store.put_val("alice", "hello", code(1), None)
    store.add_records([record(val.val_id, "alice", "a\0b")], keep=3)
    (log,) = [r.log for r in store.records(val, 3)]
    assert log in ("a\0b", "a\ufffdb")  # PostgreSQL's text holds no NUL
    store.delete_val("alice", "hello")
    store.add_records([record(val.val_id, "alice", "late")], keep=3)
    assert store.records(val, 3) == []


def test_a_large_mixed_batch_of_records_keeps_its_order_and_drops_a_deleted_vals(
    store: Store,
) -> None:
    """Records go in multi-row statements of 256, 128, ... rows (Store.add_records): 300 of
    vals, a user's Evals and anonymous Evals, in one batch, come back in the order added,
    each in its own bucket; one of a val deleted before the batch is written is dropped."""
    val, _ = store.put_val("alice", "hello", code(1), None)
    gone, _ = store.put_val("alice", "gone", code(1), None)
    store.delete_val("alice", "gone")
    kinds = [(val.val_id, "alice", "run"), (None, "alice", "eval"), (None, None, "eval")]
    batch = [record(*kinds[n % 3][:2], f"r{n}", kinds[n % 3][2]) for n in range(300)]
    batch.insert(150, record(gone.val_id, "alice", "gone"))
    store.add_records(batch, keep=1000)
    stored = store.records(val, 1000)[::-1]  # oldest first
    assert [r.log for r in stored] == [f"r{n}" for n in range(0, 300, 3)]
    ids = [r.id for r in stored]
    assert ids == sorted(i or 0 for i in ids)
    assert None not in ids
    assert [r.log for r in store.eval_records("alice", 1000)[::-1]] == [
        f"r{n}" for n in range(1, 300, 3)
    ]
    assert store.records(gone, 10) == []
    (anonymous,) = store._db.execute(
        "SELECT count(*) FROM runs WHERE val_id IS NULL AND user_id IS NULL"
    ).fetchall()
    assert anonymous == (100,)
    store.add_records([record(val.val_id, "alice", f"s{n}") for n in range(7)], keep=5)
    assert [r.log for r in store.records(val, 1000)] == ["s6", "s5", "s4", "s3", "s2"]


def test_schedules_quota_and_claims(store: Store) -> None:
    val, _ = store.put_val("alice", "hello", code(1), None)
    other, _ = store.put_val("alice", "other", code(1), None)
    every = Schedule("every", "60")
    info, created = store.put_schedule(val.val_id, every, 1000.0, 1) or (None, False)
    assert created
    assert info is not None
    assert info.next_run_at == 1060.0
    with pytest.raises(QuotaError):
        store.put_schedule(other.val_id, every, 1000.0, 1)
    assert store.put_schedule(10**9, every, 1000.0, 5) is None
    ticks, next_due, vals = store.claim_due(1000.0, 10, 30.0, 2)
    assert (ticks, next_due) == ([], 1060.0)
    ticks, next_due, vals = store.claim_due(1061.0, 10, 600.0, 2)
    (tick,) = ticks
    assert (tick.val_id, tick.skipped, tick.next_run_at) == (val.val_id, False, 1120.0)
    assert vals[val.val_id][0].code == code(1)
    ticks, *_ = store.claim_due(1121.0, 10, 30.0, 2)
    assert [t.skipped for t in ticks] == [True]  # the lease still holds
    store.renew_lease(val.val_id, tick.claim, 2000.0)
    store.finish_runs([(val.val_id, tick.claim)])
    ticks, *_ = store.claim_due(1181.0, 10, 30.0, 2)
    assert [t.skipped for t in ticks] == [False]
    assert store.delete_schedule(val.val_id)
    assert not store.delete_schedule(val.val_id)
    assert store.schedule_of(val.val_id) is None


def test_concurrent_claims_from_two_stores_take_each_tick_once(store_location: str) -> None:
    with closing(Store(store_location)) as setup:
        setup.create_user("alice")
        for n in range(20):
            val, _ = setup.put_val("alice", f"v{n}", code(n), None)
            setup.put_schedule(val.val_id, Schedule("every", "60"), 0.0, 100)
    claimed: list[int] = []
    barrier = threading.Barrier(2)

    def claim() -> None:
        with closing(Store(store_location)) as store:
            barrier.wait()
            for now in (61.0, 62.0, 63.0):
                ticks, _, _ = store.claim_due(now, 4, 600.0, 100)
                claimed.extend(t.val_id for t in ticks if not t.skipped)

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == len(set(claimed)) == 20


def test_concurrent_saves_from_two_stores_number_versions_without_gaps(
    store_location: str,
) -> None:
    with closing(Store(store_location)) as setup:
        setup.create_user("alice")
    errors: list[BaseException] = []

    def save() -> None:
        with closing(Store(store_location)) as store:
            for n in range(15):
                try:
                    store.put_val("alice", "hello", code(n), None)
                except BaseException as exc:  # reported below, not lost in the thread
                    errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with closing(Store(store_location)) as store:
        assert [v.version for v in store.versions("alice", "hello")] == list(range(1, 31))


def test_reopening_keeps_the_schema_and_a_newer_one_is_refused(store_location: str) -> None:
    with closing(Store(store_location)) as store:
        store.create_user("alice")
        store.check_writable()
        if store.postgres:
            store._db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        else:
            store._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store(store_location)


def test_a_fresh_postgres_database_is_at_the_latest_version(pg_url: str) -> None:
    with closing(Store(pg_url)) as store:
        assert store._db.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
    with closing(Store(pg_url)) as store:  # idempotent
        assert store._db.execute("SELECT COUNT(*) FROM schema_version").fetchone() == (1,)


async def test_a_lost_postgres_connection_is_a_503_then_reconnects(pg_url: str) -> None:
    with closing(Store(pg_url)) as store:
        store.create_user("alice")
        front = AsyncStore(store)
        (pid,) = store._db.execute("SELECT pg_backend_pid()").fetchone()
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreUnavailableError, match="cannot be used right now") as caught:
            await front.call(Store.set_env, "alice", "K", "v")
        assert http_error(caught.value).status == 503
        assert front.write_failure is not None
        with trio.fail_after(10):
            await front.call(Store.set_env, "alice", "K", "v")  # a new session
        assert front.write_failure is None
        assert store.env("alice") == {"K": "v"}


async def test_a_lock_held_past_the_busy_timeout_is_a_503_and_nothing_is_saved(
    tmp_path: Path,
) -> None:
    """Another process holds the SQLite store's write lock (stopped mid-write, say)."""
    path = tmp_path / "valrun.db"
    with closing(Store(path)) as store:
        store.create_user("alice")
        store._db.execute("PRAGMA busy_timeout=100")
        front = AsyncStore(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match="busy") as caught:
                await front.call(Store.set_env, "alice", "K", "v")
            assert http_error(caught.value).status == 503
            other.execute("ROLLBACK")
        assert store.env("alice") == {}
        await front.call(Store.set_env, "alice", "K", "v")  # the lock is free again
        assert store.env("alice") == {"K": "v"}


def test_postgres_refuses_nul_text_with_a_400(pg_url: str) -> None:
    with closing(Store(pg_url)) as store:
        store.create_user("alice")
        with pytest.raises(InvalidError, match="NUL") as caught:
            store.set_env("alice", "K", "a\0b")
        assert http_error(caught.value).status == 400
        assert store.env("alice") == {}


def test_an_unreachable_postgres_is_unavailable_and_names_no_password(
    pg_url: str,
) -> None:
    host_and_db = pg_url.removeprefix("postgresql://postgres@")
    port = int(host_and_db.split(":")[1].split("/")[0])
    url = f"postgresql://postgres:hunter2@127.0.0.1:{port + 1 if port < 65535 else 1}/x"
    with pytest.raises(StoreUnavailableError) as caught:
        Store(url)
    assert "hunter2" not in str(caught.value)
    assert "postgres:***@" in str(caught.value)


def pg_config(folder: Path, url: str) -> Path:
    path = folder / "valrun.toml"
    path.write_text(f'[store]\nurl = "{url}"\n[storage]\ndata_dir = "{folder / "data"}"\n')
    return path


async def test_cli_commands_work_on_postgres_and_backup_points_at_pg_dump(
    pg_url: str, tmp_path: Path
) -> None:
    config = str(pg_config(tmp_path, pg_url))
    made = await cli("--config", config, "user", "create", "bob", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    token = made.stdout.decode().split()[-1]
    with closing(Store(pg_url)) as store:
        assert (store.user_for_token(token) or store.user("nobody")).name == "bob"
    for verb in ("backup", "restore"):
        refused = await cli("--config", config, verb, str(tmp_path / "b.db"), cwd=tmp_path)
        assert refused.returncode != 0
        assert b"pg_dump" in refused.stderr


async def test_rotate_key_on_postgres_waits_for_no_node_serving(
    pg_url: str, tmp_path: Path
) -> None:
    config = str(pg_config(tmp_path, pg_url))
    with closing(Store(pg_url, secret_key=KEY)) as store:
        store.create_user("alice")
        store.set_env("alice", "K", "v")
    keys = {"VALRUN_SECRET_KEY": KEY, "VALRUN_NEW_SECRET_KEY": OTHER_KEY}
    with closing(open_reader(pg_url)):  # what a serving node holds
        refused = await cli("--config", config, "rotate-key", cwd=tmp_path, env=keys)
    assert refused.returncode != 0
    assert b"a valrun is serving from" in refused.stderr
    assert b"postgres@127.0.0.1" in refused.stderr
    done = await cli("--config", config, "rotate-key", cwd=tmp_path, env=keys)
    assert done.returncode == 0, done.stderr
    with closing(Store(pg_url, secret_key=OTHER_KEY)) as store:
        assert store.env("alice") == {"K": "v"}


async def test_store_copy_moves_an_sqlite_store_to_postgres_whole(
    pg_url: str, tmp_path: Path
) -> None:
    source = tmp_path / "old.db"
    with closing(Store(source, secret_key=KEY)) as old:
        token = old.create_user("alice")
        revoked = old.create_token("alice")
        old.revoke_token(old.tokens("alice")[1].id)
        val, _ = old.put_val("alice", "hello", code(1), "unlisted")
        old.put_val("alice", "hello", code(2), None)
        old.put_val("alice", "hello", code(3), None)
        old.delete_version("alice", "hello", 2)
        gone, _ = old.put_val("alice", "gone", code(1), None)
        old.delete_val("alice", "gone")
        old.set_env("alice", "K", "sealed value")
        old.add_records([record(val.val_id, "alice", "log\0line")], keep=5)
        old.put_schedule(val.val_id, Schedule("cron", "*/5 * * * *", "Europe/Paris"), 0.0, 5)
        before = (old.versions("alice", "hello"), old.schedule_of(val.val_id))
    config = tmp_path / "valrun.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{source}"\n')
    args = ("--config", str(config), "store", "copy", "--to", pg_url)
    done = await cli(*args, cwd=tmp_path, env={"VALRUN_SECRET_KEY": KEY})
    assert done.returncode == 0, done.stderr
    assert b"2 tokens" in done.stdout
    with closing(Store(pg_url, secret_key=KEY)) as new:
        assert (new.versions("alice", "hello"), new.schedule_of(val.val_id)) == before
        assert new.env("alice") == {"K": "sealed value"}
        assert (new.user_for_token(token) or new.user("nobody")).name == "alice"
        assert new.user_for_token(revoked) is None
        (copied,) = new.records(before[0][0], 5)
        assert copied.log == "log\ufffdline"
        again, _ = new.put_val("alice", "gone", code(1), None)
        assert again.val_id > gone.val_id  # the identities continue past the copied ids
        new.create_user("bob")
    refused = await cli(*args, cwd=tmp_path, env={"VALRUN_SECRET_KEY": KEY})
    assert refused.returncode != 0
    assert b"already holds users" in refused.stderr


def test_store_copy_in_process_counts_rows_and_wants_a_postgres_target(
    pg_url: str, tmp_path: Path
) -> None:
    source = str(tmp_path / "old.db")
    with closing(Store(source)) as old:
        old.create_user("alice")
        old.put_val("alice", "hello", code(1), None)
    with pytest.raises(CopyError, match="postgresql://"):
        copy_store(source, str(tmp_path / "other.db"))
    counts = copy_store(source, pg_url)
    assert (counts["users"], counts["tokens"], counts["vals"], counts["runs"]) == (1, 1, 1, 0)


async def test_config_check_names_a_postgres_store_without_its_password(tmp_path: Path) -> None:
    config = pg_config(tmp_path, "postgresql://valrun:hunter2@db.internal:5432/valrun")
    done = await cli("--config", str(config), "config", "check", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert b"hunter2" not in done.stdout
    assert b"postgresql://valrun:***@db.internal:5432/valrun" in done.stdout


def test_opening_an_sqlite_store_is_tried_again_while_it_is_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runtime.sqlitefile.prepare: "database is locked" at start (a lock SQLite refuses at
    once rather than waits for) is tried again with growing pauses; another error is not."""
    path = tmp_path / "valrun.db"
    Store(path).close()
    real_migrate = schema_migrate
    calls: list[str] = []
    pauses: list[float] = []

    def migrate(db: sqlite3.Connection, where: str, error: str, failures: int) -> int:
        calls.append(where)
        if len(calls) <= failures:
            raise sqlite3.OperationalError(error)
        return real_migrate(db, where)

    monkeypatch.setattr(time, "sleep", pauses.append)  # the one the store calls
    monkeypatch.setattr(
        store_module, "migrate", partial(migrate, error="database is locked", failures=3)
    )
    Store(path).close()
    assert (len(calls), pauses) == (4, [0.05, 0.1, 0.2])
    calls.clear()
    monkeypatch.setattr(
        store_module, "migrate", partial(migrate, error="database is locked", failures=99)
    )
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        Store(path)
    assert len(calls) == sqlitefile.OPEN_ATTEMPTS
    calls.clear()
    monkeypatch.setattr(
        store_module, "migrate", partial(migrate, error="disk I/O error", failures=99)
    )
    with pytest.raises(sqlite3.OperationalError, match="disk"):
        Store(path)
    assert len(calls) == 1
