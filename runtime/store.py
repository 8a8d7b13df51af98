"""The store: users, token hashes, vals, immutable versions, env, invocation records.
SQLite in WAL mode.

`Store` is plain synchronous SQL (the CLI uses it directly). The front end goes through
`AsyncStore.run(Store.method, ...)`, which runs the call in a worker thread so a slow disk
never blocks the event loop. One connection, one thread at a time: SQLite serializes
writers anyway, and every call here takes well under a millisecond.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import trio

from runtime.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    StorageFullError,
    StoreUnavailableError,
)
from runtime.hosts import USER_RE

P = ParamSpec("P")
R = TypeVar("R")

PRIVACY = ("public", "unlisted", "private")
TOKEN_PREFIX = "vr_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    hash BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked_at REAL
);
-- AUTOINCREMENT: a val id is never reused, so a deleted val's warm workers can never be
-- mistaken for those of a new val with the same name.
CREATE TABLE IF NOT EXISTS vals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    privacy TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (user_id, name_key)
);
CREATE TABLE IF NOT EXISTS versions (
    val_id INTEGER NOT NULL REFERENCES vals(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    code TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (val_id, version)
);
CREATE TABLE IF NOT EXISTS env (
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
);
-- Invocation records. A val's have val_id (and no user_id: the val names its owner); an
-- Eval's have no val_id and the token's user_id (none for an anonymous Eval). Each such
-- bucket keeps its newest store.max_runs_per_val records. Never request bodies nor env
-- values; the log is capped by the worker and the front end.
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    val_id INTEGER REFERENCES vals(id) ON DELETE CASCADE,
    user_id INTEGER REFERENCES users(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    version INTEGER,
    started_at REAL NOT NULL,
    duration_ms REAL NOT NULL,
    status INTEGER NOT NULL,
    log TEXT NOT NULL,
    error_type TEXT,
    error_message TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_bucket ON runs (val_id, user_id, id);
-- One row, rewritten by the write probe (Store.check_writable): proof the store takes writes.
CREATE TABLE IF NOT EXISTS health (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class ValVersion:
    val_id: int
    owner: str
    name: str
    privacy: str
    version: int
    code: str
    created_at: float


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What is known of a token after its creation: never the token, never its hash."""

    id: int
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Record:
    """One invocation: a val's (web or run) or an Eval's."""

    val_id: int | None  # None for an Eval
    owner: str | None  # the val's owner, or the Eval's token user (None: anonymous)
    source: str  # "web", "run" or "eval"
    version: int | None  # None for an Eval
    started_at: float  # Unix time
    duration_ms: float
    status: int  # the HTTP status the client got
    log: str
    error_type: str | None = None
    error_message: str | None = None

    @property
    def size_bytes(self) -> int:
        """What it weighs against store.max_runs_bytes: its log and its error message."""
        return len(self.log.encode()) + len((self.error_message or "").encode())

    def to_json(self) -> dict[str, object]:
        error = None
        if self.error_type is not None:
            error = {"type": self.error_type, "message": self.error_message or ""}
        return {
            "time": self.started_at,
            "source": self.source,
            "version": self.version,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
            "log": self.log,
            "error": error,
        }


