"""Storage on both backends (SQLite and PostgreSQL): the same calls give the same answers and
refusals; and the attacks a hostile tenant can try on PostgreSQL, each refused, with the
privilege layer shown on its own by connecting as the tenant directly."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runtime import pg_storage
from runtime.config import Config, LimitsConfig, StorageConfig, StoreConfig
from runtime.demo import DEMO_VALS
from runtime.errors import StorageRefusedError
from runtime.pg_storage import CONNECTIONS_PER_TENANT, TENANTS_GROUP, PgStorage, Tenant
from runtime.pgsql import first_words, number_placeholders, refusal
from runtime.server import open_storage
from runtime.storage import SqliteStorage, StorageBackend
from runtime.store import Store
from sandbox.messages import SqlAnswer, SqlResult
from tests import pg_kit
from tests.helpers import Service, service_on

MiB = 1024 * 1024
Make = Callable[..., StorageBackend]


@pytest.fixture(params=["sqlite", "postgresql"])
async def make(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Make]:
    """Build a backend of the parameter's kind with a given [storage] config."""
    made: list[StorageBackend] = []
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""

    def build(config: StorageConfig | None = None, max_result_bytes: int = MiB) -> StorageBackend:
        config = config or StorageConfig()
        backend: StorageBackend
        if url:
            backend = PgStorage(config, url, max_result_bytes)  # a fresh store: fresh tenants
        else:
            backend = SqliteStorage(config, tmp_path / f"s{len(made)}", max_result_bytes)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


