"""The store: users, token hashes, vals, immutable versions, env, invocation records.
SQLite in WAL mode, or PostgreSQL through `runtime.pgdb` (docs/store.md): one SQL for both;
the schema and its migrations are in `runtime.schema`; env values are sealed at rest when a
secret key is given (`runtime.sealing`); writes that change what front ends cache append to
the change feed (`runtime.feed`).

`Store` is plain synchronous SQL (the CLI uses it directly). The front end goes through
`AsyncStore.call(Store.method, ...)`, which makes the call in a worker thread so a slow disk
never blocks the event loop. One connection, one thread at a time: SQLite serializes
writers anyway, and every call here takes well under a millisecond.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, get_args

import psycopg
import trio

from runtime.config import QuotasConfig
from runtime.errors import (
    ConfigError,
    ExistsError,
    InvalidError,
    MissingError,
    QuotaError,
    RefusedError,
    StorageFullError,
    StoreUnavailableError,
)
from runtime.feed import Change, ChangeListener
from runtime.hosts import USER_RE
from runtime.pgdb import CHANNEL, PgConnection, PgCursor, is_postgres, redact
from runtime.quotas import check_env, quota_error
from runtime.schedule import Due, Schedule, Tick, next_tick, plan_claims
from runtime.schema import create_private, migrate, migrate_postgres
from runtime.sealing import Sealer
from runtime.sqlitefile import prepare
from runtime.tokens import TokenCache
from sandbox.limits import WorkerLimits

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

Privacy = Literal["public", "unlisted", "private"]
PRIVACY: tuple[Privacy, ...] = get_args(Privacy)
#: Who invoked: a val's web host, the Run API, the Eval API, its schedule. Records carry it.
Source = Literal["web", "run", "eval", "cron"]
TOKEN_PREFIX = "vr_"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class ValVersion:
    val_id: int
    owner: str
    name: str
    privacy: Privacy
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
    source: Source
    version: int | None  # None for an Eval
    started_at: float  # Unix time
    duration_ms: float
    status: int  # the HTTP status the client got
    log: str
    error_type: str | None = None
    error_message: str | None = None
    #: The val's own stack on failure ("line N, in f" entries), as in its error answer.
    traceback: tuple[str, ...] | None = None
    method: str | None = None
    path: str | None = None  # never the query: it may carry secrets
    id: int | None = None  # set once stored; increases with time (the cursor of `after=`)
    #: JSON: the fetches the invocation made (`runtime.fetch.FetchLog.entries`).
    fetches: str = "[]"

    @property
    def size_bytes(self) -> int:
        """What it weighs against store.max_runs_bytes: its log and its error message."""
        return len(self.log.encode()) + len((self.error_message or "").encode())

    def to_json(self) -> dict[str, object]:
        error: dict[str, object] | None = None
        if self.error_type is not None:
            error = {"type": self.error_type, "message": self.error_message or ""}
            if self.traceback is not None:
                error["traceback"] = list(self.traceback)
        return {
            "id": self.id,
            "time": self.started_at,
            "source": self.source,
            "version": self.version,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
            "log": self.log,
            "error": error,
            "fetches": json.loads(self.fetches),
        }


Resolved = tuple[ValVersion, dict[str, str]]


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A val's schedule as the API shows it."""

    val_id: int
    schedule: Schedule
    created_at: float
    next_run_at: float
    last_run_at: float | None

    def to_json(self) -> dict[str, object]:
        return {
            **self.schedule.to_json(),
            "schedule": self.schedule.describe(),
            "created_at": self.created_at,
            "next_run_at": self.next_run_at,
            "last_run_at": self.last_run_at,
        }


