"""Blob and SQL storage through the real server: vals (web, Run, Eval) and the owner's API.

Every call goes val -> worker -> ask frame -> front end -> storage and back, once with each
backend: SQLite files, and PostgreSQL (a tenant database per user, tests/pg_kit.py's server).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import httpx
import pytest
import trio

from runtime import server
from runtime.config import Config, StoreConfig
from runtime.demo import DEMO_VALS
from runtime.storage import StorageBackend
from tests import pg_kit
from tests.helpers import Service, StartService, assert_json_error, valrun

PRELUDE = "from std import blob, sqlite, StorageError\n"
Kind = Literal["sqlite", "postgresql"]


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def storage_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kind]:
    """Every test once per backend: for PostgreSQL, the service's storage is PgStorage on
    a fresh database of the session's PostgreSQL (the store itself stays SQLite here)."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    url = request.getfixturevalue("pg_url")
    open_storage = server.open_storage

    def open_pg_storage(config: Config) -> StorageBackend:
        return open_storage(replace(config, store=StoreConfig(url=url)))

    monkeypatch.setattr(server, "open_storage", open_pg_storage)
    yield "postgresql"
    pg_kit.drop_storage_tenants(url)


async def evaluate(service: Service, code: str, *, user: str = "alice") -> object:
    """The value of `code`, run by the Eval API as `user` (with their storage)."""
    response = await service.api(
        "POST", "/v1/eval", user=user, json={"code": PRELUDE + textwrap.dedent(code)}
    )
    assert response.status_code == 200, response.text
    return response.json()


async def attempt(service: Service, call: str, *, user: str = "alice") -> list[object]:
    """["ok", value] or [kind, message] of the StorageError that `call` raised."""
    code = f"""
def attempt():
    try:
        return ["ok", {call}]
    except StorageError as exc:
        return [exc.kind, str(exc)]
attempt()
"""
    result = await evaluate(service, code, user=user)
    assert isinstance(result, list)
    return result


# Blob


async def test_blob_get_set_delete_and_json(service: Service) -> None:
    result = await evaluate(
        service,
        """
blob.set("greeting", "hi")
blob.set("raw", b"\\x00\\xff")
blob.set_json("config", {"n": [1, 2]})
[
    blob.get("greeting").decode(),
    list(blob.get("raw")),
    blob.get_json("config"),
    blob.get("missing"),
    blob.get_json("missing", "fallback"),
    blob.delete("greeting"),
    blob.delete("greeting"),
    blob.get("greeting"),
]
""",
    )
    assert result == ["hi", [0, 255], {"n": [1, 2]}, None, "fallback", True, False, None]


async def test_blob_list_is_sorted_prefixed_and_paged(service: Service) -> None:
    result = await evaluate(
        service,
        """
for key in ["b/2", "a", "b/1", "b/3", "c", "é"]:
    blob.set(key, "x" * len(key))
page1 = blob.list(prefix="b/", limit=2)
page2 = blob.list(prefix="b/", after=page1[-1]["key"], limit=2)
[
    [e["key"] for e in blob.list()],
    [e["key"] for e in page1],
    [e["key"] for e in page2],
    sorted(blob.list()[0]),
    blob.list(prefix="b/1")[0]["size"],
]
""",
    )
    assert result == [
        ["a", "b/1", "b/2", "b/3", "c", "é"],
        ["b/1", "b/2"],
        ["b/3"],
        ["key", "size", "updated_at"],
        3,
    ]


@pytest.mark.parametrize(
    ("call", "kind"),
    [
        ('blob.get("")', "bad_key"),
        ('blob.set("k" * 513, "v")', "bad_key"),
        ('blob.set("é" * 257, "v")', "bad_key"),  # 514 bytes of UTF-8
        ("blob.get(1)", "bad_key"),
        ('blob.set("k", 1.5)', "bad_value"),
        ('blob.set_json("k", {1, 2})', "bad_value"),
        ("blob.list(limit=1001)", "bad_value"),
        ('blob.set("k", "v" * 2049)', "value_too_large"),
    ],
)
async def test_blob_refuses_bad_keys_and_values(
    start_service: StartService, call: str, kind: str
) -> None:
    service = await start_service(max_value_bytes=2048)
    result = await attempt(service, call)
    assert result[0] == kind, result
    assert result[1]