Resolved = tuple[ValVersion, dict[str, str]]


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        if "bytes" not in columns:  # a store made before the global ceiling on records
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ALTER TABLE runs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
                self._db.execute(
                    "UPDATE runs SET bytes = length(CAST(log AS BLOB)) "
                    "+ coalesce(length(CAST(error_message AS BLOB)), 0)"
                )
        # Covering: the sum of all sizes and the walk from the oldest read only this index,
        # never the records' (possibly 64 KiB) logs.
        self._db.execute("CREATE INDEX IF NOT EXISTS runs_sizes ON runs (id, bytes)")

    def close(self) -> None:
        self._db.close()

    @property
    def changes(self) -> int:
        """Rows written through this connection so far (sqlite3's total_changes)."""
        return self._db.total_changes

    def check_writable(self) -> None:
        """Commit one small write, or raise the sqlite3.Error that says why it cannot be."""
        self._write(
            [("INSERT OR REPLACE INTO health (id, checked_at) VALUES (1, ?)", (time.time(),))]
        )

    def _write(self, sql_and_params: list[tuple[str, tuple[object, ...]]]) -> list[sqlite3.Cursor]:
        with self._db:  # one transaction: all or nothing
            self._db.execute("BEGIN IMMEDIATE")
            return [self._db.execute(sql, params) for sql, params in sql_and_params]

    # Users and tokens

    def create_user(self, name: str) -> str:
        """Create a user; return a new token (the only time it is seen)."""
        if not USER_RE.fullmatch(name):
            raise BadRequestError(
                f"{name!r} is not a valid username: [a-z][a-z0-9_]*, at most 39 characters",
                "bad_name",
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO users (name, created_at) VALUES (?, ?)", (name, now)
                )
                self._db.execute(
                    "INSERT INTO tokens (user_id, hash, created_at) VALUES (?, ?, ?)",
                    (cur.lastrowid, hash_token(token), now),
                )
        except sqlite3.IntegrityError:
            raise ConflictError(f"user {name!r} already exists", "user_exists") from None
        return token

    def create_token(self, username: str) -> str:
        user = self.user(username)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._write(
            [
                (
                    "INSERT INTO tokens (user_id, hash, created_at) VALUES (?, ?, ?)",
                    (user.id, hash_token(token), time.time()),
                )
            ]
        )
        return token

    def tokens(self, username: str) -> list[TokenInfo]:
        user = self.user(username)
        rows = self._db.execute(
            "SELECT id, created_at, revoked_at FROM tokens WHERE user_id = ? ORDER BY id",
            (user.id,),
        )
        return [TokenInfo(*row) for row in rows]

    def revoke_token(self, token_id: int) -> None:
        (cur,) = self._write(
            [
                (
                    "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (time.time(), token_id),
                )
            ]
        )
        if cur.rowcount == 0:
            raise NotFoundError(f"no active token with id {token_id}")

    def user(self, name: str) -> User:
        row = self._db.execute("SELECT id, name FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"no user {name!r}")
        return User(*row)

    def user_exists(self, name: str) -> bool:
        return bool(self._db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone())

    def user_for_token(self, token: str) -> User | None:
        digest = hash_token(token)
        row = self._db.execute(
            "SELECT u.id, u.name, t.hash FROM tokens t JOIN users u ON u.id = t.user_id "
            "WHERE t.hash = ? AND t.revoked_at IS NULL",
            (digest,),
        ).fetchone()
        # The lookup is by an index on the hash; the compare is constant-time regardless.
        if row is None or not hmac.compare_digest(row[2], digest):
            return None
        return User(row[0], row[1])

    # Vals and versions

    _VERSION_SELECT = (
        "SELECT v.id, u.name, v.name, v.privacy, ver.version, ver.code, ver.created_at "
        "FROM vals v JOIN users u ON u.id = v.user_id "
        "JOIN versions ver ON ver.val_id = v.id "
    )

    def get_val(self, owner: str, name: str, version: int | None) -> ValVersion | None:
        where = "WHERE u.name = ? AND v.name_key = ? "
        if version is None:
            sql = self._VERSION_SELECT + where + "ORDER BY ver.version DESC LIMIT 1"
            row = self._db.execute(sql, (owner, name.lower())).fetchone()
        else:
            sql = self._VERSION_SELECT + where + "AND ver.version = ?"
            row = self._db.execute(sql, (owner, name.lower(), version)).fetchone()
        return ValVersion(*row) if row else None

    def resolve(self, owner: str, name: str, version: int | None) -> Resolved | None:
        """A val version and its owner's env (not to be mutated: the front end caches it)."""
        val = self.get_val(owner, name, version)
        return None if val is None else (val, self.env(val.owner))

    def put_val(
        self, owner: str, name: str, code: str, privacy: str | None
    ) -> tuple[ValVersion, bool]:
        if privacy is not None and privacy not in PRIVACY:
            raise BadRequestError(f"privacy must be one of {', '.join(PRIVACY)}", "bad_privacy")
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            user = self.user(owner)
            row = self._db.execute(
                "SELECT id, name FROM vals WHERE user_id = ? AND name_key = ?",
                (user.id, name.lower()),
            ).fetchone()
            created = row is None
            if created:
                cur = self._db.execute(
                    "INSERT INTO vals (user_id, name, name_key, privacy, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (user.id, name, name.lower(), privacy or "public", now),
                )
                val_id, version = cur.lastrowid, 1
            else:
                val_id, name = row
                if privacy is not None:
                    self._db.execute("UPDATE vals SET privacy = ? WHERE id = ?", (privacy, val_id))
                (last,) = self._db.execute(
                    "SELECT MAX(version) FROM versions WHERE val_id = ?", (val_id,)
                ).fetchone()
                version = last + 1
            self._db.execute(
                "INSERT INTO versions (val_id, version, code, created_at) VALUES (?, ?, ?, ?)",
                (val_id, version, code, now),
            )
        saved = self.get_val(owner, name, version)
        assert saved is not None
        return saved, created

    def versions(self, owner: str, name: str) -> list[ValVersion]:
        sql = self._VERSION_SELECT + "WHERE u.name = ? AND v.name_key = ? ORDER BY ver.version"
        return [ValVersion(*row) for row in self._db.execute(sql, (owner, name.lower()))]

    def list_vals(self, owner: str, privacies: tuple[str, ...]) -> list[ValVersion]:
        marks = ",".join("?" for _ in privacies)
        sql = (
            self._VERSION_SELECT + f"WHERE u.name = ? AND v.privacy IN ({marks}) "
            "AND ver.version = (SELECT MAX(version) FROM versions WHERE val_id = v.id) "
            "ORDER BY v.name_key"
        )
        return [ValVersion(*row) for row in self._db.execute(sql, (owner, *privacies))]

    def set_privacy(self, owner: str, name: str, privacy: str) -> ValVersion | None:
        """Change a val's privacy; its latest version as changed, or None if there is none."""
        if privacy not in PRIVACY:
            raise BadRequestError(f"privacy must be one of {', '.join(PRIVACY)}", "bad_privacy")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE vals SET privacy = ? WHERE name_key = ? "
                "AND user_id = (SELECT id FROM users WHERE name = ?)",
                (privacy, name.lower(), owner),
            )
            return self.get_val(owner, name, None)

    def delete_val(self, owner: str, name: str) -> int | None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT v.id FROM vals v JOIN users u ON u.id = v.user_id "
                "WHERE u.name = ? AND v.name_key = ?",
                (owner, name.lower()),
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM vals WHERE id = ?", (row[0],))
            return int(row[0])

    # Env

    def env(self, owner: str) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT e.key, e.value FROM env e JOIN users u ON u.id = e.user_id "
            "WHERE u.name = ? ORDER BY e.key",
            (owner,),
        )
        return dict(rows.fetchall())

    def set_env(self, owner: str, key: str, value: str) -> None:
        user = self.user(owner)
        self._write(
            [
                (
                    "INSERT INTO env (user_id, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value",
                    (user.id, key, value),
                )
            ]
        )

    def delete_env(self, owner: str, key: str) -> bool:
        user = self.user(owner)
        (cur,) = self._write([("DELETE FROM env WHERE user_id = ? AND key = ?", (user.id, key))])
        return cur.rowcount > 0

    # Invocation records

    def add_runs(self, records: list[Record], keep: int, max_bytes: int | None = None) -> None:
        """Write records and trim each affected bucket to its newest `keep`, in one
        transaction; with `max_bytes`, trim the oldest of all records too, to keep their
        logs and messages under it."""
        buckets: set[tuple[int | None, int | None]] = set()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for r in records:
                values = (
                    *(r.source, r.version, r.started_at, r.duration_ms, r.status, r.log),
                    *(r.error_type, r.error_message),
                )
                if r.val_id is not None:
                    # The val may have been deleted since: then its record goes with it.
                    cur = self._db.execute(
                        "INSERT INTO runs (val_id, source, version, started_at, duration_ms, "
                        "status, log, error_type, error_message, bytes) "
                        "SELECT id, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM vals WHERE id = ?",
                        (*values, r.size_bytes, r.val_id),
                    )
                    if cur.rowcount:
                        buckets.add((r.val_id, None))
                else:
                    user_id = self._user_id(r.owner) if r.owner else None
                    self._db.execute(
                        "INSERT INTO runs (user_id, source, version, started_at, duration_ms, "
                        "status, log, error_type, error_message, bytes) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (user_id, *values, r.size_bytes),
                    )
                    buckets.add((None, user_id))
            for val_id, user_id in buckets:
                self._db.execute(
                    "DELETE FROM runs WHERE val_id IS ? AND user_id IS ? AND id <= ("
                    "  SELECT id FROM runs WHERE val_id IS ? AND user_id IS ? "
                    "  ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (val_id, user_id, val_id, user_id, keep),
                )
            if max_bytes is not None:
                self._trim_runs_to(max_bytes)

    def _trim_runs_to(self, max_bytes: int) -> None:
        (total,) = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM runs").fetchone()
        if total <= max_bytes:
            return
        # Down to 90 %, so a store at its ceiling is not trimmed on every batch.
        excess, last = total - max_bytes * 9 // 10, None
        for run_id, size in self._db.execute("SELECT id, bytes FROM runs ORDER BY id"):
            excess -= size
            last = run_id
            if excess <= 0:
                break
        self._db.execute("DELETE FROM runs WHERE id <= ?", (last,))

    def _user_id(self, name: str) -> int | None:
        row = self._db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    _RUN_SELECT = (
        "SELECT val_id, ?, source, version, started_at, duration_ms, status, log, "
        "error_type, error_message FROM runs "
    )

    def runs(self, val: ValVersion, limit: int) -> list[Record]:
        """A val's records, newest first."""
        sql = self._RUN_SELECT + "WHERE val_id = ? AND user_id IS NULL ORDER BY id DESC LIMIT ?"
        return [Record(*row) for row in self._db.execute(sql, (val.owner, val.val_id, limit))]

    def eval_runs(self, owner: str, limit: int) -> list[Record]:
        """The records of a user's Evals, newest first."""
        user = self.user(owner)
        sql = self._RUN_SELECT + "WHERE val_id IS NULL AND user_id = ? ORDER BY id DESC LIMIT ?"
        return [Record(*row) for row in self._db.execute(sql, (owner, user.id, limit))]


