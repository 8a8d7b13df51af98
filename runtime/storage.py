"""Each user's blob store and SQL database: one small interface, and its SQLite backend.

`StorageBackend` is everything the rest of the front end knows of storage (the asks of
`runtime.storage_api`, the owner's API, `/v1/me`). `SqliteStorage` keeps it on this machine:

    <data dir>/blob.sqlite       one table of (user, key) -> value, and each user's usage
    <data dir>/sql/<user>.sqlite one database per user

`runtime.pg_storage.PgStorage` is the same interface on PostgreSQL (docs/storage.md §5): blob
tables in the store's database, and a login role and a database per user.

Bounds, all per call or per user, so one tenant's storage cannot starve another's:
- every call is one transaction; a write over a quota is refused before it changes anything
  (blob: usage is accounted in the same transaction; SQL: `max_page_count` makes SQLite fail
  the statement, and the transaction is rolled back);
- one user's SQL calls run one at a time (their database is one file); at most
  `sql_threads` calls run at once in all; at most `max_waiting_per_user` of one user's calls
  wait, the rest are refused (`busy`);
- a SQL call is interrupted (a progress handler) after `sql_timeout_s` or when the val's time
  is up; a result over the response cap is refused, never truncated; the authorizer
  (`runtime.sqlguard`) keeps statements inside the user's own file;
- blocking work runs in threads, off trio's, behind capacity limiters.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import trio

from runtime.config import StorageConfig
from runtime.errors import StorageRefusedError
from runtime.hosts import USER_RE
from runtime.idle_threads import IdleThreads
from runtime.sqlguard import ATTACH_REFUSAL, SqlGuard, first_keyword
from runtime.sqlitefile import prepare
from sandbox.messages import SqlValue, Statement, encode_sql_results, sql_value_to_json

logger = logging.getLogger(__name__)

T = TypeVar("T")
D = TypeVar("D")

MAX_KEY_BYTES = 512
MAX_LIST = 1000
#: SQLite calls the progress handler every this many virtual-machine steps (microseconds).
PROGRESS_STEPS = 1000
#: One statement's text.
MAX_SQL_TEXT_BYTES = 1024 * 1024
#: Open user databases kept; the least recently used idle one is closed first.
MAX_OPEN_DATABASES = 64
#: Blob calls of one user running at once (values are up to 5 MiB: bounded memory).
BLOB_CALLS_PER_USER = 2

BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    user TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (user, key)
);
-- Bytes (keys and values) and keys per user, kept in the same transaction as every write:
-- the quota check reads one row instead of summing the user's blobs.
CREATE TABLE IF NOT EXISTS blob_usage (
    user TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL,
    keys INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class BlobEntry:
    key: str
    size: int
    updated_at: float

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "size": self.size, "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class Usage:
    blob_bytes: int
    blob_keys: int
    sql_bytes: int


class StorageBackend(Protocol):
    """Per-user blob and SQL storage. Every method refuses with StorageRefusedError (and
    then has changed nothing); a write that returned is committed."""

    #: The `[storage]` limits in force (max_value_bytes already capped by the frame size).
    config: StorageConfig
    #: A SQL answer's cap: over it, the call is refused and rolled back.
    max_result_bytes: int

    async def blob_get(self, user: str, key: str) -> bytes | None: ...

    async def blob_set(self, user: str, key: str, value: bytes) -> None: ...

    async def blob_delete(self, user: str, key: str) -> bool: ...

    async def blob_list(self, user: str, prefix: str, after: str, limit: int) -> list[BlobEntry]:
        """At most `limit` entries whose keys start with `prefix` and sort after `after`,
        sorted by key."""
        ...

    async def sql(self, user: str, statements: Sequence[Statement], *, batch: bool) -> bytes:
        """Run the statements in one transaction; the results as the wire's JSON
        (`encode_sql_results`), made before the commit so that an answer over the cap is
        refused with nothing changed. Interrupted at `sql_timeout_s` or the caller's
        deadline (trio's effective deadline), whichever is first."""
        ...

    async def usage(self, user: str) -> Usage: ...

    def close(self) -> None: ...


def check_key(key: str, what: str = "a blob key", *, empty: bool = False) -> str:
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise StorageRefusedError(f"{what} must be valid Unicode", "bad_key") from None
    if size > MAX_KEY_BYTES or (size == 0 and not empty):
        raise StorageRefusedError(
            f"{what} must be {0 if empty else 1} to {MAX_KEY_BYTES} bytes of UTF-8, not {size}",
            "bad_key",
        )
    return key


def check_value(value: bytes, limit: int) -> None:
    if len(value) > limit:
        raise StorageRefusedError(
            f"the value of {len(value)} bytes is over the {limit}-byte limit "
            "(storage.max_value_bytes)",
            "value_too_large",
        )


@dataclass(eq=False)
class _UserDb:
    conn: sqlite3.Connection
    guard: SqlGuard


@dataclass(eq=False)
class UserSlot(Generic[D]):
    """One user's turn-taking: SQL one call at a time, blob a few; the open database."""

    sql_turn: trio.Lock = field(default_factory=trio.Lock)
    blob_turn: trio.Semaphore = field(default_factory=lambda: trio.Semaphore(BLOB_CALLS_PER_USER))
    waiting: int = 0
    db: D | None = None
    last_used: float = 0.0


class Turns(Generic[D]):
    """Each user's turn-taking, shared by the backends: SQL one call at a time, blob a few,
    at most `max_waiting_per_user` running or waiting (more are refused, `busy`)."""

    def __init__(self, max_waiting_per_user: int) -> None:
        self.max_waiting = max_waiting_per_user
        self.users: dict[str, UserSlot[D]] = {}

    @asynccontextmanager
    async def turn(self, user: str, sql: bool) -> AsyncIterator[UserSlot[D]]:
        if not USER_RE.fullmatch(user):  # it names a file or a role: never trust it blindly
            raise StorageRefusedError(f"{user!r} is not a user", "no_owner")
        slot = self.users.get(user)
        if slot is None:
            slot = self.users[user] = UserSlot()
        if slot.waiting >= self.max_waiting:
            raise StorageRefusedError(
                f"{slot.waiting} storage calls of yours are running or waiting already; "
                "retry shortly",
                "busy",
            )
        slot.waiting += 1
        try:
            if sql:
                async with slot.sql_turn:
                    yield slot
            else:
                async with slot.blob_turn:
                    yield slot
        finally:
            slot.waiting -= 1
            slot.last_used = trio.current_time()
            if slot.waiting == 0 and slot.db is None:
                del self.users[user]

    def evict_idle(self, max_open: int) -> list[D]:
        """Make room for one more open database: forget the least recently used idle ones'
        handles and return them, for the caller to close off trio's thread."""
        open_slots = [s for s in self.users.values() if s.db is not None]
        surplus = len(open_slots) - (max_open - 1)
        if surplus <= 0:
            return []
        idle = sorted((s for s in open_slots if s.waiting == 0), key=lambda s: s.last_used)
        closing = []
        for slot in idle[:surplus]:
            if slot.db is not None:
                closing.append(slot.db)
                slot.db = None
        for user in [u for u, s in self.users.items() if s.waiting == 0 and s.db is None]:
            del self.users[user]
        return closing


C = TypeVar("C")


def blob_write_delta(key: str, value: bytes, old_size: int | None, used: int, quota: int) -> int:
    """What writing `value` at `key` adds to its user's blob usage (`used` bytes now; a new
    key counts its own bytes too, `old_size` is None); refused if it would pass `quota`."""
    delta = len(value) - old_size if old_size is not None else len(key.encode()) + len(value)
    if used + delta > quota:
        raise StorageRefusedError(
            f"this write would bring your blob storage to {used + delta} bytes, over "
            f"its {quota}-byte quota (storage.max_user_bytes); nothing was written",
            "quota_exceeded",
        )
    return delta


class BlobCalls(Generic[C, D]):
    """The blob half of `StorageBackend`, the same on each engine: what a val sent is
    checked, and the call waits for one of its user's turns; the engine gives the
    statements (`_get`, `_set`, `_delete`, `_list`, each one transaction on connection C)
    and runs them on a thread of its own (`_blob_call`)."""

    config: StorageConfig
    _turns: Turns[D]

    async def _blob_call(self, fn: Callable[[C], T], *, write: bool) -> T:
        raise NotImplementedError

    def _get(self, db: C, user: str, key: str) -> bytes | None:
        raise NotImplementedError

    def _set(self, db: C, user: str, key: str, value: bytes) -> None:
        raise NotImplementedError

    def _delete(self, db: C, user: str, key: str) -> bool:
        raise NotImplementedError

    def _list(
        self, db: C, user: str, prefix: str, after: str, limit: int
    ) -> list[tuple[str, int, float]]:
        raise NotImplementedError

    async def blob_get(self, user: str, key: str) -> bytes | None:
        check_key(key)
        async with self._turns.turn(user, sql=False):
            return await self._blob_call(lambda db: self._get(db, user, key), write=False)

    async def blob_set(self, user: str, key: str, value: bytes) -> None:
        check_key(key)
        check_value(value, self.config.max_value_bytes)
        async with self._turns.turn(user, sql=False):
            await self._blob_call(lambda db: self._set(db, user, key, value), write=True)

    async def blob_delete(self, user: str, key: str) -> bool:
        check_key(key)
        async with self._turns.turn(user, sql=False):
            return await self._blob_call(lambda db: self._delete(db, user, key), write=True)

    async def blob_list(self, user: str, prefix: str, after: str, limit: int) -> list[BlobEntry]:
        check_key(prefix, "a prefix", empty=True)
        check_key(after, "after", empty=True)
        if not 1 <= limit <= MAX_LIST:
            raise StorageRefusedError(f"limit must be from 1 to {MAX_LIST}", "bad_value")
        async with self._turns.turn(user, sql=False):
            rows = await self._blob_call(
                lambda db: self._list(db, user, prefix, after, limit), write=False
            )
        return [BlobEntry(str(key), int(size), float(at)) for key, size, at in rows]


class SqliteStorage(BlobCalls[sqlite3.Connection, _UserDb]):
    def __init__(self, config: StorageConfig, data_dir: Path, max_result_bytes: int) -> None:
        self.config = config
        self.max_result_bytes = max_result_bytes
        self.sql_dir = data_dir / "sql"
        self.sql_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        blob_path = data_dir / "blob.sqlite"
        # Two connections: reads (WAL) never wait behind a write's fsync.
        self._writer = _open_blob_db(blob_path)
        self._reader = _open_blob_db(blob_path)
        self._write_turn = trio.CapacityLimiter(1)
        self._read_turn = trio.CapacityLimiter(1)
        self._sql_threads = trio.CapacityLimiter(config.sql_threads)
        # Users' SQL may compute for seconds: at idle CPU priority, never on the event
        # loop's core when it wants it (runtime/idle_threads.py, docs/fairness.md §5).
        self._idle = IdleThreads(config.sql_threads, "valrun-sql")
        self._turns: Turns[_UserDb] = Turns(config.max_waiting_per_user)

    def close(self) -> None:
        self._idle.close()
        for slot in self._turns.users.values():
            if slot.db is not None:
                slot.db.conn.close()
                slot.db = None
        self._writer.close()
        self._reader.close()

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(lambda: fn(self._writer), limiter=self._write_turn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(lambda: fn(self._reader), limiter=self._read_turn)

    # Blob

    async def _blob_call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        return await (self._write(fn) if write else self._read(fn))

    def _get(self, db: sqlite3.Connection, user: str, key: str) -> bytes | None:
        row = db.execute(
            "SELECT value FROM blobs WHERE user = ? AND key = ?", (user, key)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _set(self, db: sqlite3.Connection, user: str, key: str, value: bytes) -> None:
        with _transaction(db):
            old = db.execute(
                "SELECT length(value) FROM blobs WHERE user = ? AND key = ?", (user, key)
            ).fetchone()
            used = _blob_usage(db, user)[0]
            old_size = None if old is None else int(old[0])
            delta = blob_write_delta(key, value, old_size, used, self.config.max_user_bytes)
            db.execute(
                "INSERT INTO blobs (user, key, value, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user, key) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at",
                (user, key, value, time.time()),
            )
            _add_usage(db, user, delta, 0 if old else 1)

    def _delete(self, db: sqlite3.Connection, user: str, key: str) -> bool:
        with _transaction(db):
            old = db.execute(
                "DELETE FROM blobs WHERE user = ? AND key = ? RETURNING length(value)",
                (user, key),
            ).fetchone()
            if old is None:
                return False
            _add_usage(db, user, -(old[0] + len(key.encode())), -1)
            return True

    def _list(
        self, db: sqlite3.Connection, user: str, prefix: str, after: str, limit: int
    ) -> list[tuple[str, int, float]]:
        return db.execute(
            "SELECT key, length(value), updated_at FROM blobs "
            "WHERE user = :user AND key > :after "
            "AND substr(key, 1, length(:prefix)) = :prefix ORDER BY key LIMIT :limit",
            {"user": user, "after": after, "prefix": prefix, "limit": limit},
        ).fetchall()

    # SQL

    async def sql(self, user: str, statements: Sequence[Statement], *, batch: bool) -> bytes:
        if not batch and len(statements) != 1:
            raise StorageRefusedError("execute runs exactly one statement", "bad_value")
        if not statements:
            return encode_sql_results([])
        for text, _ in statements:
            if len(text.encode("utf-8", errors="surrogatepass")) > MAX_SQL_TEXT_BYTES:
                raise StorageRefusedError(
                    f"a statement is over {MAX_SQL_TEXT_BYTES} bytes long", "sql_error"
                )
        async with self._turns.turn(user, sql=True) as slot:
            # Never past the caller's deadline: the val's remaining wall time.
            remaining = trio.current_effective_deadline() - trio.current_time()
            run_for = max(0.0, min(self.config.sql_timeout_s, remaining))
            if slot.db is None:
                await self._close_idle_databases()
                path = self.sql_dir / f"{user}.sqlite"
                slot.db = await self._idle.run(
                    lambda: self._open_user_db(path), limiter=self._sql_threads
                )
            db = slot.db
            return await self._idle.run(
                lambda: self._run_sql(db, statements, run_for), limiter=self._sql_threads
            )

    async def _close_idle_databases(self) -> None:
        """Make room for one more open database: close the least recently used idle ones."""
        closing = self._turns.evict_idle(MAX_OPEN_DATABASES)

        def close_all() -> None:
            for db in closing:
                db.conn.close()

        if closing:
            await self._idle.run(close_all, limiter=self._sql_threads)

    def _open_user_db(self, path: Path) -> _UserDb:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=0
        )
        try:
            # Another front-end process may be opening it too (its first use in each).
            prepare(conn, lambda db: None)
            conn.execute("PRAGMA trusted_schema=OFF")
            conn.execute("PRAGMA cache_size=-2048")  # 2 MiB of page cache at most
            conn.execute(f"PRAGMA journal_size_limit={4 * 1024 * 1024}")
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            # The quota: SQLite fails a write that would grow the file past this many pages.
            conn.execute(f"PRAGMA max_page_count={max(1, self.config.max_sql_bytes // page_size)}")
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.config.max_value_bytes)
            conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_TEXT_BYTES)
        except BaseException:
            conn.close()
            raise
        guard = SqlGuard()
        conn.set_authorizer(guard.authorize)
        return _UserDb(conn, guard)

    def _run_sql(self, db: _UserDb, statements: Sequence[Statement], run_for: float) -> bytes:
        conn, guard = db.conn, db.guard
        deadline = time.monotonic() + run_for
        conn.set_progress_handler(lambda: time.monotonic() > deadline, PROGRESS_STEPS)
        try:
            _trusted(db, "BEGIN IMMEDIATE")
            answer = ResultWriter(self.max_result_bytes, self._too_large)
            for text, args in statements:
                guard.refused = None
                if first_keyword(text) == "VACUUM":  # it would fail inside BEGIN, less clearly
                    raise StorageRefusedError(ATTACH_REFUSAL, "sql_refused")
                cursor = conn.execute(text, args)
                try:
                    answer.begin([d[0] for d in cursor.description or ()])
                    while chunk := cursor.fetchmany(256):
                        answer.add_rows(chunk)
                    answer.end(max(cursor.rowcount, 0), cursor.lastrowid or 0)
                finally:
                    cursor.close()  # a statement left running would hold up the COMMIT
            body = answer.finish()
            conn.set_progress_handler(None, 0)
            _trusted(db, "COMMIT")
            return body
        except sqlite3.Error as exc:
            raise self._refusal(exc, db, run_for) from None
        except (OverflowError, ValueError, MemoryError) as exc:
            raise StorageRefusedError(f"the SQL could not run: {exc}", "sql_error") from None
        finally:
            conn.set_progress_handler(None, 0)
            if conn.in_transaction:
                _trusted(db, "ROLLBACK")
            guard.refused = None

    def _too_large(self) -> StorageRefusedError:
        return StorageRefusedError(
            f"the result is over the {self.max_result_bytes}-byte limit; select fewer rows "
            "(LIMIT) or columns. Nothing was changed",
            "result_too_large",
        )

    def _refusal(self, exc: sqlite3.Error, db: _UserDb, run_for: float) -> Exception:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if db.guard.refused is not None:
            return StorageRefusedError(db.guard.refused, "sql_refused")
        if code == sqlite3.SQLITE_INTERRUPT:
            return StorageRefusedError(
                f"the SQL ran for {run_for:.3g} s and was interrupted (the limit is "
                f"storage.sql_timeout_s = {self.config.sql_timeout_s:g} s, or the val's "
                "remaining time); nothing was changed",
                "sql_timeout",
            )
        if code == sqlite3.SQLITE_FULL:
            return StorageRefusedError(
                "this would grow your SQL database past its "
                f"{self.config.max_sql_bytes}-byte quota (storage.max_sql_bytes); "
                "nothing was changed",
                "quota_exceeded",
            )
        if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_CANTOPEN):
            logger.error("a user's SQL database failed: %s", exc)
            return StorageRefusedError("the database failed; retry later", "storage_failed")
        return StorageRefusedError(f"{exc} (nothing was changed)", "sql_error")

    # Usage

    async def usage(self, user: str) -> Usage:
        async with self._turns.turn(user, sql=False):
            blob_bytes, blob_keys = await self._read(lambda db: _blob_usage(db, user))
        async with self._turns.turn(user, sql=True) as slot:
            # What the quota counts: the database's pages (its WAL is checkpointed into them).
            sql_bytes = await self._idle.run(
                lambda: self._sql_bytes(user, slot), limiter=self._sql_threads
            )
        return Usage(blob_bytes, blob_keys, sql_bytes)

    def _sql_bytes(self, user: str, slot: UserSlot[_UserDb]) -> int:
        if slot.db is None:
            path = self.sql_dir / f"{user}.sqlite"
            if not path.exists():
                return 0
            slot.db = self._open_user_db(path)
        pages = slot.db.conn.execute("PRAGMA page_count").fetchone()[0]
        size = slot.db.conn.execute("PRAGMA page_size").fetchone()[0]
        return int(pages) * int(size)