async def test_blob_key_of_512_bytes_is_allowed(service: Service) -> None:
    assert await evaluate(service, 'blob.set("é" * 256, "v")\nblob.get("é" * 256).decode()') == "v"


async def test_blob_quota_refuses_and_changes_nothing(start_service: StartService) -> None:
    service = await start_service(max_user_bytes=10_000, max_value_bytes=4_000)
    assert await evaluate(service, 'blob.set("a", "x" * 4000)\nblob.set("b", "y" * 4000)') is None
    # a (1 + 4000) + b (1 + 4000) = 8002 bytes; a third value of 4000 would be 12003.
    result = await attempt(service, 'blob.set("c", "z" * 4000)')
    assert result[0] == "quota_exceeded"
    assert "10000" in str(result[1])
    # Replacing a value counts only the difference: this fits.
    assert await attempt(service, 'blob.set("a", "w" * 3000)') == ["ok", None]
    state = await evaluate(
        service, '[blob.get("c"), blob.get("a")[:1].decode(), [e["key"] for e in blob.list()]]'
    )
    assert state == [None, "w", ["a", "b"]]
    me = (await service.api("GET", "/v1/me")).json()
    assert me["storage"]["blob_bytes"] == 1 + 3000 + 1 + 4000
    assert me["storage"]["blob_keys"] == 2
    assert me["storage"]["max_blob_bytes"] == 10_000


# SQL


#: A table whose id is given by the database: SQLite's rowid, PostgreSQL's identity column.
AUTO_ID = {
    "sqlite": "id INTEGER PRIMARY KEY",
    "postgresql": "id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
}
BLOB = {"sqlite": "BLOB", "postgresql": "bytea"}


async def test_sqlite_execute_returns_columns_rows_and_counts(
    service: Service, storage_kind: Kind
) -> None:
    table = (
        f"CREATE TABLE t ({AUTO_ID[storage_kind]}, name TEXT, data {BLOB[storage_kind]}, x REAL)"
    )
    result = await evaluate(
        service,
        f"sqlite.execute({table!r})"
        + """

first = sqlite.execute("INSERT INTO t (name, data, x) VALUES (?, ?, ?)", ("a", b"\\x01", 1.5))
second = sqlite.execute("INSERT INTO t (name) VALUES (?), (?)", ["b", None])
updated = sqlite.execute("UPDATE t SET x = 2 WHERE id > ?", (1,))
rows = sqlite.execute("SELECT id, name, data, x FROM t ORDER BY id")
[
    first.rows_affected, first.last_insert_rowid,
    second.rows_affected, second.last_insert_rowid,
    updated.rows_affected,
    rows.columns, rows.rows[0][:2], list(rows.rows[0][2]), rows.rows[0][3], rows.rows[2],
    rows.rows_affected,
]
""",
    )
    # PostgreSQL has no rowid: last_insert_rowid is 0 there (RETURNING id gives it).
    rowids = [1, 3] if storage_kind == "sqlite" else [0, 0]
    assert result == [
        1, rowids[0],
        2, rowids[1],
        2,
        ["id", "name", "data", "x"], [1, "a"], [1], 1.5, [3, None, None, 2.0],
        0,
    ]  # fmt: skip


async def test_sqlite_batch_is_all_or_nothing(service: Service) -> None:
    await evaluate(service, 'sqlite.execute("CREATE TABLE t (n INTEGER UNIQUE)").rows')
    result = await attempt(
        service,
        'sqlite.batch(["INSERT INTO t VALUES (1)", ("INSERT INTO t VALUES (?)", [2]), '
        '"INSERT INTO t VALUES (1)"])',
    )
    assert result[0] == "sql_error"
    assert "unique" in str(result[1]).lower()
    assert await evaluate(service, 'sqlite.execute("SELECT count(*) FROM t").rows') == [[0]]
    results = await evaluate(
        service,
        '[r.rows_affected for r in sqlite.batch(["INSERT INTO t VALUES (1)", '
        '("INSERT INTO t VALUES (?)", (2,)), "SELECT * FROM t"])]',
    )
    assert results == [1, 1, 0]
    assert await evaluate(service, 'sqlite.execute("SELECT n FROM t ORDER BY n").rows') == [
        [1],
        [2],
    ]


