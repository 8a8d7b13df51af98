"""The store's schema, as numbered migrations, and the file it lives in.

The database's version is SQLite's `PRAGMA user_version`: the number of migrations applied.
`migrate` applies the missing ones in order, each in its own transaction with the version
bump, so a crash leaves the database at one version or the next, never between. A database
whose version is higher than `len(MIGRATIONS)` was written by a newer valrun: it is refused,
never downgraded in place (the newer code may store things this one would misread).

Databases made before versions existed have version 0 and the tables of migration 1 already;
migration 1 creates only what is missing, so it applies to them too.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.errors import ValrunError

if TYPE_CHECKING:
    from runtime.pgdb import PgConnection


class SchemaError(ValrunError):
    """The database cannot be used by this valrun (too new, or not a valrun database)."""


MIGRATIONS: tuple[str, ...] = (
    # 1: users, tokens, vals, immutable versions, env, invocation records.
    """
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
    """,
    # 2: records say what was asked (method, path without its query) and, on failure, the
    # val's traceback (JSON list of "line N, in f"); env values may be sealed (encrypted at
    # rest, runtime.secrets), and `meta` remembers which key sealed them.
    """
    ALTER TABLE runs ADD COLUMN method TEXT;
    ALTER TABLE runs ADD COLUMN path TEXT;
    ALTER TABLE runs ADD COLUMN traceback TEXT;
    ALTER TABLE env ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # 3: records list the invocation's fetches (std.fetch): a JSON array of objects.
    """
    ALTER TABLE runs ADD COLUMN fetches TEXT NOT NULL DEFAULT '[]';
    """,
    # 4: schedules (docs/schedules.md).
    """
    -- Schedules (docs/schedules.md): at most one per val, gone with it. A tick is claimed in one
    -- transaction (Store.claim_due) that moves next_run_at past now, so with several front ends
    -- on one store each tick is claimed by one of them. `claim` counts claims: a run ends
    -- (finish_runs) only the lease it took. `running_until` is that lease: a tick that comes
    -- while it holds is skipped; a node that died mid-run frees it when it expires.
    CREATE TABLE IF NOT EXISTS schedules (
        val_id INTEGER PRIMARY KEY REFERENCES vals(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        expr TEXT NOT NULL,
        tz TEXT NOT NULL,
        created_at REAL NOT NULL,
        next_run_at REAL NOT NULL,
        last_run_at REAL,
        claim INTEGER NOT NULL DEFAULT 0,
        running_until REAL
    );
    CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_run_at);
    """,
    # 5: each record's size (its log and error message), for the ceiling on all records
    # together (store.max_runs_bytes), with a covering index so that the sum and the walk from
    # the oldest never read the logs; and the write probe's one row (Store.check_writable).
    """
    ALTER TABLE runs ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET bytes = length(CAST(log AS BLOB))
        + coalesce(length(CAST(error_message AS BLOB)), 0);
    CREATE INDEX IF NOT EXISTS runs_sizes ON runs (id, bytes);
    CREATE TABLE IF NOT EXISTS health (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        checked_at REAL NOT NULL
    );
    """,
    # 6: the change feed (runtime/feed.py, docs/store.md): every write that changes what a
    # front end caches appends a row in its own transaction; every front end follows the feed
    # and drops what it cached. `origin` names the writing Store (a process skips its own),
    # `kind` is val, env, token or user. Rows older than an hour are pruned.
    """
    CREATE TABLE IF NOT EXISTS changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        origin TEXT NOT NULL,
        kind TEXT NOT NULL,
        user_name TEXT,
        val_id INTEGER
    );
    """,
)

