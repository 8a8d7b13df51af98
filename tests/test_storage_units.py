"""The pure and in-process parts of storage: the SQL policy as a table, the storage messages,
the `[storage]` config, the worker-side facade, and the SQLite backend's per-user bounds."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing

from runtime.config import Config, LimitsConfig, StorageConfig, StoreConfig, parse_config
from runtime.errors import ConfigError, StorageRefusedError
from runtime.pool import ValSpec
from runtime.server import open_storage
from runtime.sqlguard import first_keyword, refusal
from runtime.storage import SqliteStorage
from runtime.storage_api import StorageApi
from runtime.store import AsyncStore
from sandbox.messages import (
    ASKS,
    BlobAnswer,
    BlobAsk,
    MessageError,
    SqlAnswer,
    SqlAsk,
    SqlResult,
    StorageFault,
    encode_sql_results,
    parse,
)
from sandbox.storage import SqlResult as ValSqlResult
from sandbox.storage import StorageError, make_storage
from sandbox.wire import Frame

# The SQL policy


@pytest.mark.parametrize(
    ("action", "arg1", "arg2", "refused"),
    [
        (sqlite3.SQLITE_ATTACH, "/data/sql/bob.sqlite", None, True),
        (sqlite3.SQLITE_ATTACH, "", None, True),  # plain VACUUM's temporary copy
        (sqlite3.SQLITE_DETACH, "x", None, True),
        (sqlite3.SQLITE_TRANSACTION, "BEGIN", None, True),
        (sqlite3.SQLITE_SAVEPOINT, "BEGIN", "a", True),
        (sqlite3.SQLITE_CREATE_TEMP_TABLE, "t", None, True),
        (sqlite3.SQLITE_PRAGMA, "max_page_count", "1000000", True),
        (sqlite3.SQLITE_PRAGMA, "max_page_count", None, True),  # not in the read list
        (sqlite3.SQLITE_PRAGMA, "user_version", "3", True),
        (sqlite3.SQLITE_PRAGMA, "temp_store_directory", "/tmp", True),
        (sqlite3.SQLITE_PRAGMA, "user_version", None, False),
        (sqlite3.SQLITE_PRAGMA, "PAGE_COUNT", None, False),
        (sqlite3.SQLITE_PRAGMA, "table_info", "t", False),
        (sqlite3.SQLITE_FUNCTION, None, "load_extension", True),
        (sqlite3.SQLITE_FUNCTION, None, "FTS3_TOKENIZER", True),
        (sqlite3.SQLITE_FUNCTION, None, "upper", False),
        (sqlite3.SQLITE_READ, "t", "x", False),
        (sqlite3.SQLITE_INSERT, "t", None, False),
        (sqlite3.SQLITE_CREATE_TABLE, "t", None, False),
    ],
)
def test_sql_policy_table(action: int, arg1: str | None, arg2: str | None, refused: bool) -> None:
    reason = refusal(action, arg1, arg2)
    assert (reason is not None) == refused
    if reason is not None:
        assert reason.endswith(("alone", "transaction", "ones")) or "not available" in reason


@pytest.mark.parametrize(
    ("sql", "word"),
    [
        ("VACUUM", "VACUUM"),
        ("  vacuum into 'x'", "VACUUM"),
        ("/* a */ -- b\n VACUUM", "VACUUM"),
        ("-- only a comment", ""),
        ("SELECT 1", "SELECT"),
        ("/* unclosed", ""),
    ],
)
def test_first_keyword_skips_comments(sql: str, word: str) -> None:
    assert first_keyword(sql) == word


# Messages


def roundtrip(message: BlobAsk | SqlAsk | BlobAnswer | SqlAnswer) -> object:
    return type(message).from_frame(message.to_frame())


def test_storage_messages_round_trip_with_bytes_as_raw_bodies() -> None:
    blob = BlobAsk(7, "set", "k/é", body=b"\x00\xff" * 10)
    assert blob.to_frame().body == b"\x00\xff" * 10  # the value as it is, not JSON
    assert roundtrip(blob) == blob
    sql = SqlAsk(7, (("SELECT ?, ?, ?", (b"\x00", None, 1.5)), ("SELECT 1", ())), batch=True)
    assert roundtrip(sql) == sql
    answer = BlobAnswer(7, True, b"value")
    assert roundtrip(answer) == answer
    refused = SqlAnswer(7, error=StorageFault("quota_exceeded", "over"))
    assert roundtrip(refused) == refused
    results = [SqlResult(("a", "b"), ((1, b"\x01"), (None, "x")), 2, 9)]
    assert SqlAnswer(7, encode_sql_results(results)).results() == results
    assert {BlobAsk, SqlAsk} <= set(ASKS)


@pytest.mark.parametrize(
    "frame",
    [
        Frame({"op": "blob", "id": 1, "action": "drop", "key": "k", "limit": 0}),
        Frame({"op": "blob", "id": 1, "action": "get", "key": 5, "limit": 0}),
        Frame({"op": "sql", "id": 1}, b"not json"),
        Frame({"op": "sql", "id": 1}, b'{"a": 1}'),
        Frame({"op": "sql", "id": 1}, b'[["SELECT ?", [{"x": 1}]]]'),
        Frame({"op": "sql", "id": 1}, b'[["SELECT ?", [{"$b": "!!"}]]]'),
        Frame({"op": "sql", "id": 1}, b'[["SELECT ?", [[1]]]]'),
        Frame({"op": "sql", "id": 1}, b"[[1, []]]"),
        Frame({"op": "blob_answer", "id": 1, "error": "no"}),
    ],
)
def test_bad_storage_frames_are_message_errors(frame: Frame) -> None:
    with pytest.raises(MessageError):
        parse(frame, BlobAsk, SqlAsk, BlobAnswer)


# Config


def test_storage_config_defaults_and_keys() -> None:
    config = parse_config({"storage": {"max_user_bytes": 10_000_000, "sql_timeout_s": 1}})
    assert config.storage == StorageConfig(max_user_bytes=10_000_000, sql_timeout_s=1.0)
    defaults = StorageConfig()
    assert defaults.max_user_bytes == defaults.max_sql_bytes == 100 * 1024 * 1024
    assert defaults.max_value_bytes == 5 * 1024 * 1024
    assert defaults.sql_timeout_s == 2.0
    assert defaults.data_path("/srv/valrun.db") == Path("/srv/valrun-data")
    assert StorageConfig(data_dir="/x").data_path("/srv/valrun.db") == Path("/x")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"storage": {"max_sql_byte": 1}}, "storage.max_sql_byte"),
        ({"storage": {"sql_timeout_s": 0}}, "storage.sql_timeout_s"),
        ({"storage": {"max_user_bytes": "1"}}, "storage.max_user_bytes"),
        ({"storage": {"max_value_bytes": 10, "max_user_bytes": 5}}, "storage.max_value_bytes"),
    ],
)
def test_bad_storage_config_names_the_key(raw: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        parse_config(raw)


def test_the_value_cap_is_at_most_the_response_cap(tmp_path: Path) -> None:
    config = Config(
        store=StoreConfig(url=f"sqlite:///{tmp_path}/valrun.db"),
        limits=LimitsConfig(max_response_body_bytes=1024),
    )
    storage = open_storage(config)
    try:
        assert storage.config.max_value_bytes == 1024
        assert storage.max_result_bytes == 1024
        assert (tmp_path / "valrun-data" / "sql").is_dir()
    finally:
        storage.close()


# The worker side, with a fake front end


def test_worker_side_checks_before_asking_and_raises_the_answers_fault() -> None:
    asked: list[object] = []

    def ask(message: object, answer: type) -> object:
        asked.append(message)
        if isinstance(message, SqlAsk):
            return SqlAnswer(0, error=StorageFault("sql_refused", "no ATTACH"))
        return BlobAnswer(0, False)

    members = make_storage(ask, max_ask_bytes=100)  # type: ignore[arg-type]
    blob, sqlite = members["blob"], members["sqlite"]
    with pytest.raises(StorageError) as caught:
        blob.set("k", b"x" * 101)  # type: ignore[attr-defined]
    assert caught.value.kind == "value_too_large"
    with pytest.raises(StorageError) as caught:
        blob.get("")  # type: ignore[attr-defined]
    assert caught.value.kind == "bad_key"
    with pytest.raises(StorageError) as caught:
        sqlite.execute("SELECT ?", [object()])  # type: ignore[attr-defined]
    assert caught.value.kind == "bad_value"
    assert asked == []  # none of those reached the front end
    assert blob.get("k") is None  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="no ATTACH") as caught:
        sqlite.execute("ATTACH 'x' AS y")  # type: ignore[attr-defined]
    assert caught.value.kind == "sql_refused"


def test_sql_result_is_closed_to_vals() -> None:
    result = ValSqlResult(["a"], [(1,)], 0, 0)
    assert result.rows == [[1]]
    assert not hasattr(result, "__dict__")
    with pytest.raises(TypeError):
        type("Sub", (ValSqlResult,), {})
    with pytest.raises(AttributeError):
        result.rows = []


# The backend's per-user bounds

RUNAWAY = [
    ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r", ())
]


async def test_one_users_calls_queue_behind_each_other_and_overflow_is_busy(
    tmp_path: Path,
) -> None:
    config = StorageConfig(sql_timeout_s=1.0, max_waiting_per_user=2, sql_threads=2)
    storage = SqliteStorage(config, tmp_path, 1024 * 1024)
    outcomes: list[str] = []

    async def alice() -> None:
        try:
            await storage.sql("alice", RUNAWAY, batch=False)
        except StorageRefusedError as exc:
            outcomes.append(exc.type)

    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(alice)
                nursery.start_soon(alice)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(StorageRefusedError) as busy:
                    await storage.sql("alice", [("SELECT 1", ())], batch=False)
                assert busy.value.type == "busy"
                # Another user is answered at once, while alice's two run one after the other.
                started = trio.current_time()
                assert b"[[2]]" in await storage.sql("bob", [("SELECT 2", ())], batch=False)
                assert trio.current_time() - started < 0.8
            assert outcomes == ["sql_timeout", "sql_timeout"]
    finally:
        storage.close()


async def test_blob_write_over_quota_changes_nothing(tmp_path: Path) -> None:
    storage = SqliteStorage(StorageConfig(max_user_bytes=100, max_value_bytes=80), tmp_path, 1024)
    try:
        await storage.blob_set("alice", "k", b"x" * 80)
        with pytest.raises(StorageRefusedError) as over:
            await storage.blob_set("alice", "j", b"y" * 30)
        assert over.value.type == "quota_exceeded"
        assert await storage.blob_get("alice", "j") is None
        usage = await storage.usage("alice")
        assert (usage.blob_bytes, usage.blob_keys) == (81, 1)
        assert await storage.blob_delete("alice", "k")
        assert (await storage.usage("alice")).blob_bytes == 0
        with pytest.raises(StorageRefusedError):
            await storage.blob_get("../alice", "k")  # a user name names a file: checked
    finally:
        storage.close()


async def test_sql_answer_is_the_wire_json_of_the_results(tmp_path: Path) -> None:
    storage = SqliteStorage(StorageConfig(), tmp_path, 1024 * 1024)
    try:
        body = await storage.sql(
            "alice",
            [
                ("CREATE TABLE t (a, b)", ()),
                ("INSERT INTO t VALUES (?, ?), (?, ?)", (1, b"\x00", "x", None)),
                ("SELECT a, b FROM t ORDER BY rowid", ()),
                ("SELECT a FROM t WHERE 0", ()),
            ],
            batch=True,
        )
        expected = [
            SqlResult((), (), 0, 0),
            SqlResult((), (), 2, 2),
            SqlResult(("a", "b"), ((1, b"\x00"), ("x", None)), 0, 2),
            SqlResult(("a",), (), 0, 2),
        ]
        assert SqlAnswer(0, body).results() == expected
        assert body == encode_sql_results(expected)
    finally:
        storage.close()


async def test_an_eval_without_a_token_has_no_storage(tmp_path: Path) -> None:
    storage = SqliteStorage(StorageConfig(), tmp_path, 1024)
    api = StorageApi(storage, cast(AsyncStore, None), StorageConfig())
    anonymous = ValSpec(0, 0, "", "eval", "", (), "", "eval")
    try:
        blob = await api.answer_blob(anonymous, BlobAsk(3, "get", "k"))
        sql = await api.answer_sql(anonymous, SqlAsk(3, (("SELECT 1", ()),)))
        assert blob.error is not None
        assert blob.error.type == "no_owner"
        assert sql.error is not None
        assert sql.error.type == "no_owner"
        assert (blob.id, sql.id) == (3, 3)
        alice = ValSpec(1, 1, "alice", "v", "", (), "")
        assert (await api.answer_sql(alice, SqlAsk(4, (("SELECT 1", ()),)))).error is None
    finally:
        storage.close()


async def test_infinite_reals_are_valid_json_numbers(tmp_path: Path) -> None:
    storage = SqliteStorage(StorageConfig(), tmp_path, 1024)
    try:
        body = await storage.sql("alice", [("SELECT 1e999, -1e999, 1.5", ())], batch=False)
    finally:
        storage.close()

    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    rows = json.loads(body, parse_constant=refuse)[0]["rows"]
    assert rows == [[math.inf, -math.inf, 1.5]]