@pytest.mark.parametrize(
    ("sql", "sqlite_kind", "postgresql_kind"),
    [
        ("ATTACH 'other.sqlite' AS other", "sql_refused", "sql_refused"),
        ("DETACH main", "sql_refused", "sql_refused"),
        ("VACUUM INTO '/tmp/valrun-copy.sqlite'", "sql_refused", "sql_refused"),
        ("VACUUM", "sql_refused", "sql_refused"),
        ("PRAGMA max_page_count = 1000000000", "sql_refused", "sql_refused"),
        ("PRAGMA journal_mode = DELETE", "sql_refused", "sql_refused"),
        ("PRAGMA user_version = 3", "sql_refused", "sql_refused"),
        ("PRAGMA writable_schema = ON", "sql_refused", "sql_refused"),
        # PostgreSQL has no such function: an error, and nothing ran.
        ("SELECT load_extension('/tmp/evil.so')", "sql_refused", "sql_error"),
        ("SELECT fts3_tokenizer('simple')", "sql_refused", "sql_error"),
        ("BEGIN", "sql_refused", "sql_refused"),
        ("SAVEPOINT a", "sql_refused", "sql_refused"),
        ("CREATE TEMP TABLE t (x TEXT)", "sql_refused", "sql_refused"),
        ("SELECT * FROM nowhere", "sql_error", "sql_error"),
        # SQLite: "one statement at a time"; PostgreSQL refuses a second command itself.
        ("SELECT 1; SELECT 2", "sql_error", "sql_refused"),
        ("SELEKT 1", "sql_error", "sql_error"),
    ],
)
async def test_statements_that_reach_outside_are_refused(
    service: Service, storage_kind: Kind, sql: str, sqlite_kind: str, postgresql_kind: str
) -> None:
    result = await attempt(service, f"sqlite.execute({sql!r})")
    assert result[0] == (sqlite_kind if storage_kind == "sqlite" else postgresql_kind), result
    assert result[1]


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA table_info(t)",
        "SELECT name FROM pragma_table_info('t')",
        "PRAGMA page_count",
        "PRAGMA user_version",
        "PRAGMA index_list(t)",
    ],
)
async def test_read_only_pragmas_are_allowed(
    service: Service, storage_kind: Kind, sql: str
) -> None:
    if storage_kind == "postgresql":  # no pragmas there: the catalog answers instead
        assert (await attempt(service, f"sqlite.execute({sql!r})"))[0] in (
            "sql_refused", "sql_error",  # pragma_table_info is no function there
        )  # fmt: skip
        sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 't'"
    result = await evaluate(
        service, f'sqlite.execute("CREATE TABLE t (x TEXT)")\nsqlite.execute({sql!r}).columns'
    )
    assert isinstance(result, list)
    assert result


async def test_a_result_over_the_cap_is_refused_not_truncated(
    start_service: StartService,
) -> None:
    service = await start_service(max_response_body_bytes=64 * 1024, max_value_bytes=1024)
    result = await attempt(
        service,
        'sqlite.execute("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r '
        "WHERE i < 20000) SELECT i, 'padding-padding' FROM r\")",
    )
    assert result[0] == "result_too_large"
    # A write whose RETURNING is too large is refused and changes nothing.
    await evaluate(service, 'sqlite.execute("CREATE TABLE t (s TEXT)").rows')
    result = await attempt(
        service,
        'sqlite.execute("INSERT INTO t WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL '
        "SELECT i + 1 FROM r WHERE i < 20000) SELECT 'padding-padding' FROM r RETURNING s\")",
    )
    assert result[0] == "result_too_large"
    assert await evaluate(service, 'sqlite.execute("SELECT count(*) FROM t").rows') == [[0]]