#: The same migrations for PostgreSQL: the same tables, columns and meaning, in its types
#: (BIGINT identities for AUTOINCREMENT ids, which are never reused either; DOUBLE PRECISION
#: for REAL; BYTEA for BLOB). Its version is the one row of `schema_version`.
POSTGRES_MIGRATIONS: tuple[str, ...] = (
    # 1
    """
    CREATE TABLE users (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE tokens (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        hash BYTEA NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION
    );
    CREATE TABLE vals (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        name_key TEXT NOT NULL,
        privacy TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        UNIQUE (user_id, name_key)
    );
    CREATE TABLE versions (
        val_id BIGINT NOT NULL REFERENCES vals(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        code TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (val_id, version)
    );
    CREATE TABLE env (
        user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (user_id, key)
    );
    CREATE TABLE runs (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        val_id BIGINT REFERENCES vals(id) ON DELETE CASCADE,
        user_id BIGINT REFERENCES users(id) ON DELETE CASCADE,
        source TEXT NOT NULL,
        version INTEGER,
        started_at DOUBLE PRECISION NOT NULL,
        duration_ms DOUBLE PRECISION NOT NULL,
        status INTEGER NOT NULL,
        log TEXT NOT NULL,
        error_type TEXT,
        error_message TEXT
    );
    CREATE INDEX runs_by_bucket ON runs (val_id, user_id, id);
    """,
    # 2
    MIGRATIONS[1],
    # 3
    MIGRATIONS[2],
    # 4
    """
    CREATE TABLE schedules (
        val_id BIGINT PRIMARY KEY REFERENCES vals(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        expr TEXT NOT NULL,
        tz TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        next_run_at DOUBLE PRECISION NOT NULL,
        last_run_at DOUBLE PRECISION,
        claim INTEGER NOT NULL DEFAULT 0,
        running_until DOUBLE PRECISION
    );
    CREATE INDEX schedules_due ON schedules (next_run_at);
    """,
    # 5
    """
    ALTER TABLE runs ADD COLUMN bytes BIGINT NOT NULL DEFAULT 0;
    UPDATE runs SET bytes = octet_length(log) + coalesce(octet_length(error_message), 0);
    CREATE INDEX runs_sizes ON runs (id, bytes);
    CREATE TABLE health (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        checked_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 6
    """
    CREATE TABLE IF NOT EXISTS changes (
        seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        origin TEXT NOT NULL,
        kind TEXT NOT NULL,
        user_name TEXT,
        val_id BIGINT
    );
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    ((version,),) = db.execute("PRAGMA user_version").fetchall()
    return int(version)


def check_version(version: int, path: str) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database {path} has schema version {version}, newer than this valrun "
            f"knows (up to {SCHEMA_VERSION}): it was written by a newer valrun. Run that "
            "version, or restore a backup made before the upgrade (valrun restore FILE)"
        )


def migrate(db: sqlite3.Connection, path: str) -> int:
    """Bring `db` (opened with isolation_level=None) to SCHEMA_VERSION; the version it had."""
    db.execute("BEGIN IMMEDIATE")  # one migrating process at a time
    try:
        start = schema_version(db)
        check_version(start, path)
        for number in range(start + 1, SCHEMA_VERSION + 1):
            for statement in _statements(MIGRATIONS[number - 1]):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return start


def migrate_postgres(db: PgConnection) -> int:
    """`migrate` for PostgreSQL: the version is the one row of `schema_version`; migrations
    run under the store's write lock (one migrating node at a time), each in a transaction
    with its version bump (PostgreSQL's DDL is transactional). The version it had."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (0)")
        start = 0 if row is None else int(row[0])
    if start > SCHEMA_VERSION:
        raise SchemaError(
            f"the database {db.where} has schema version {start}, newer than this valrun "
            f"knows (up to {SCHEMA_VERSION}): it was written by a newer valrun. Run that "
            "version, or restore a dump made before the upgrade (pg_restore)"
        )
    for number in range(start + 1, SCHEMA_VERSION + 1):
        with db:
            db.execute("BEGIN IMMEDIATE")
            (current,) = db.execute("SELECT version FROM schema_version").fetchone()
            if current >= number:  # another node applied it meanwhile
                continue
            db.execute(POSTGRES_MIGRATIONS[number - 1])
            db.execute("UPDATE schema_version SET version = ?", (number,))
    return start


def _statements(script: str) -> list[str]:
    # executescript would commit the open transaction; run statement by statement instead.
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    return statements


def create_private(path: str | Path) -> None:
    """Create the database file, readable by its owner only, if it does not exist yet.

    SQLite gives the -wal and -shm files it makes later the database file's permissions, so
    they are private too. An existing file keeps the mode its operator gave it, and is not
    even opened here: closing any descriptor of a file drops every POSIX lock this process
    holds on it, those of SQLite's open connections included.
    """
    if str(path) in ("", ":memory:") or os.path.exists(path):
        return
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0o600)
    except FileExistsError:
        return  # another process made it just now
    except OSError as exc:
        raise SchemaError(f"cannot create the database {path}: {exc.strerror}") from None
    os.close(fd)