@pytest.fixture(scope="module", autouse=True)
def tenants_need_passwords(pg_cluster: pg_kit.Cluster) -> None:
    """The session's PostgreSQL trusts loopback (tests/pg_kit.py); here tenant roles must give
    their passwords, as docs/storage.md §5 has production's pg_hba.conf say."""
    hba = pg_cluster.data_dir / "pg_hba.conf"
    line = f"host all +{TENANTS_GROUP} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if line not in text:
        hba.write_text(line + text)
        with psycopg.connect(pg_cluster.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_reload_conf()")


def known(storage: PgStorage, user: str) -> Tenant:
    tenant = storage.tenant(user)
    assert tenant is not None
    return tenant


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[PgStorage]:
    storage = PgStorage(StorageConfig(), pg_url, MiB)
    yield storage
    storage.close()


@pytest.fixture(autouse=True)
def drop_tenants(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on PostgreSQL, its users' roles and databases go (tests/pg_kit.py)."""
    url = request.getfixturevalue("pg_url") if "pg_url" in request.fixturenames else ""
    yield
    if url:
        pg_kit.drop_storage_tenants(url)


async def rows(backend: StorageBackend, user: str, sql: str, *args: object) -> list[list[object]]:
    body = await backend.sql(user, [(sql, args)], batch=False)  # type: ignore[list-item]
    return list(json.loads(body)[0]["rows"])


async def refused(backend: StorageBackend, user: str, sql: str, *args: object) -> str:
    with pytest.raises(StorageRefusedError) as refusal:
        await backend.sql(user, [(sql, args)], batch=False)  # type: ignore[list-item]
    return refusal.value.type


# The same behaviour on both backends


def runaway_sql(storage: StorageBackend) -> str:
    """A statement that would run for hours. PostgreSQL keeps a recursive CTE's rows in a
    tuplestore whose temp files can reach temp_file_limit first: there, a join that only
    burns CPU."""
    if isinstance(storage, PgStorage):
        return "SELECT count(*) FROM generate_series(1, 50000) a, generate_series(1, 50000) b"
    return "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r"


async def test_blob_calls_and_quota(make: Make) -> None:
    storage = make(StorageConfig(max_user_bytes=100, max_value_bytes=80))
    assert await storage.blob_get("alice", "k") is None
    await storage.blob_set("alice", "k", b"x" * 80)
    await storage.blob_set("alice", "k", b"y" * 79)  # an overwrite counts the difference
    assert await storage.blob_get("alice", "k") == b"y" * 79
    with pytest.raises(StorageRefusedError) as over:
        await storage.blob_set("alice", "j", b"z" * 30)
    assert over.value.type == "quota_exceeded"
    assert await storage.blob_get("alice", "j") is None
    with pytest.raises(StorageRefusedError) as big:
        await storage.blob_set("alice", "j", b"z" * 81)
    assert big.value.type == "value_too_large"
    usage = await storage.usage("alice")
    assert (usage.blob_bytes, usage.blob_keys) == (80, 1)
    assert await storage.blob_get("bob", "k") is None  # another user's namespace
    assert await storage.blob_delete("alice", "k")
    assert not await storage.blob_delete("alice", "k")
    assert (await storage.usage("alice")).blob_bytes == 0
    for bad in ("", "k" * 513):
        with pytest.raises(StorageRefusedError) as key:
            await storage.blob_get("alice", bad)
        assert key.value.type == "bad_key"
    with pytest.raises(StorageRefusedError) as user:
        await storage.blob_get("../alice", "k")
    assert user.value.type == "no_owner"


async def test_blob_list_is_sorted_by_code_point_prefixed_and_paged(make: Make) -> None:
    storage = make()
    for key in ["b/2", "a", "b/1", "B", "é", "b/10", "c"]:
        await storage.blob_set("alice", key, key.encode())
    await storage.blob_set("bob", "b/3", b"x")
    listed = await storage.blob_list("alice", "b/", "", 1000)
    assert [e.key for e in listed] == ["b/1", "b/10", "b/2"]
    assert [e.size for e in listed] == [3, 4, 3]
    assert [e.key for e in await storage.blob_list("alice", "", "", 1000)] == [
        "B", "a", "b/1", "b/10", "b/2", "c", "é",
    ]  # fmt: skip
    page = await storage.blob_list("alice", "", "b/1", 2)
    assert [e.key for e in page] == ["b/10", "b/2"]
    with pytest.raises(StorageRefusedError):
        await storage.blob_list("alice", "", "", 0)


async def test_sql_answers_match_the_wire_on_both(make: Make) -> None:
    storage = make()
    body = await storage.sql(
        "alice",
        [
            ("CREATE TABLE t (a integer, b bytea, c text, d real)", ()),
            ("INSERT INTO t VALUES (?, ?, ?, ?), (?, ?, ?, ?)", (1, b"\x00", "x?", 1.5) * 2),
            ("SELECT a, b, c, d FROM t WHERE c = '?' OR a = ?", (1,)),
            ("UPDATE t SET a = a + 1", ()),
        ],
        batch=True,
    )
    results = SqlAnswer(0, body).results()
    assert [r.rows_affected for r in results] == [0, 2, 0, 2]
    assert results[2] == SqlResult(
        ("a", "b", "c", "d"), ((1, b"\x00", "x?", 1.5), (1, b"\x00", "x?", 1.5)), 0,
        results[2].last_insert_rowid,
    )  # fmt: skip


async def test_a_batch_is_all_or_nothing(make: Make) -> None:
    storage = make()
    await storage.sql("alice", [("CREATE TABLE t (n integer)", ())], batch=False)
    with pytest.raises(StorageRefusedError) as failed:
        await storage.sql(
            "alice",
            [("INSERT INTO t VALUES (1)", ()), ("INSERT INTO nowhere VALUES (2)", ())],
            batch=True,
        )
    assert failed.value.type == "sql_error"
    assert await rows(storage, "alice", "SELECT count(*) FROM t") == [[0]]


async def test_a_result_over_the_cap_is_refused_and_writes_nothing(make: Make) -> None:
    storage = make(max_result_bytes=2000)
    await storage.sql("alice", [("CREATE TABLE t (s text)", ())], batch=False)
    sql = "INSERT INTO t SELECT 'x' || i FROM (WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
    sql += "SELECT i + 1 FROM r WHERE i < 500) SELECT i FROM r) AS r RETURNING s"
    assert await refused(storage, "alice", sql) == "result_too_large"
    assert await rows(storage, "alice", "SELECT count(*) FROM t") == [[0]]
    # The connection is still usable after a statement stopped mid-stream.
    assert await rows(storage, "alice", "SELECT 41 + 1") == [[42]]


async def test_a_runaway_query_is_interrupted_while_others_answer(make: Make) -> None:
    storage = make(StorageConfig(sql_timeout_s=1.0))
    runaway = runaway_sql(storage)
    outcome: list[str] = []

    async def alice() -> None:
        outcome.append(await refused(storage, "alice", runaway))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(alice)
            await trio.testing.wait_all_tasks_blocked()
            assert await rows(storage, "bob", "SELECT 2") == [[2]]
    assert outcome == ["sql_timeout"]
    assert await rows(storage, "alice", "SELECT 3") == [[3]]  # and alice goes on


async def test_sql_never_runs_past_the_callers_deadline(make: Make) -> None:
    storage = make(StorageConfig(sql_timeout_s=30.0))
    runaway = runaway_sql(storage)
    await rows(storage, "alice", "SELECT 1")  # the first call provisions (PostgreSQL)
    started = trio.current_time()
    with trio.move_on_after(1.0):
        assert await refused(storage, "alice", runaway) == "sql_timeout"
    assert trio.current_time() - started < 10


async def test_eight_parallel_increments_give_eight(make: Make) -> None:
    storage = make()
    await storage.sql(
        "alice",
        [("CREATE TABLE c (n integer)", ()), ("INSERT INTO c VALUES (0)", ())],
        batch=True,
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(rows, storage, "alice", "UPDATE c SET n = n + 1")
    assert await rows(storage, "alice", "SELECT n FROM c") == [[8]]


async def test_one_users_waiting_calls_are_capped(make: Make) -> None:
    storage = make(StorageConfig(sql_timeout_s=1.0, max_waiting_per_user=2, sql_threads=2))
    await rows(storage, "alice", "SELECT 1")
    runaway = runaway_sql(storage)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(refused, storage, "alice", runaway)
            await trio.testing.wait_all_tasks_blocked()
            assert await refused(storage, "alice", "SELECT 1") == "busy"


async def test_sql_quota_refuses_and_keeps_nothing(make: Make) -> None:
    storage = make(StorageConfig(max_sql_bytes=256 * 1024, max_value_bytes=64 * 1024))
    await storage.sql("alice", [("CREATE TABLE t (s text)", ())], batch=False)
    fill = "INSERT INTO t SELECT ? FROM (WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
    fill += "SELECT i + 1 FROM r WHERE i < 200) SELECT i FROM r) AS r"
    # Random text: PostgreSQL compresses repetitive values.
    assert await refused(storage, "alice", fill, secrets.token_hex(1000)) == "quota_exceeded"
    assert await rows(storage, "alice", "SELECT count(*) FROM t") == [[0]]
    await storage.sql("alice", [("INSERT INTO t VALUES ('small')", ())], batch=False)
    assert 0 < (await storage.usage("alice")).sql_bytes <= 256 * 1024


# Pure: how a tenant's SQL text is read


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SELECT 1", ["SELECT", "1"]),
        ("  /* a /* nested */ SELECT */ SET work_mem = 1", ["SET", "WORK_MEM"]),
        ("-- SELECT\nRESET ROLE", ["RESET", "ROLE"]),
        ("((select 1))", ["SELECT", "1"]),
        ("alter /* x */ role me set", ["ALTER", "ROLE"]),
        ('"SELECT" x', ['"SELECT"', "X"]),
    ],
)
def test_first_words_read_comments_as_postgresql_does(sql: str, words: list[str]) -> None:
    assert first_words(sql) == words


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("SELECT 1", None),
        ("with x as (select 1) select * from x", None),
        ("CREATE TABLE t (a int)", None),
        ("ALTER TABLE t ADD b int", None),
        ("SET ROLE postgres", "sql_refused"),
        ("set local statement_timeout = 0", "sql_refused"),
        ("RESET ALL", "sql_refused"),
        ("BEGIN", "sql_refused"),
        ("START TRANSACTION", "sql_refused"),
        ("COMMIT", "sql_refused"),
        ("end", "sql_refused"),
        ("ROLLBACK", "sql_refused"),
        ("SAVEPOINT a", "sql_refused"),
        ("COPY t TO PROGRAM 'id'", "sql_refused"),
        ("LISTEN valrun", "sql_refused"),
        ("NOTIFY valrun", "sql_refused"),
        ("PREPARE p AS SELECT 1", "sql_refused"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "sql_refused"),
        ("DO $$ BEGIN END $$", "sql_refused"),
        ("DISCARD ALL", "sql_refused"),
        ("LOAD 'x'", "sql_refused"),
        ("ALTER ROLE CURRENT_USER SET work_mem = '1GB'", "sql_refused"),
        ("ALTER USER me PASSWORD 'x'", "sql_refused"),
        ("ALTER DATABASE x SET work_mem = '1GB'", "sql_refused"),
        ("ATTACH 'x' AS x", "sql_refused"),
        ("SELEKT 1", "sql_error"),
        ("/* unclosed SELECT", "sql_error"),
        ("'unclosed", "sql_error"),
        ("", "sql_error"),
    ],
)
def test_statement_check_table(sql: str, refused: str | None) -> None:
    answer = refusal(sql)
    assert (answer and answer[0]) == refused