ChangeKind = Literal["val", "env", "token", "user"]
#: Feed rows are kept this long (a front end that lost the feed longer drops all it cached),
#: pruned by every PRUNE_CHANGES_EVERY-th write.
KEEP_CHANGES_S = 3600.0
PRUNE_CHANGES_EVERY = 100


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Store:
    def __init__(self, path: str | Path, *, secret_key: str = "", origin: str = "") -> None:
        #: The SQLite file's path, or the PostgreSQL URL (docs/store.md).
        self.path = str(path)
        self.postgres = is_postgres(self.path)
        #: Where, for messages: the path, or the URL without its password.
        self.where = redact(self.path)
        #: Names this writer in the change feed: a process skips the changes it made itself.
        self.origin = origin or secrets.token_hex(8)
        self._db: sqlite3.Connection | PgConnection
        if self.postgres:
            self._db = PgConnection(self.path)
        else:
            create_private(self.path)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            if isinstance(self._db, PgConnection):
                migrate_postgres(self._db)
            else:
                self._db.execute("PRAGMA foreign_keys=ON")
                prepare(self._db, lambda db: migrate(db, self.path))
            self._sealer = Sealer(secret_key) if secret_key else None
            self._check_secret_key()
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    @property
    def changes(self) -> int:
        """Rows written through this connection so far (sqlite3's total_changes)."""
        return self._db.total_changes

    def check_writable(self) -> None:
        """Commit one small write, or raise the sqlite3.Error that says why it cannot be."""
        self._write(
            [
                (
                    "INSERT INTO health (id, checked_at) VALUES (1, ?) "
                    "ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                    (time.time(),),
                )
            ]
        )

    def _write(
        self, sql_and_params: list[tuple[str, tuple[object, ...]]]
    ) -> list[sqlite3.Cursor | PgCursor]:
        with self._db:  # one transaction: all or nothing
            self._db.execute("BEGIN IMMEDIATE")
            return [self._db.execute(sql, params) for sql, params in sql_and_params]

    # The change feed (runtime/feed.py)

    def _note(self, kind: ChangeKind, user: str | None, val_id: int | None) -> None:
        """Append a change to the feed, in the caller's write transaction: it is seen by
        the other front ends exactly when the write is."""
        now = time.time()
        (seq,) = self._db.execute(
            "INSERT INTO changes (at, origin, kind, user_name, val_id) VALUES (?, ?, ?, ?, ?) "
            "RETURNING seq",
            (now, self.origin, kind, user, val_id),
        ).fetchone()
        if self.postgres:  # delivered to the LISTENing front ends at commit
            self._db.execute(f"NOTIFY {CHANNEL}")
        if seq % PRUNE_CHANGES_EVERY == 0:
            self._db.execute(
                "DELETE FROM changes WHERE at < ? AND seq < ?", (now - KEEP_CHANGES_S, seq)
            )

    # Users and tokens

    def create_user(self, name: str) -> str:
        """Create a user; return a new token (the only time it is seen)."""
        if not USER_RE.fullmatch(name):
            raise InvalidError(
                f"{name!r} is not a valid username: [a-z][a-z0-9_]*, at most 39 characters",
                "bad_name",
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                (user_id,) = self._db.execute(
                    "INSERT INTO users (name, created_at) VALUES (?, ?) RETURNING id", (name, now)
                ).fetchone()
                self._db.execute(
                    "INSERT INTO tokens (user_id, hash, created_at) VALUES (?, ?, ?)",
                    (user_id, hash_token(token), now),
                )
                self._note("user", name, None)
        except (sqlite3.IntegrityError, psycopg.IntegrityError):
            raise ExistsError(f"user {name!r} already exists", "user_exists") from None
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
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT u.name FROM tokens t JOIN users u ON u.id = t.user_id "
                "WHERE t.id = ? AND t.revoked_at IS NULL",
                (token_id,),
            ).fetchone()
            if row is None:
                raise MissingError(f"no active token with id {token_id}", "not_found")
            self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ?", (time.time(), token_id)
            )
            self._note("token", row[0], None)

    def user(self, name: str) -> User:
        row = self._db.execute("SELECT id, name FROM users WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise MissingError(f"no user {name!r}", "not_found")
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
        self,
        owner: str,
        name: str,
        code: str,
        privacy: str | None,
        quotas: QuotasConfig | None = None,
    ) -> tuple[ValVersion, bool]:
        """Save a new version (a new val if there is none); with `quotas`, a new val beyond
        `max_vals` is refused and the oldest versions beyond `max_versions_per_val` go."""
        if privacy is not None and privacy not in PRIVACY:
            raise InvalidError(f"privacy must be one of {', '.join(PRIVACY)}", "bad_privacy")
        now = time.time()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            user = self.user(owner)
            row = self._db.execute(
                "SELECT id, name FROM vals WHERE user_id = ? AND name_key = ?",
                (user.id, name.lower()),
            ).fetchone()
            created = row is None
            if created and quotas is not None:
                self._check_val_count(user.id, quotas.max_vals)
            if created:
                (val_id,) = self._db.execute(
                    "INSERT INTO vals (user_id, name, name_key, privacy, created_at) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (user.id, name, name.lower(), privacy or "public", now),
                ).fetchone()
                version = 1
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
            if quotas is not None:
                self._drop_old_versions(int(val_id or 0), quotas.max_versions_per_val)
            self._note("val", user.name, val_id)
        saved = self.get_val(owner, name, version)
        assert saved is not None
        return saved, created

    def check_new_val(self, owner: str, name: str, quotas: QuotasConfig) -> None:
        """Refuse early a new val beyond `max_vals`, before its code is checked in a worker;
        `put_val` checks again in its transaction, which is what holds under races."""
        user = self.user(owner)
        exists = self._db.execute(
            "SELECT 1 FROM vals WHERE user_id = ? AND name_key = ?", (user.id, name.lower())
        ).fetchone()
        if not exists:
            self._check_val_count(user.id, quotas.max_vals)

    def _check_val_count(self, user_id: int, max_vals: int) -> None:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM vals WHERE user_id = ?", (user_id,)
        ).fetchone()
        if count >= max_vals:
            raise quota_error(
                "max_vals",
                max_vals,
                f"a user may have at most {max_vals} vals (quotas.max_vals); delete one first",
            )

    def _drop_old_versions(self, val_id: int, keep: int) -> None:
        """Keep a val's newest `keep` versions (the latest always among them) and the
        records of those only."""
        row = self._db.execute(
            "SELECT version FROM versions WHERE val_id = ? ORDER BY version DESC LIMIT 1 OFFSET ?",
            (val_id, keep),
        ).fetchone()
        if row is not None:
            self._db.execute(
                "DELETE FROM versions WHERE val_id = ? AND version <= ?", (val_id, row[0])
            )
            self._db.execute("DELETE FROM runs WHERE val_id = ? AND version <= ?", (val_id, row[0]))

    def version_list(self, owner: str, name: str) -> list[tuple[int, float]]:
        """A val's versions as (number, created_at), oldest first: never their code."""
        rows = self._db.execute(
            "SELECT ver.version, ver.created_at FROM vals v JOIN users u ON u.id = v.user_id "
            "JOIN versions ver ON ver.val_id = v.id WHERE u.name = ? AND v.name_key = ? "
            "ORDER BY ver.version",
            (owner, name.lower()),
        )
        return [(int(version), float(created_at)) for version, created_at in rows]

    def versions(self, owner: str, name: str) -> list[ValVersion]:
        sql = self._VERSION_SELECT + "WHERE u.name = ? AND v.name_key = ? ORDER BY ver.version"
        return [ValVersion(*row) for row in self._db.execute(sql, (owner, name.lower()))]

    def list_vals(self, owner: str, privacies: tuple[str, ...]) -> list[ValVersion]:
        """A user's vals at their latest version, by name. A listing: their code is not
        read (`code` is empty), so listing many large vals costs what the list shows."""
        marks = ",".join("?" for _ in privacies)
        select = self._VERSION_SELECT.replace("ver.code", "''")
        sql = (
            select + f"WHERE u.name = ? AND v.privacy IN ({marks}) "
            "AND ver.version = (SELECT MAX(version) FROM versions WHERE val_id = v.id) "
            "ORDER BY v.name_key"
        )
        return [ValVersion(*row) for row in self._db.execute(sql, (owner, *privacies))]

    def set_privacy(self, owner: str, name: str, privacy: str) -> ValVersion | None:
        """Change a val's privacy; its latest version as changed, or None if there is none."""
        if privacy not in PRIVACY:
            raise InvalidError(f"privacy must be one of {', '.join(PRIVACY)}", "bad_privacy")
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE vals SET privacy = ? WHERE name_key = ? "
                "AND user_id = (SELECT id FROM users WHERE name = ?)",
                (privacy, name.lower(), owner),
            )
            val = self.get_val(owner, name, None)
            if val is not None:
                self._note("val", owner, val.val_id)
            return val

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
            self._note("val", owner, row[0])
            return int(row[0])

    def delete_version(self, owner: str, name: str, version: int) -> int:
        """Delete one version of a val, and its invocation records; the val's id.

        The latest version cannot go: it is what the val's host and Run answer with, and its
        number would be handed out again by the next save, while a version number must mean
        one code for good (`?v=N`). Save a new version first, then delete the old one.
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT v.id, (SELECT MAX(version) FROM versions WHERE val_id = v.id) "
                "FROM vals v JOIN users u ON u.id = v.user_id "
                "WHERE u.name = ? AND v.name_key = ?",
                (owner, name.lower()),
            ).fetchone()
            if row is None:
                raise MissingError(f"no val {owner}/{name}", "not_found")
            val_id, latest = row
            if version == latest:
                raise RefusedError(
                    f"version {version} is the latest of {owner}/{name}: save a new version "
                    "first, or delete the val",
                    "latest_version",
                )
            cur = self._db.execute(
                "DELETE FROM versions WHERE val_id = ? AND version = ?", (val_id, version)
            )
            if cur.rowcount == 0:
                raise MissingError(f"{owner}/{name} has no version {version}", "not_found")
            self._db.execute("DELETE FROM runs WHERE val_id = ? AND version = ?", (val_id, version))
            self._note("val", owner, val_id)
            return int(val_id)

    # Env

    def env(self, owner: str) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT e.user_id, e.key, e.value, e.sealed FROM env e "
            "JOIN users u ON u.id = e.user_id WHERE u.name = ? ORDER BY e.key",
            (owner,),
        )
        return {
            key: self._open(user_id, key, value, sealed) for user_id, key, value, sealed in rows
        }

    def _open(self, user_id: int, key: str, value: str, sealed: int) -> str:
        if not sealed:
            return value
        if self._sealer is None:  # _check_secret_key refuses this at open; a racing writer
            raise ConfigError(f"env {key} is sealed and this valrun has no secret key")
        return self._sealer.open(user_id, key, value)

    def env_keys(self, owner: str) -> list[str]:
        """A user's env keys, sorted: the values are neither read nor opened."""
        rows = self._db.execute(
            "SELECT e.key FROM env e JOIN users u ON u.id = e.user_id WHERE u.name = ? "
            "ORDER BY e.key",
            (owner,),
        )
        return [key for (key,) in rows]

    def set_env(
        self,
        owner: str,
        key: str,
        value: str,
        quotas: QuotasConfig | None = None,
        limits: WorkerLimits | None = None,
    ) -> None:
        """Set one env value; with `quotas`, the env as it would be after the write is
        checked in the same transaction (runtime.quotas.check_env)."""
        user = self.user(owner)
        plain, sealed = value, 0
        if self._sealer is not None:
            value, sealed = self._sealer.seal(user.id, key, value), 1
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if quotas is not None:
                env = self.env(owner)
                env[key] = plain
                check_env(env, quotas, limits or WorkerLimits())
            self._db.execute(
                "INSERT INTO env (user_id, key, value, sealed) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (user_id, key) DO UPDATE "
                "SET value = excluded.value, sealed = excluded.sealed",
                (user.id, key, value, sealed),
            )
            self._note("env", owner, None)

    # Sealing env values at rest

    def _check_secret_key(self) -> None:
        """Refuse a missing or wrong key when values are sealed; seal plain values when a
        key is newly given (so turning it on protects what is already stored)."""
        ((sealed,),) = self._db.execute("SELECT COUNT(*) FROM env WHERE sealed = 1").fetchall()
        rows = self._db.execute("SELECT value FROM meta WHERE key = 'secret_key_id'").fetchall()
        key_id = rows[0][0] if rows else None
        if sealed and self._sealer is None:
            raise ConfigError(
                f"the env values in {self.where} are encrypted: set [store] secret_key or "
                "$VALRUN_SECRET_KEY to the key they were sealed with"
            )
        if self._sealer is None:
            return
        if sealed and key_id != self._sealer.key_id:
            raise ConfigError(
                f"the secret key is not the one the env values in {self.where} were sealed "
                "with; to change keys, run `valrun rotate-key` with the old key set and the "
                "new one in $VALRUN_NEW_SECRET_KEY"
            )
        self.reseal(self._sealer)

    def reseal(self, new: Sealer | None) -> int:
        """Open every env value with the current key and seal it with `new` (None: store it
        plain), in one transaction; afterwards this store uses `new`. How many changed."""
        changed = 0
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT user_id, key, value, sealed FROM env").fetchall()
            for user_id, key, value, sealed in rows:
                if not sealed and new is None:
                    continue
                if sealed and new is not None and new is self._sealer:
                    continue  # already sealed with this key
                plain = self._open(user_id, key, value, sealed)
                stored = (new.seal(user_id, key, plain), 1) if new else (plain, 0)
                self._db.execute(
                    "UPDATE env SET value = ?, sealed = ? WHERE user_id = ? AND key = ?",
                    (*stored, user_id, key),
                )
                changed += 1
            if new is None:
                self._db.execute("DELETE FROM meta WHERE key = 'secret_key_id'")
            else:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('secret_key_id', ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (new.key_id,),
                )
        self._sealer = new
        if changed:
            logger.info("env values re-stored: %d (%s)", changed, "sealed" if new else "plain")
        return changed

    def delete_env(self, owner: str, key: str) -> bool:
        user = self.user(owner)
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute("DELETE FROM env WHERE user_id = ? AND key = ?", (user.id, key))
            if cur.rowcount == 0:
                return False
            self._note("env", owner, None)
            return True

    # Invocation records

    def add_records(self, records: list[Record], keep: int, max_bytes: int | None = None) -> None:
        """Write records and trim each affected bucket to its newest `keep`, in one
        transaction; with `max_bytes`, trim the oldest of all records too, to keep their
        logs and messages under it.

        The rows go in a few multi-row statements (`_runs_insert`), not one statement per
        record: the writer is a thread beside the event loop, and each statement hands the
        GIL back and forth with it (measured: about 30 µs of the front end's 560 per request)."""
        user_ids: dict[str, int | None] = {}
        buckets: set[tuple[int | None, int | None]] = set()
        rows: list[tuple[object, ...]] = []
        for r in records:
            user_id = None
            if r.val_id is None and r.owner:
                if r.owner not in user_ids:
                    user_ids[r.owner] = self._user_id(r.owner)
                user_id = user_ids[r.owner]
            buckets.add((r.val_id, user_id))
            traceback = None if r.traceback is None else json.dumps(list(r.traceback))
            rows.append(
                (
                    *(r.val_id, user_id, r.source, r.version, r.started_at, r.duration_ms),
                    *(r.status, r.log, r.error_type, r.error_message, traceback, r.method),
                    *(r.path, r.fetches, r.size_bytes, len(rows)),
                )
            )
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            done = 0
            while done < len(rows):
                # Chunks of 256, 128, ... 1 rows: few statements, and few distinct ones to
                # prepare and cache.
                size = 1 << (min(len(rows) - done, RUNS_PER_INSERT).bit_length() - 1)
                chunk = rows[done : done + size]
                self._db.execute(_runs_insert(size), [v for row in chunk for v in row])
                done += size
            for val_id, user_id in buckets:
                # `= ?` or `IS NULL`, never `IS ?`: PostgreSQL's null-safe equality cannot
                # use the bucket index. A val deleted meanwhile has no records left to trim:
                # its rows were not inserted.
                where, params = _bucket(val_id, user_id)
                self._db.execute(
                    f"DELETE FROM runs WHERE {where} AND id <= ("
                    f"  SELECT id FROM runs WHERE {where} ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (*params, *params, keep),
                )
            if max_bytes is not None:
                self._trim_runs_to(max_bytes)

    def _trim_runs_to(self, max_bytes: int) -> None:
        (total,) = self._db.execute("SELECT coalesce(sum(bytes), 0) FROM runs").fetchone()
        if total <= max_bytes:
            return
        # Down to 90 %, so a store at its ceiling is not trimmed on every batch: the oldest
        # records up to the first whose running total reaches the excess.
        excess = total - max_bytes * 9 // 10
        (last,) = self._db.execute(
            "SELECT id FROM (SELECT id, SUM(bytes) OVER (ORDER BY id) AS upto FROM runs) AS r "
            "WHERE upto >= ? ORDER BY id LIMIT 1",
            (excess,),
        ).fetchone()
        self._db.execute("DELETE FROM runs WHERE id <= ?", (last,))

    def _user_id(self, name: str) -> int | None:
        row = self._db.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else int(row[0])

    _RUN_SELECT = (
        "SELECT val_id, ?, source, version, started_at, duration_ms, status, log, "
        "error_type, error_message, traceback, method, path, id, fetches FROM runs "
    )

    def records(self, val: ValVersion, limit: int, after: int | None = None) -> list[Record]:
        """A val's records: the newest `limit`, newest first; with `after` (a record id),
        the first `limit` written after it, oldest first."""
        where = "WHERE val_id = ? AND user_id IS NULL "
        return self._records(where, (val.owner, val.val_id), limit, after)

    def eval_records(self, owner: str, limit: int, after: int | None = None) -> list[Record]:
        """The records of a user's Evals, ordered as `records`."""
        user = self.user(owner)
        where = "WHERE val_id IS NULL AND user_id = ? "
        return self._records(where, (owner, user.id), limit, after)

    def _records(
        self, where: str, params: tuple[object, ...], limit: int, after: int | None
    ) -> list[Record]:
        if after is None:
            sql = self._RUN_SELECT + where + "ORDER BY id DESC LIMIT ?"
            rows = self._db.execute(sql, (*params, limit))
        else:
            sql = self._RUN_SELECT + where + "AND id > ? ORDER BY id LIMIT ?"
            rows = self._db.execute(sql, (*params, after, limit))
        return [_record(row) for row in rows]

    # Schedules (docs/schedules.md). The interface a shared store keeps: claim_due is the one
    # place a tick changes hands, in one write transaction (on PostgreSQL under the store's
    # write lock, runtime/pgdb.py, which also keeps the per-user running cap across nodes).

    def _schedule_count(self, user_id: int) -> int:
        (count,) = self._db.execute(
            "SELECT COUNT(*) FROM schedules s JOIN vals v ON v.id = s.val_id WHERE v.user_id = ?",
            (user_id,),
        ).fetchone()
        return int(count)

    def put_schedule(
        self, val_id: int, schedule: Schedule, now: float, max_per_user: int
    ) -> tuple[ScheduleInfo, bool] | None:
        """Set a val's schedule (its next tick counted from `now`); None if the val is gone.
        A run in progress keeps its lease."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT user_id FROM vals WHERE id = ?", (val_id,)).fetchone()
            if row is None:
                return None
            created = not self._db.execute(
                "SELECT 1 FROM schedules WHERE val_id = ?", (val_id,)
            ).fetchone()
            if created and self._schedule_count(row[0]) >= max_per_user:
                raise QuotaError(
                    f"a user may schedule at most {max_per_user} vals; remove one first",
                    "schedule_limit",
                )
            if schedule.kind == "every":
                next_run_at = now + schedule.every_s
            else:
                next_run_at = next_tick(schedule, now, now)
            self._db.execute(
                "INSERT INTO schedules (val_id, kind, expr, tz, created_at, next_run_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (val_id) DO UPDATE SET "
                "kind = excluded.kind, expr = excluded.expr, tz = excluded.tz, "
                "next_run_at = excluded.next_run_at",
                (val_id, schedule.kind, schedule.expr, schedule.tz, now, next_run_at),
            )
            info = self.schedule_of(val_id)
        assert info is not None  # written in this transaction
        return info, created

    def schedule_of(self, val_id: int) -> ScheduleInfo | None:
        row = self._db.execute(
            "SELECT kind, expr, tz, created_at, next_run_at, last_run_at FROM schedules "
            "WHERE val_id = ?",
            (val_id,),
        ).fetchone()
        if row is None:
            return None
        kind, expr, tz, created_at, next_run_at, last_run_at = row
        return ScheduleInfo(val_id, Schedule(kind, expr, tz), created_at, next_run_at, last_run_at)

    def delete_schedule(self, val_id: int) -> bool:
        (cur,) = self._write([("DELETE FROM schedules WHERE val_id = ?", (val_id,))])
        return cur.rowcount > 0

    def claim_due(
        self,
        now: float,
        limit: int,
        lease_s: float,
        max_running_per_user: int,
        finished: Sequence[tuple[int, int]] = (),
    ) -> tuple[list[Tick], float | None, dict[int, Resolved]]:
        """Free the leases of the `finished` runs ((val_id, claim) pairs); claim up to
        `limit` due ticks to run, and skip those whose previous run still holds its lease;
        move each past `now` (missed ticks collapse into this one). A user with
        `max_running_per_user` runs in progress waits. Answers the ticks, the next due time,
        and what each claimed tick runs: its val's latest version and owner's env, read in
        the same transaction (so a val deleted or unscheduled before the claim never runs)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._free_leases(finished)
            # Due rows beyond the free slots too: skips take no slot, and some owners wait.
            rows = self._db.execute(
                "SELECT s.val_id, u.name, v.user_id, s.kind, s.expr, s.tz, s.next_run_at, "
                "s.last_run_at, s.claim, s.running_until FROM schedules s "
                "JOIN vals v ON v.id = s.val_id JOIN users u ON u.id = v.user_id "
                "WHERE s.next_run_at <= ? ORDER BY s.next_run_at LIMIT ?",
                (now, limit * 4 + 64),
            ).fetchall()
            running = dict(
                self._db.execute(
                    "SELECT v.user_id, COUNT(*) FROM schedules s JOIN vals v ON v.id = s.val_id "
                    "WHERE s.running_until > ? GROUP BY v.user_id",
                    (now,),
                ).fetchall()
            )
            due = [
                Due(val_id, owner, user_id, Schedule(kind, expr, tz), *rest)
                for val_id, owner, user_id, kind, expr, tz, *rest in rows
            ]
            ticks = plan_claims(due, now, limit, max_running_per_user, running)
            for tick in ticks:
                if tick.skipped:
                    self._db.execute(
                        "UPDATE schedules SET next_run_at = ? WHERE val_id = ?",
                        (tick.next_run_at, tick.val_id),
                    )
                else:
                    self._db.execute(
                        "UPDATE schedules SET next_run_at = ?, last_run_at = ?, claim = ?, "
                        "running_until = ? WHERE val_id = ?",
                        (tick.next_run_at, now, tick.claim, now + lease_s, tick.val_id),
                    )
            (next_due,) = self._db.execute("SELECT MIN(next_run_at) FROM schedules").fetchone()
            vals: dict[int, Resolved] = {}
            envs: dict[str, dict[str, str]] = {}
            for tick in ticks:
                if not tick.skipped:
                    row = self._db.execute(
                        self._VERSION_SELECT + "WHERE v.id = ? ORDER BY ver.version DESC LIMIT 1",
                        (tick.val_id,),
                    ).fetchone()
                    val = ValVersion(*row)  # the join above found the val: it has versions
                    if val.owner not in envs:
                        envs[val.owner] = self.env(val.owner)
                    vals[tick.val_id] = (val, envs[val.owner])
        return ticks, next_due, vals

    def renew_lease(self, val_id: int, claim: int, until: float) -> None:
        self._write(
            [
                (
                    "UPDATE schedules SET running_until = ? WHERE val_id = ? AND claim = ?",
                    (until, val_id, claim),
                )
            ]
        )

    def finish_runs(self, finished: Sequence[tuple[int, int]]) -> None:
        """Free the leases of finished runs ((val_id, claim) pairs); `claim_due` does it too."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._free_leases(finished)

    def _free_leases(self, finished: Sequence[tuple[int, int]]) -> None:
        # Only the lease a run took: a later claim's lease is not this run's to free.
        self._db.executemany(
            "UPDATE schedules SET running_until = NULL WHERE val_id = ? AND claim = ?", finished
        )


#: Rows of invocation records one INSERT statement takes at most (16 parameters each).
RUNS_PER_INSERT = 256
_RUNS_COLUMNS = (
    ("val_id", "BIGINT"),
    ("user_id", "BIGINT"),
    ("source", "TEXT"),
    ("version", "BIGINT"),
    ("started_at", "DOUBLE PRECISION"),
    ("duration_ms", "DOUBLE PRECISION"),
    ("status", "BIGINT"),
    ("log", "TEXT"),
    ("error_type", "TEXT"),
    ("error_message", "TEXT"),
    ("traceback", "TEXT"),
    ("method", "TEXT"),
    ("path", "TEXT"),
    ("fetches", "TEXT"),
    ("bytes", "BIGINT"),
)


@functools.cache
def _runs_insert(rows: int) -> str:
    """One INSERT of `rows` records, SQL both engines run: from a VALUES list (whose columns
    both name column1, column2, ...), each cast to its column's type (PostgreSQL types a
    column of NULLs as text), in the batch's order, and without the records of vals deleted
    meanwhile."""
    names = ", ".join(name for name, _ in _RUNS_COLUMNS)
    casts = ", ".join(
        f"CAST(v.column{i} AS {kind})" for i, (_, kind) in enumerate(_RUNS_COLUMNS, start=1)
    )
    # The last value is the row's place in the batch: ids are given in that order.
    values = ", ".join(["(" + ", ".join("?" * (len(_RUNS_COLUMNS) + 1)) + ")"] * rows)
    return (
        f"INSERT INTO runs ({names}) SELECT {casts} FROM (VALUES {values}) AS v "
        "WHERE CAST(v.column1 AS BIGINT) IS NULL "
        "OR EXISTS (SELECT 1 FROM vals WHERE vals.id = CAST(v.column1 AS BIGINT)) "
        f"ORDER BY CAST(v.column{len(_RUNS_COLUMNS) + 1} AS BIGINT)"
    )


def _bucket(val_id: int | None, user_id: int | None) -> tuple[str, tuple[int, ...]]:
    """The WHERE clause of one bucket of records, and its parameters."""
    if val_id is not None:
        return "val_id = ? AND user_id IS NULL", (val_id,)
    if user_id is not None:
        return "val_id IS NULL AND user_id = ?", (user_id,)
    return "val_id IS NULL AND user_id IS NULL", ()


def _record(row: tuple[Any, ...]) -> Record:
    (val_id, owner, source, version, started_at, duration_ms, status, log) = row[:8]
    (error_type, error_message, traceback, method, path, run_id, fetches) = row[8:]
    return Record(
        val_id,
        owner,
        source,
        version,
        started_at,
        duration_ms,
        status,
        log,
        error_type,
        error_message,
        None if traceback is None else tuple(json.loads(traceback)),
        method,
        path,
        run_id,
        fetches,
    )


# Result codes (sqlite3 sqlite_errorcode & 0xFF, https://sqlite.org/rescode.html) that mean
# another process (its lock) or the disk, not valrun nor the request, is at fault.
SQLITE_BUSY, SQLITE_LOCKED = 5, 6
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14


def store_error(exc: sqlite3.Error) -> Exception:
    """An sqlite3 error as the HTTP error a client should see: 507 for a full disk, 503 for
    a store that cannot be written or whose lock another process held past `busy_timeout`
    (a process stopped mid-write); anything else stays what it was (a bug: 500)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (SQLITE_BUSY, SQLITE_LOCKED):
        return StoreUnavailableError(
            f"valrun's store is busy: another process held its lock too long ({exc}); "
            "nothing was saved; retry shortly",
        )
    if code == SQLITE_FULL:
        return StorageFullError(
            f"the disk that holds valrun's store is full ({exc}): nothing was saved; "
            "reads and invocations still work",
        )
    if code in (SQLITE_READONLY, SQLITE_IOERR, SQLITE_CANTOPEN):
        return StoreUnavailableError(
            f"valrun's store cannot be written right now ({exc}): nothing was saved; "
            "reads and invocations still work",
        )
    return exc