class ResultWriter:
    """The results' wire JSON (`encode_sql_results`'s shape), written as rows are fetched:
    a call holds at most the answer's bytes, never the rows as Python objects, and stops at
    the cap."""

    def __init__(self, max_bytes: int, too_large: Callable[[], Exception]) -> None:
        self.max_bytes = max_bytes
        self.too_large = too_large
        self.parts: list[bytes] = []
        self.size = 2  # the brackets of `finish`
        self.results = 0
        self.rows = 0

    def _add(self, part: bytes) -> None:
        self.size += len(part)
        if self.size > self.max_bytes:
            raise self.too_large()
        self.parts.append(part)

    def begin(self, columns: list[str]) -> None:
        self._add((b"," if self.results else b"") + b'{"columns":' + _json(columns) + b',"rows":[')
        self.rows = 0

    def add_rows(self, rows: list[tuple[SqlValue, ...]]) -> None:
        encoded = b",".join(_row_json(row) for row in rows)
        self._add((b"," if self.rows else b"") + encoded)
        self.rows += len(rows)

    def end(self, rows_affected: int, last_insert_rowid: int) -> None:
        self._add(
            b'],"rows_affected":%d,"last_insert_rowid":%d}' % (rows_affected, last_insert_rowid)
        )
        self.results += 1

    def finish(self) -> bytes:
        return b"[" + b"".join(self.parts) + b"]"


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _row_json(row: tuple[SqlValue, ...]) -> bytes:
    if not any(type(v) is float and not math.isfinite(v) for v in row):
        return _json([sql_value_to_json(v) for v in row])
    # SQLite stores infinite REALs (`SELECT 1e999`); JSON has no Infinity, but `1e999` is a
    # valid JSON number that Python and JavaScript both read as infinity. (NaN is stored as
    # NULL by SQLite, so none comes back.)
    return b"[" + b",".join(_value_json(v) for v in row) + b"]"


def _value_json(value: SqlValue) -> bytes:
    if type(value) is float and not math.isfinite(value):
        return b"null" if math.isnan(value) else b"1e999" if value > 0 else b"-1e999"
    return _json(sql_value_to_json(value))


def _trusted(db: _UserDb, sql: str) -> None:
    db.guard.trusted = True
    try:
        db.conn.execute(sql)
    finally:
        db.guard.trusted = False


def _open_blob_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        prepare(conn, lambda db: db.executescript(BLOB_SCHEMA))
    except BaseException:
        conn.close()
        raise
    return conn


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _blob_usage(db: sqlite3.Connection, user: str) -> tuple[int, int]:
    row = db.execute("SELECT bytes, keys FROM blob_usage WHERE user = ?", (user,)).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def _add_usage(db: sqlite3.Connection, user: str, delta_bytes: int, delta_keys: int) -> None:
    db.execute(
        "INSERT INTO blob_usage (user, bytes, keys) VALUES (?, ?, ?) ON CONFLICT (user) "
        "DO UPDATE SET bytes = bytes + excluded.bytes, keys = keys + excluded.keys",
        (user, delta_bytes, delta_keys),
    )