#: 1,000 random hex digits (incompressible enough that PostgreSQL stores them as they are).
RANDOM_KB = {
    "sqlite": "hex(randomblob(500))",
    "postgresql": "(SELECT string_agg(md5(random()::text || g), '') FROM "
    "generate_series(1, 31) AS g WHERE r.i > 0)",
}


async def test_sql_quota_reached_mid_batch_leaves_nothing_written(
    start_service: StartService, storage_kind: Kind
) -> None:
    service = await start_service(max_sql_bytes=256 * 1024)
    await evaluate(service, 'sqlite.execute("CREATE TABLE t (s TEXT)").rows')
    # Each statement adds ~100 KiB: the third passes the 256 KiB quota.
    insert = (
        "INSERT INTO t WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r "
        f"WHERE i < 100) SELECT {RANDOM_KB[storage_kind]} FROM r"
    )
    result = await attempt(service, f"sqlite.batch([{insert!r}] * 4)")
    assert result[0] == "quota_exceeded", result
    assert await evaluate(service, 'sqlite.execute("SELECT count(*) FROM t").rows') == [[0]]
    # What fits is still written, and the database stays usable.
    assert await evaluate(service, f"sqlite.execute({insert!r}).rows_affected") == 100
    me = (await service.api("GET", "/v1/me")).json()["storage"]
    assert 100_000 < me["sql_bytes"] <= 256 * 1024
    assert me["max_sql_bytes"] == 256 * 1024


#: Statements that would run for hours. PostgreSQL keeps a recursive CTE's rows in a
#: tuplestore, whose temp files reach the role's temp_file_limit within a second or two:
#: there the runaway is a join that only burns CPU.
RUNAWAY = {
    "sqlite": "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
    "SELECT count(*) FROM r",
    "postgresql": "SELECT count(*) FROM generate_series(1, 50000) a, generate_series(1, 50000) b",
}


async def test_runaway_query_is_interrupted_on_time_while_others_answer(
    start_service: StartService, storage_kind: Kind
) -> None:
    service = await start_service(sql_timeout_s=1.5, wall_time_s=10.0)
    sql = RUNAWAY[storage_kind]
    await service.put_val("runaway", f"{PRELUDE}def runaway(req):\n    try:\n"
                          f"        sqlite.execute({sql!r})\n    except StorageError as e:\n"
                          "        return [e.kind, str(e)]\n")  # fmt: skip
    await evaluate(service, 'sqlite.execute("SELECT 1").rows')  # alice's database exists
    await service.put_val(
        "quick",
        f'{PRELUDE}def quick(req):\n    return sqlite.execute("SELECT 42").rows\n',
        user="bob",
    )
    assert (await service.web("bob", "quick")).json() == [[42]]  # warm
    quick_times: list[float] = []
    runaway: list[httpx.Response] = []

    async def run_runaway() -> None:
        started = trio.current_time()
        runaway.append(await service.web("alice", "runaway"))
        quick_times.append(-(trio.current_time() - started))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_runaway)
            await trio.sleep(0.3)  # let the runaway start; bob must not wait behind it
            while not runaway:
                started = trio.current_time()
                response = await service.web("bob", "quick")
                assert response.json() == [[42]]
                quick_times.append(trio.current_time() - started)
                await trio.sleep(0.05)
    assert runaway[0].json()[0] == "sql_timeout"
    runaway_s = -min(quick_times)
    assert 1.4 < runaway_s < 1.5 + 2.0
    bob_times = [t for t in quick_times if t > 0]
    assert len(bob_times) >= 3
    assert max(bob_times) < 1.0  # never held up for the runaway's duration


async def test_sql_never_runs_past_the_vals_remaining_time(
    start_service: StartService, storage_kind: Kind
) -> None:
    service = await start_service(sql_timeout_s=30.0, wall_time_s=1.5)
    await service.put_val(
        "runaway", f"{PRELUDE}def runaway(req):\n    sqlite.execute({RUNAWAY[storage_kind]!r})\n"
    )
    with trio.fail_after(15):
        started = trio.current_time()
        response = await service.web("alice", "runaway")
        assert response.status_code == 504
        # The statement stopped with the val: the user's next SQL call does not wait for it.
        result = await evaluate(service, 'sqlite.execute("SELECT 7").rows')
        elapsed = trio.current_time() - started
    assert result == [[7]]
    assert elapsed < 1.5 + 3.0


