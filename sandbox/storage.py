"""`blob` and `sqlite` in `std`: the val owner's key-value store and SQL database.

Nothing is stored here: each call sends an ask (`BlobAsk`, `SqlAsk`) over the worker's socket
and blocks for the front end's answer (`runtime.storage` does the work, under the owner's
quotas). What a call can check on its own (a key's type and length, a value's type) is checked
here first, so the val gets its `StorageError` without a round trip; the front end checks
everything again, because this side is the val's.

`SqlResult` is handed to val code, so it follows `sandbox.http`'s rules: underscore slots,
plain values only, no subclasses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sandbox.facades import Facade
from sandbox.http import dumps_json
from sandbox.messages import (
    BlobAction,
    BlobAnswer,
    BlobAsk,
    MessageError,
    SqlAnswer,
    SqlAsk,
    SqlValue,
    Statement,
    StorageFault,
)

MAX_KEY_BYTES = 512
#: What one `blob.list` answers at most; page with `after=` the last key seen.
MAX_LIST = 1000

if TYPE_CHECKING:
    from sandbox.std import Asker


class StorageError(Exception):
    """A blob or SQL call failed; nothing was changed. `kind` says why: `bad_key`,
    `bad_value`, `value_too_large`, `quota_exceeded`, `sql_error`, `sql_refused`,
    `sql_timeout`, `result_too_large`, `busy`, `no_owner`, `storage_failed`."""

    def __init__(self, message: str, kind: str = "storage_error") -> None:
        super().__init__(message)
        self.kind = kind


def _raise(fault: StorageFault | None) -> None:
    if fault is not None:
        raise StorageError(fault.message, fault.type)


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise StorageError(f"a blob key must be a str, not {type(key).__name__}", "bad_key")
    key = str.__str__(key)  # a val's str subclass decides nothing here
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StorageError(
            "a blob key must be valid Unicode (no lone surrogates)", "bad_key"
        ) from None
    if not 0 < size <= MAX_KEY_BYTES:
        raise StorageError(
            f"a blob key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8, not {size}", "bad_key"
        )
    return key


def _value_bytes(value: object) -> bytes:
    if isinstance(value, str):
        try:
            return str.encode(str.__str__(value), "utf-8")
        except UnicodeEncodeError:
            raise StorageError("a str value must be valid Unicode", "bad_value") from None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise StorageError(
        f"a blob value must be bytes or str, not {type(value).__name__}; use set_json for "
        "other values",
        "bad_value",
    )


def _sql_value(value: object) -> SqlValue:
    # Subclasses become their base type: a val's `__str__` or `__index__` never runs later.
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise StorageError(
        f"a SQL argument must be None, int, float, str or bytes, not {type(value).__name__}",
        "bad_value",
    )


def _statement(item: object) -> Statement:
    if isinstance(item, str):
        return (str.__str__(item), ())
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
        return (str.__str__(item[0]), _args(item[1]))
    raise StorageError("each statement must be a SQL string or a (sql, args) pair", "bad_value")


def _args(args: object) -> tuple[SqlValue, ...]:
    if not isinstance(args, tuple | list):
        raise StorageError(f"args must be a tuple or list, not {type(args).__name__}", "bad_value")
    return tuple(_sql_value(v) for v in args)


class SqlResult:
    """What one statement gave: `columns`, `rows` (lists), `rows_affected`,
    `last_insert_rowid`."""

    __slots__ = ("_columns", "_last_insert_rowid", "_rows", "_rows_affected")

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise TypeError("SqlResult cannot be subclassed")

    def __init__(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[SqlValue]],
        rows_affected: int,
        last_insert_rowid: int,
    ) -> None:
        self._columns = list(columns)
        self._rows = [list(row) for row in rows]
        self._rows_affected = rows_affected
        self._last_insert_rowid = last_insert_rowid

    columns = property(lambda self: self._columns)
    rows = property(lambda self: self._rows)
    rows_affected = property(lambda self: self._rows_affected)
    last_insert_rowid = property(lambda self: self._last_insert_rowid)

    def __repr__(self) -> str:
        return f"<SqlResult {len(self._rows)} rows, {self._rows_affected} affected>"


def make_storage(ask: Asker, max_ask_bytes: int) -> dict[str, object]:
    """The storage members of `std`: `blob`, `sqlite` and `StorageError`. `max_ask_bytes`
    is what the front end reads from a worker in one frame; more is refused here."""

    def blob_ask(
        action: BlobAction, key: str, body: bytes = b"", after: str = "", limit: int = 0
    ) -> BlobAnswer:
        if len(body) > max_ask_bytes:
            raise StorageError(
                f"the value of {len(body)} bytes is over the {max_ask_bytes}-byte limit",
                "value_too_large",
            )
        answer = ask(BlobAsk(0, action, key, after, limit, body), BlobAnswer)
        _raise(answer.error)
        return answer

    def get(key: str) -> bytes | None:
        answer = blob_ask("get", check_key(key))
        return answer.body if answer.found else None

    def set_(key: str, value: bytes | str) -> None:
        blob_ask("set", check_key(key), _value_bytes(value))

    def get_json(key: str, default: object = None) -> object:
        value = get(key)
        return default if value is None else json.loads(value)

    def set_json(key: str, value: object) -> None:
        try:
            text = dumps_json(value)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"the value is not JSON: {exc}", "bad_value") from None
        set_(key, text)

    def delete(key: str) -> bool:
        return blob_ask("delete", check_key(key)).found

    def list_(prefix: str = "", after: str = "", limit: int = MAX_LIST) -> list[dict[str, object]]:
        if not isinstance(prefix, str) or not isinstance(after, str):
            raise StorageError("prefix and after must be str", "bad_key")
        if type(limit) is not int or not 1 <= limit <= MAX_LIST:
            raise StorageError(f"limit must be an int from 1 to {MAX_LIST}", "bad_value")
        answer = blob_ask("list", str.__str__(prefix), after=str.__str__(after), limit=limit)
        try:
            entries = json.loads(answer.body)
        except ValueError:
            raise MessageError("a blob list answer is not JSON") from None
        if not isinstance(entries, list):
            raise MessageError("a blob list answer is not a JSON array")
        return entries

    def run(statements: tuple[Statement, ...], batch: bool) -> list[SqlResult]:
        sql_ask = SqlAsk(0, statements, batch)
        if len(sql_ask.to_frame().body) > max_ask_bytes:
            raise StorageError(
                f"the statements and args are over the {max_ask_bytes}-byte limit", "bad_value"
            )
        answer = ask(sql_ask, SqlAnswer)
        _raise(answer.error)
        return [
            SqlResult(r.columns, r.rows, r.rows_affected, r.last_insert_rowid)
            for r in answer.results()
        ]

    def execute(sql: str, args: Sequence[object] = ()) -> SqlResult:
        if not isinstance(sql, str):
            raise StorageError(f"sql must be a str, not {type(sql).__name__}", "bad_value")
        return run(((str.__str__(sql), _args(args)),), batch=False)[0]

    def batch(statements: Sequence[object]) -> list[SqlResult]:
        if not isinstance(statements, tuple | list):
            raise StorageError("batch takes a list of statements", "bad_value")
        return run(tuple(_statement(item) for item in statements), batch=True)

    blob = Facade(
        "blob",
        {
            "get": get,
            "set": set_,
            "get_json": get_json,
            "set_json": set_json,
            "delete": delete,
            "list": list_,
        },
    )
    sqlite = Facade("sqlite", {"execute": execute, "batch": batch})
    return {"blob": blob, "sqlite": sqlite, "StorageError": StorageError}