# Result codes (sqlite3 sqlite_errorcode & 0xFF, https://sqlite.org/rescode.html) that mean
# the disk, not valrun nor the request, is at fault.
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14


def store_error(exc: sqlite3.Error) -> Exception:
    """An sqlite3 error as the HTTP error a client should see: 507 for a full disk, 503 for
    a store that cannot be written; anything else stays what it was (a bug: 500)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code == SQLITE_FULL:
        return StorageFullError(
            f"the disk that holds valrun's store is full ({exc}): nothing was saved; "
            "reads and invocations still work",
            headers=(("retry-after", "60"),),
        )
    if code in (SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN):
        return StoreUnavailableError(
            f"valrun's store cannot be written right now ({exc}): nothing was saved; "
            "reads and invocations still work",
            headers=(("retry-after", "60"),),
        )
    return exc


class AsyncStore:
    """The front end's handle: `await store.run(Store.get_val, owner, name, None)`.

    `resolve`, on every val request's path, is cached: a trip to the store thread costs
    about a quarter of the front end's time per request. Writes made through `run` that
    change what a val host resolves to empty the cache at once; entries also expire after
    `RESOLVE_TTL_S`, which bounds how long a write made elsewhere (another front-end node
    on a shared store) can go unseen.
    """

    RESOLVE_TTL_S = 2.0
    RESOLVE_CACHE_ENTRIES = 10_000
    #: Store methods after which cached resolutions may be wrong.
    INVALIDATES: frozenset[Callable[..., object]] = frozenset(
        {Store.put_val, Store.delete_val, Store.set_privacy, Store.set_env, Store.delete_env}
    )

    def __init__(self, store: Store) -> None:
        self.store = store
        #: When and why a write last failed for want of a writable disk; None once a write
        #: has succeeded since. For /healthz.
        self.write_failure: tuple[float, str] | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._resolved: dict[tuple[str, str, int | None], tuple[float, Resolved | None]] = {}
        # Bumped by every invalidating write: a resolve that started before the write must
        # not put what it read into the cache after the write emptied it.
        self._generation = 0

    async def run(
        self, method: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        changes = self.store.changes
        try:
            result = await trio.to_thread.run_sync(
                lambda: method(self.store, *args, **kwargs), limiter=self._limiter
            )
        except sqlite3.Error as exc:
            error = store_error(exc)
            if error is exc:
                raise
            self.write_failure = (trio.current_time(), str(error))
            raise error from exc
        finally:
            if method in self.INVALIDATES:
                self._generation += 1
                self._resolved.clear()
        if self.store.changes != changes and method is not Store.check_writable:
            self.write_failure = None  # a real write went through: there is room again
        return result

    async def resolve(self, owner: str, name: str, version: int | None) -> Resolved | None:
        """`Store.resolve`, cached."""
        key = (owner, name.lower(), version)
        now = trio.current_time()
        cached = self._resolved.get(key)
        if cached is not None and now - cached[0] < self.RESOLVE_TTL_S:
            return cached[1]
        generation = self._generation
        resolved = await self.run(Store.resolve, owner, name, version)
        if generation == self._generation:
            if len(self._resolved) >= self.RESOLVE_CACHE_ENTRIES:
                self._resolved.clear()
            self._resolved[key] = (now, resolved)
        return resolved