async def test_storage_at_module_level_is_a_clear_val_error(service: Service) -> None:
    await service.put_val("early", f'{PRELUDE}x = blob.get("k")\ndef early(req):\n    return 1\n')
    # Its owner reads why it failed to load (anyone else is told only that it did).
    response = await service.api("POST", "/v1/run/alice.early", json={"args": []})
    error = assert_json_error(response, 502, "val_error")
    assert "not while its module loads" in error["message"]


# Parallel writers


@pytest.mark.parametrize("val", ["counter", "update"])
async def test_eight_parallel_increments_give_eight(start_service: StartService, val: str) -> None:
    service = await start_service(max_workers_per_val=4)
    code = DEMO_VALS["counter"]
    if val == "update":
        code = (
            f"{PRELUDE}sql = 'UPDATE c SET n = n + 1 WHERE id = 1'\n"
            "def update(req):\n"
            "    sqlite.execute(sql)\n"
            "    return {'visits': sqlite.execute('SELECT n FROM c').rows[0][0]}\n"
        )
        await evaluate(
            service,
            'sqlite.batch(["CREATE TABLE c (id INTEGER PRIMARY KEY, n INTEGER)", '
            '"INSERT INTO c VALUES (1, 0)"]) and None',
        )
    await service.put_val(val, code)
    answers: list[int] = []

    async def one() -> None:
        response = await service.web("alice", val)
        assert response.status_code == 200, response.text
        answers.append(response.json()["visits"])

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
    assert max(answers) == 8
    if val == "counter":  # RETURNING: each increment sees its own result
        assert sorted(answers) == list(range(1, 9))
    final = await evaluate(service, 'sqlite.execute("SELECT n FROM ' + (
        "visits" if val == "counter" else "c") + '").rows[0][0]')  # fmt: skip
    assert final == 8


async def test_demo_guestbook_keeps_every_parallel_entry(service: Service) -> None:
    await service.put_val("guestbook", DEMO_VALS["guestbook"])

    async def sign(i: int) -> None:
        response = await service.web(
            "alice", "guestbook", method="POST", data={"name": f"n{i}", "message": f"m{i}"}
        )
        assert response.status_code == 303, response.text

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(sign, i)
    entries = (await service.web("alice", "guestbook", "/?format=json")).json()
    assert sorted(e["message"] for e in entries) == [f"m{i}" for i in range(8)]
    page = await service.web("alice", "guestbook")
    assert "<b>n3</b>" in page.text


# Isolation


async def test_two_users_share_no_names(service: Service) -> None:
    await evaluate(service, 'blob.set("shared", "alice\'s")', user="alice")
    await evaluate(service, 'sqlite.execute("CREATE TABLE secrets (s TEXT)").rows', user="alice")
    await evaluate(
        service, "sqlite.execute(\"INSERT INTO secrets VALUES ('a')\").rows", user="alice"
    )
    assert await evaluate(service, 'blob.get("shared")', user="bob") is None
    assert await evaluate(service, "blob.list()", user="bob") == []
    assert (await attempt(service, 'sqlite.execute("SELECT * FROM secrets")', user="bob"))[
        0
    ] == "sql_error"
    # Every val of a user shares the user's namespace.
    await service.put_val("reader", f'{PRELUDE}def reader(req):\n    return blob.get("shared")\n')
    assert (await service.web("alice", "reader")).content == b"alice's"