@pytest.mark.parametrize(
    ("sql", "numbered", "count"),
    [
        ("SELECT ?, ?", "SELECT $1, $2", 2),
        ("SELECT '?', \"?\", ? -- ?\n", "SELECT '?', \"?\", $1 -- ?\n", 1),
        ("SELECT E'\\'?', ?", "SELECT E'\\'?', $1", 1),
        ("SELECT $$?$$, $t$ ? $t$, ?", "SELECT $$?$$, $t$ ? $t$, $1", 1),
        ("SELECT 'it''s ?', /* ? /* ? */ ? */ ?", "SELECT 'it''s ?', /* ? /* ? */ ? */ $1", 1),
        ("SELECT $1", "SELECT $1", 0),
        ("SELECT a$b, ?", "SELECT a$b, $1", 1),
    ],
)
def test_placeholders_are_numbered_outside_strings_and_comments(
    sql: str, numbered: str, count: int
) -> None:
    assert number_placeholders(sql) == (numbered, count)


# PostgreSQL: what each type reads as


async def test_postgresql_types_read_as_the_wires_values(pg: PgStorage) -> None:
    sql = (
        "SELECT 1::int2, 2::int8, 1.5::float8, 'Infinity'::float8, 'NaN'::float8, "
        "true, false, 7::numeric, 2.5::numeric, '\\x00ff'::bytea, 'é'::text, NULL, "
        "'2026-01-02'::date, ARRAY[1, 2], '{\"a\": 1}'::jsonb"
    )
    body = await pg.sql("alice", [(sql, ())], batch=False)
    assert b"1e999" in body  # infinity as a JSON number, as on SQLite
    row = json.loads(body)[0]["rows"][0]
    assert row[:3] == [1, 2, 1.5]
    assert row[4:] == [
        None, 1, 0, 7, 2.5, {"$b": "AP8="}, "é", None, "2026-01-02", "{1,2}", '{"a": 1}',
    ]  # fmt: skip