class AsyncStore:
    """The front end's handle: `await store.call(Store.get_val, owner, name, None)`.

    `resolve`, on every val request's path, is cached: a trip to the store thread costs
    about a quarter of the front end's time per request. Writes made through `call` that
    change what a val host resolves to empty the cache at once; writes made elsewhere (another
    process or node on a shared store) empty what they touch when the change feed brings
    them (`apply_changes`, runtime/feed.py); entries also expire after `RESOLVE_TTL_S`, a
    bound should the feed itself be down.
    """

    RESOLVE_TTL_S = 2.0
    RESOLVE_CACHE_ENTRIES = 10_000
    #: The code held by cached resolutions, all together: a val's code may be 256 KiB, and
    #: 10,000 entries of it would be 2.5 GiB. Envs are shared per owner (`_share`).
    RESOLVE_CACHE_CODE_BYTES = 64 * 1024 * 1024
    #: Store methods after which cached resolutions may be wrong.
    INVALIDATES: frozenset[Callable[..., object]] = frozenset(
        {
            *(Store.put_val, Store.delete_val, Store.delete_version, Store.set_privacy),
            *(Store.set_env, Store.delete_env),
        }
    )

    #: The token lookup cache (runtime/tokens.py): an entry's life, and its two bounds.
    TOKEN_TTL_S = 1.0
    TOKEN_CACHE_KNOWN = 10_000
    TOKEN_CACHE_UNKNOWN = 10_000
    #: Store methods after which cached token lookups may be wrong.
    TOKEN_INVALIDATES: frozenset[Callable[..., object]] = frozenset(
        {Store.create_user, Store.create_token, Store.revoke_token}
    )

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tokens: TokenCache[User] = TokenCache(
            ttl_s=self.TOKEN_TTL_S,
            max_known=self.TOKEN_CACHE_KNOWN,
            max_unknown=self.TOKEN_CACHE_UNKNOWN,
        )
        #: When and why a write last failed for want of a writable disk; None once a write
        #: has succeeded since. For /healthz.
        self.write_failure: tuple[float, str] | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._resolved: dict[tuple[str, str, int | None], tuple[float, Resolved | None]] = {}
        # One env object per owner and one ValVersion per (val, version) for all cached
        # resolutions: every val of an owner resolves to the same env, and `?v=N` of the
        # latest to the same code, so the cache holds each once (emptied with `_resolved`).
        self._envs: dict[str, dict[str, str]] = {}
        self._versions: dict[tuple[int, int], ValVersion] = {}
        self._code_bytes = 0
        # Bumped by every invalidating write: a resolve that started before the write must
        # not put what it read into the cache after the write emptied it.
        self._generation = 0
        self._listeners: list[ChangeListener] = []

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(kind, user, val_id)` for each change another process or node makes
        (runtime/feed.py), after the cached resolutions it affects are dropped."""
        self._listeners.append(listener)

    def apply_changes(self, changes: Sequence[Change]) -> None:
        """Drop what `changes` (made elsewhere, read from the feed) make stale; tell the
        listeners."""
        self._generation += 1
        if any(change.kind in ("token", "user", "all") for change in changes):
            self.tokens.clear()
        users = {change.user for change in changes}
        if None in users or any(change.kind == "all" for change in changes):
            self._clear_resolved()
        else:
            for key in [key for key in self._resolved if key[0] in users]:
                del self._resolved[key]
            for user in users:
                self._envs.pop(str(user), None)
        for change in changes:
            for listener in self._listeners:
                listener(change.kind, change.user, change.val_id)

    async def call(
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
        except (StorageFullError, StoreUnavailableError) as exc:  # PostgreSQL's (runtime.pgdb)
            self.write_failure = (trio.current_time(), str(exc))
            raise
        finally:
            if method in self.INVALIDATES:
                self._generation += 1
                self._clear_resolved()
            if method in self.TOKEN_INVALIDATES:
                self.tokens.clear()
        if self.store.changes != changes and method is not Store.check_writable:
            self.write_failure = None  # a real write went through: there is room again
        return result

    async def user_for_token(self, token: str) -> User | None:
        """`Store.user_for_token`, cached (runtime/tokens.py)."""
        digest, now = hash_token(token), trio.current_time()
        hit, user = self.tokens.get(digest, now)
        if hit:
            return user
        generation = self.tokens.generation
        user = await self.call(Store.user_for_token, token)
        self.tokens.put(digest, user, now, generation)
        return user

    async def resolve(self, owner: str, name: str, version: int | None) -> Resolved | None:
        """`Store.resolve`, cached."""
        key = (owner, name.lower(), version)
        now = trio.current_time()
        cached = self._resolved.get(key)
        if cached is not None and now - cached[0] < self.RESOLVE_TTL_S:
            return cached[1]
        generation = self._generation
        resolved = await self.call(Store.resolve, owner, name, version)
        if generation == self._generation:
            if resolved is not None:
                resolved = self._share(resolved)
            if (
                len(self._resolved) >= self.RESOLVE_CACHE_ENTRIES
                or self._code_bytes > self.RESOLVE_CACHE_CODE_BYTES
            ):
                self._clear_resolved()
                if resolved is not None:
                    resolved = self._share(resolved)
            self._resolved[key] = (now, resolved)
        return resolved

    def _share(self, resolved: Resolved) -> Resolved:
        """`resolved` made of the cache's shared objects where they hold the same data."""
        val, env = resolved
        shared_env = self._envs.get(val.owner)
        if shared_env != env:  # first seen, or changed (by a write elsewhere)
            shared_env = self._envs[val.owner] = env
        shared_val = self._versions.get((val.val_id, val.version))
        if shared_val != val:
            shared_val = self._versions[(val.val_id, val.version)] = val
            self._code_bytes += len(val.code)
        return shared_val, shared_env

    def _clear_resolved(self) -> None:
        self._resolved.clear()
        self._envs.clear()
        self._versions.clear()
        self._code_bytes = 0