async def test_sql_cannot_reach_the_other_users_file(service: Service, storage_kind: Kind) -> None:
    await evaluate(service, 'sqlite.execute("CREATE TABLE secrets (s TEXT)").rows', user="alice")
    path = service.db_path.with_name(service.db_path.stem + "-data") / "sql" / "alice.sqlite"
    assert path.exists() == (storage_kind == "sqlite")  # PostgreSQL: a database, no file
    for sql in (
        f"ATTACH '{path}' AS a",
        f"ATTACH 'file:{path}?mode=ro' AS a",
        f"VACUUM INTO '{path}'",
        "ATTACH 'alice.sqlite' AS a",
    ):
        result = await attempt(service, f"sqlite.execute({sql!r})", user="bob")
        assert result[0] == "sql_refused", (sql, result)
    assert await evaluate(service, 'sqlite.execute("SELECT count(*) FROM secrets").rows') == [[0]]


async def test_one_users_quota_does_not_touch_anothers(start_service: StartService) -> None:
    service = await start_service(max_user_bytes=5_000, max_value_bytes=4_000)
    await evaluate(service, 'blob.set("big", "x" * 4000)', user="alice")
    assert (await attempt(service, 'blob.set("more", "x" * 2000)', user="alice"))[
        0
    ] == "quota_exceeded"
    assert await attempt(service, 'blob.set("more", "x" * 4000)', user="bob") == ["ok", None]


# The owner's API


async def test_owner_api_blob_routes(service: Service) -> None:
    put = await service.api("PUT", "/v1/blob/notes/a b", content=b"\x00bytes")
    assert put.status_code == 200, put.text
    assert put.json() == {"key": "notes/a b", "size": 6}
    got = await service.api("GET", "/v1/blob/notes/a%20b")
    assert got.status_code == 200
    assert got.content == b"\x00bytes"
    assert got.headers["content-type"] == "application/octet-stream"
    for key in ("k1", "k2", "k3"):
        await service.api("PUT", f"/v1/blob/{key}", content=key.encode())
    page = (await service.api("GET", "/v1/blob?prefix=k&limit=2")).json()
    assert [b["key"] for b in page["blobs"]] == ["k1", "k2"]
    assert page["next"] == "k2"
    rest = (await service.api("GET", "/v1/blob?prefix=k&limit=2&after=k2")).json()
    assert [b["key"] for b in rest["blobs"]] == ["k3"]
    assert rest["next"] is None
    # A val of the owner sees what the API wrote.
    assert await evaluate(service, 'blob.get("k3").decode()') == "k3"
    assert (await service.api("DELETE", "/v1/blob/k3")).json() == {"deleted": "k3"}
    assert_json_error(await service.api("DELETE", "/v1/blob/k3"), 404, "not_found")
    assert_json_error(await service.api("GET", "/v1/blob/k3"), 404, "not_found")
    assert_json_error(await service.api("GET", "/v1/blob/k1", user="bob"), 404, "not_found")
    assert_json_error(await service.api("GET", "/v1/blob/k1", user=None), 401, "unauthorized")
    assert_json_error(await service.api("GET", "/v1/blob?limit=0"), 400, "bad_request")
    assert_json_error(
        await service.api("PUT", "/v1/blob/" + "k" * 513, content=b"x"), 400, "bad_key"
    )


async def test_owner_api_blob_quota_is_413(start_service: StartService) -> None:
    service = await start_service(max_user_bytes=1_000, max_value_bytes=800)
    assert_json_error(
        await service.api("PUT", "/v1/blob/k", content=b"x" * 801), 413, "value_too_large"
    )
    assert (await service.api("PUT", "/v1/blob/k", content=b"x" * 800)).status_code == 200
    assert_json_error(
        await service.api("PUT", "/v1/blob/j", content=b"x" * 300), 413, "quota_exceeded"
    )