async def test_postgresql_args_bind_by_type(pg: PgStorage) -> None:
    got = await rows(
        pg,
        "alice",
        "SELECT ? + 1, ? * 2, ?, octet_length(?), ?::int IS NULL",
        41,
        1.25,
        "s",
        b"ab",
        None,
    )
    assert got == [[42, 2.5, "s", 2, 1]]
    assert await refused(pg, "alice", "SELECT ?, ?", 1) == "sql_error"


# PostgreSQL attacks: a hostile tenant, through the service


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("RESET ROLE", "sql_refused"),
        ("SET ROLE postgres", "sql_refused"),
        ("SET SESSION AUTHORIZATION postgres", "sql_refused"),
        ("SELECT set_config('role', 'postgres', false)", "sql_refused"),
        ("SELECT pg_catalog.set_config('statement_timeout', '0', true)", "sql_refused"),
        ("SELECT set_config('work_mem', '4GB', false)", "sql_refused"),
        ("/* /* */ SELECT */ SET statement_timeout = 0", "sql_refused"),
        ("COPY (SELECT 1) TO PROGRAM 'id'", "sql_refused"),
        ("COPY (SELECT 1) TO '/tmp/x'", "sql_refused"),
        ("SELECT pg_read_file('/etc/passwd')", "sql_refused"),
        ("SELECT pg_ls_dir('.')", "sql_refused"),
        ("SELECT lo_import('/etc/passwd')", "sql_refused"),
        ("SELECT lo_from_bytea(0, 'x')", "sql_refused"),
        ("SELECT lo_create(0)", "sql_refused"),
        ("CREATE EXTENSION dblink", "sql_refused"),
        ("CREATE EXTENSION pgcrypto", "sql_refused"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", "sql_refused"),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
            "sql_refused",
        ),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'libc', 'abs'", "sql_refused"),
        ("DO $$ BEGIN PERFORM 1; END $$", "sql_refused"),
        ("LISTEN valrun_changes", "sql_refused"),
        ("NOTIFY valrun_changes, 'x'", "sql_refused"),
        ("SELECT pg_notify('valrun_changes', 'x')", "sql_refused"),
        ("SELECT datname FROM pg_database", "sql_refused"),
        ("SELECT rolname FROM pg_roles", "sql_refused"),
        ("SELECT usename, query FROM pg_stat_activity", "sql_refused"),
        ("SELECT pg_get_userbyid(10)", "sql_refused"),
        ("SELECT pg_database_size('postgres')", "sql_refused"),
        ("CREATE TEMP TABLE t (a int)", "sql_refused"),
        ("CREATE TABLE public.t (a int)", "sql_refused"),
        ("CREATE SCHEMA other", "sql_refused"),
        ("SELECT 1; SELECT 2", "sql_refused"),
        ("SELECT 1; SET ROLE postgres", "sql_refused"),
        ("BEGIN", "sql_refused"),
        ("COMMIT", "sql_refused"),
        ("ROLLBACK", "sql_refused"),
        ("SAVEPOINT s", "sql_refused"),
        ("PREPARE TRANSACTION 'x'", "sql_refused"),
        ("ALTER ROLE CURRENT_USER SET statement_timeout = 0", "sql_refused"),
        ("ALTER ROLE CURRENT_USER CONNECTION LIMIT -1", "sql_refused"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "sql_refused"),
        ("SELECT pg_advisory_lock(1)", "sql_refused"),
        ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "sql_refused"),
        ("CREATE ROLE r", "sql_refused"),
        ("CREATE DATABASE d", "sql_refused"),
        ("VACUUM", "sql_refused"),
        ("SELECT pg_sleep(30)", "sql_timeout"),
    ],
)
async def test_tenant_attacks_are_refused(pg: PgStorage, sql: str, kind: str) -> None:
    with trio.fail_after(30):
        assert await refused(pg, "mallory", sql) == kind
        # The tenant's connection goes on, with the service's settings.
        assert await rows(pg, "mallory", "SELECT current_setting('work_mem'), 1") == [["4MB", 1]]


async def test_another_tenants_tables_are_neither_seen_nor_reached(pg: PgStorage) -> None:
    await pg.sql("alice", [("CREATE TABLE alice_secret (s text)", ())], batch=False)
    await pg.sql("alice", [("INSERT INTO alice_secret VALUES ('x')", ())], batch=False)
    await rows(pg, "bob", "SELECT 1")
    names = "SELECT count(*) FROM pg_class WHERE relname = 'alice_secret'"
    assert await rows(pg, "bob", names) == [[0]]
    tables = "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'alice%'"
    assert await rows(pg, "bob", tables) == [[0]]
    assert await refused(pg, "bob", "SELECT * FROM alice_secret") == "sql_error"
    alice = known(pg, "alice")
    assert await refused(pg, "bob", f"SELECT * FROM {alice.database}.main.alice_secret") == (
        "sql_error"  # cross-database references are not implemented
    )
    # Role and database names are random: nothing in them names alice.
    assert "alice" not in alice.role
    assert await rows(pg, "alice", "SELECT s FROM main.alice_secret") == [["x"]]


def tenant_conninfo(url: str, tenant: Tenant, database: str | None = None) -> str:
    params = conninfo_to_dict(url)
    params.update(user=tenant.role, password=tenant.password, dbname=database or tenant.database)
    return make_conninfo("", **params)


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
        "SELECT set_config('role', 'postgres', false)",
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT lo_import('/etc/passwd')",
        "CREATE EXTENSION dblink",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
        "SELECT datname FROM pg_database",
        "SELECT pg_notify('c', 'x')",
        "CREATE TEMP TABLE t (a int)",
        "ALTER SYSTEM SET work_mem = '1GB'",
    ],
)
async def test_privileges_refuse_without_the_statement_check(
    pg: PgStorage, pg_url: str, sql: str
) -> None:
    """Connected as the tenant itself, past runtime.pgsql: PostgreSQL refuses on its own."""
    await rows(pg, "mallory", "SELECT 1")
    info = tenant_conninfo(pg_url, known(pg, "mallory"))
    with psycopg.connect(info, autocommit=True) as conn:
        assert conn.execute("SELECT session_user = current_user").fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.encode())