async def test_owner_api_sql_routes(service: Service, storage_kind: Kind) -> None:
    created = await service.api(
        "POST", "/v1/sqlite/batch",
        json={"statements": [
            f"CREATE TABLE t ({AUTO_ID[storage_kind]}, b {BLOB[storage_kind]})",
            ["INSERT INTO t (b) VALUES (?)", [{"$b": "AAE="}]],
            {"sql": "INSERT INTO t (b) VALUES (?)", "args": ["text"]},
        ]},
    )  # fmt: skip
    assert created.status_code == 200, created.text
    assert [r["rows_affected"] for r in created.json()["results"]] == [0, 1, 1]
    selected = await service.api(
        "POST", "/v1/sqlite/execute", json={"sql": "SELECT id, b FROM t WHERE id > ?", "args": [0]}
    )
    # SQLite keeps a text in a BLOB column as text; PostgreSQL makes it bytea.
    second = "text" if storage_kind == "sqlite" else {"$b": "dGV4dA=="}
    assert selected.json() == {
        "columns": ["id", "b"],
        "rows": [[1, {"$b": "AAE="}], [2, second]],
        "rows_affected": 0,
        "last_insert_rowid": 2 if storage_kind == "sqlite" else 0,
    }
    assert await evaluate(service, 'list(sqlite.execute("SELECT b FROM t").rows[0][0])') == [0, 1]
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", json={"sql": "SELEKT"}), 400, "sql_error"
    )
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", json={"sql": "ATTACH 'x' AS x"}),
        400,
        "sql_refused",
    )
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", json={"sql": "SELECT 1", "arg": []}),
        400,
        "bad_request",
    )
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", json={"sql": "SELECT ?", "args": [{}]}),
        400,
        "bad_args",
    )
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", content=b"{"), 400, "bad_json"
    )
    assert_json_error(
        await service.api("POST", "/v1/sqlite/execute", user=None, json={"sql": "SELECT 1"}),
        401,
        "unauthorized",
    )
    bob = await service.api(
        "POST", "/v1/sqlite/execute", user="bob", json={"sql": "SELECT * FROM t"}
    )
    assert_json_error(bob, 400, "sql_error")


async def test_me_shows_storage_usage(service: Service) -> None:
    empty = (await service.api("GET", "/v1/me", user="bob")).json()
    assert empty["storage"]["blob_bytes"] == 0
    assert empty["storage"]["sql_bytes"] == 0
    await evaluate(service, 'blob.set("ab", "xyz")\nsqlite.execute("CREATE TABLE t (x TEXT)").rows')
    usage = (await service.api("GET", "/v1/me")).json()["storage"]
    assert usage["blob_bytes"] == 5
    assert usage["blob_keys"] == 1
    assert usage["sql_bytes"] > 0


# The CLI


async def test_cli_blob_and_sql(service: Service, tmp_path: Path) -> None:
    token = ("--token", service.tokens["alice"])
    value = tmp_path / "value.bin"
    value.write_bytes(b"\x00binary\xff")
    put = await valrun(service, "blob", "put", *token, "files/a b", str(value))
    assert put.returncode == 0, put.stderr
    from_stdin = await valrun(service, "blob", "put", *token, "files/c", "-", stdin=b"text")
    assert from_stdin.returncode == 0, from_stdin.stderr
    listed = await valrun(service, "blob", "ls", *token, "files/")
    assert [line.split()[-1] for line in listed.stdout.decode().splitlines()] == ["b", "files/c"]
    assert "files/a b" in listed.stdout.decode()
    got = await valrun(service, "blob", "get", *token, "files/a b")
    assert got.stdout == b"\x00binary\xff"
    removed = await valrun(service, "blob", "rm", *token, "files/c")
    assert removed.returncode == 0, removed.stderr
    assert await evaluate(service, 'blob.get("files/c")') is None
    missing = await valrun(service, "blob", "get", *token, "files/c")
    assert missing.returncode != 0
    assert b"404" in missing.stderr

    created = await valrun(service, "sql", *token, "CREATE TABLE t (n INTEGER, s TEXT)")
    assert created.stdout == b"0 rows affected\n", created.stderr
    inserted = await valrun(service, "sql", *token, "INSERT INTO t VALUES (?, ?)", "1", "one")
    assert inserted.stdout == b"1 rows affected\n"
    selected = await valrun(service, "sql", *token, "SELECT n, s FROM t")
    assert selected.stdout == b"n\ts\n1\tone\n"
    as_json = await valrun(service, "sql", *token, "--json", "SELECT n FROM t")
    assert json.loads(as_json.stdout)["rows"] == [[1]]
    refused = await valrun(service, "sql", *token, "ATTACH 'x' AS y")
    assert refused.returncode != 0
    assert b"sql_refused" in refused.stderr