async def test_a_tenant_cannot_connect_to_another_tenants_database(
    pg: PgStorage, pg_url: str
) -> None:
    await rows(pg, "alice", "SELECT 1")
    await rows(pg, "bob", "SELECT 1")
    alice = known(pg, "alice")
    bob = known(pg, "bob")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(tenant_conninfo(pg_url, bob, alice.database))


async def test_tenant_roles_are_bounded_by_their_settings(pg: PgStorage, pg_url: str) -> None:
    await rows(pg, "mallory", "SELECT 1")
    tenant = known(pg, "mallory")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        role = admin.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolconnlimit, "
            "rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s",
            (tenant.role,),
        ).fetchone()
        assert role == (False, False, False, False, CONNECTIONS_PER_TENANT, True)
        acl = admin.execute(
            "SELECT datacl::text FROM pg_database WHERE datname = %s", (tenant.database,)
        ).fetchone()
    assert acl is not None
    assert "=c" not in acl[0].replace(f"{tenant.role}=c", "")  # PUBLIC may not connect
    settings = "SELECT current_setting(?)"
    for name, value in [
        ("temp_file_limit", "64MB"),
        ("work_mem", "4MB"),
        ("search_path", "main"),
        ("lock_timeout", "2s"),
        ("max_parallel_workers_per_gather", "0"),
    ]:
        assert await rows(pg, "mallory", settings, name) == [[value]]
    # The call's own timeout: what is left of storage.sql_timeout_s (2 s) for this statement.
    timeout = str((await rows(pg, "mallory", settings, "statement_timeout"))[0][0])
    assert timeout == "2s" or (timeout.endswith("ms") and 0 < int(timeout[:-2]) < 2000)


async def test_temp_files_are_bounded(pg: PgStorage) -> None:
    storage = PgStorage(StorageConfig(sql_timeout_s=60), pg.url, MiB)
    try:
        with trio.fail_after(90):
            sql = "SELECT count(*) FROM (SELECT md5(i::text) m FROM generate_series(1, 3000000) "
            sql += "i ORDER BY 1) s"
            assert await refused(storage, "mallory", sql) == "quota_exceeded"
    finally:
        storage.close()


async def test_the_tenants_connection_limit_is_busy_not_a_failure(
    pg: PgStorage, pg_url: str
) -> None:
    await rows(pg, "mallory", "SELECT 1")
    tenant = known(pg, "mallory")
    held = [
        psycopg.connect(tenant_conninfo(pg_url, tenant)) for _ in range(CONNECTIONS_PER_TENANT - 1)
    ]
    try:
        other = PgStorage(StorageConfig(), pg_url, MiB)  # another node
        try:
            assert await refused(other, "mallory", "SELECT 1") == "busy"
        finally:
            other.close()
    finally:
        for conn in held:
            conn.close()


async def test_open_tenant_connections_are_capped_least_recent_first(
    pg: PgStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_storage, "MAX_OPEN_CONNECTIONS", 2)
    for user in ("alice", "bob", "carol", "alice"):
        assert await rows(pg, user, "SELECT 1") == [[1]]
    open_users = {u for u, slot in pg._turns.users.items() if slot.db is not None}
    assert open_users == {"carol", "alice"}


async def test_first_call_provisions_once_under_parallel_nodes(pg_url: str) -> None:
    nodes = [PgStorage(StorageConfig(), pg_url, MiB) for _ in range(3)]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(rows, node, "alice", "SELECT 1")
        assert await rows(
            nodes[0], "alice", "SELECT count(*) FROM pg_namespace WHERE nspname = 'main'"
        ) == [[1]]
    finally:
        for node in nodes:
            node.close()


def test_a_postgresql_store_gets_postgresql_storage(pg_url: str) -> None:
    store = StoreConfig(url=pg_url)
    storage = open_storage(Config(store=store, limits=LimitsConfig(max_response_body_bytes=4096)))
    try:
        assert isinstance(storage, PgStorage)
        assert storage.config.max_value_bytes == storage.max_result_bytes == 4096
    finally:
        storage.close()


async def test_tenants_log_in_with_their_own_password_only(pg: PgStorage, pg_url: str) -> None:
    await rows(pg, "alice", "SELECT 1")
    alice = known(pg, "alice")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tenant_conninfo(pg_url, Tenant(alice.role, "guessed")))
    with psycopg.connect(tenant_conninfo(pg_url, alice)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (alice.role,)


async def test_a_tenant_password_changed_by_hand_is_repaired(pg: PgStorage, pg_url: str) -> None:
    await pg.sql("alice", [("CREATE TABLE kept (a int)", ())], batch=False)
    await pg.sql("alice", [("INSERT INTO kept VALUES (7)", ())], batch=False)
    alice = known(pg, "alice")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE {alice.role} PASSWORD 'changed'".encode())
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(tenant_conninfo(pg_url, alice))
    other = PgStorage(StorageConfig(), pg_url, MiB)  # another node, or this one restarted
    try:
        assert await rows(other, "alice", "SELECT a FROM kept") == [[7]]
        assert known(other, "alice") == alice  # same name, same password: from the store
    finally:
        other.close()


async def test_two_nodes_on_one_postgresql_share_each_users_storage(
    pg_url: str, tmp_path: Path
) -> None:
    """Two valrun nodes on one PostgreSQL store: a val's blob and SQL writes through one are
    read through the other, and parallel increments through both give one exact count."""
    with closing(Store(pg_url)) as db:
        tokens = {name: db.create_user(name) for name in ("alice", "bob")}
    async with (
        service_on(pg_url, tmp_path / "one", tokens) as one,
        service_on(pg_url, tmp_path / "two", tokens) as two,
    ):
        await one.put_val("counter", DEMO_VALS["counter"])
        blob = "from std import blob\ndef note(req):\n"
        blob += "    if req.method == 'POST':\n        blob.set('note', req.text())\n"
        blob += "    return blob.get('note') or b''\n"
        await one.put_val("note", blob)
        written = await one.web("alice", "note", method="POST", content=b"from one")
        assert written.status_code == 200, written.text
        assert (await two.web("alice", "note")).content == b"from one"
        assert (await two.web("bob", "note")).status_code == 404  # bob has no such val

        async def visit(node: Service) -> None:
            response = await node.web("alice", "counter")
            assert response.status_code == 200, response.text

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(visit, (one, two)[i % 2])
        assert (await two.web("alice", "counter")).json() == {"visits": 9}
        me = (await one.api("GET", "/v1/me")).json()["storage"]
        assert me["blob_keys"] == 1
        assert me["sql_bytes"] > 0
