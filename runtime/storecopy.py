"""`valrun store copy --to postgresql://...`: move an SQLite store into an empty PostgreSQL
database, everything kept (ids, version numbers, token hashes, sealed env values as sealed,
records, schedules), so that the same valrun.toml with the new url serves the same service.

The copy runs with the service stopped (the SQLite file's lock, runtime/dblock.py, and the
target's serve lock, runtime/pgdb.py) and in one PostgreSQL transaction: it lands whole or
not at all. The target is migrated to this valrun's schema first and must hold no user.
The change feed's rows are not copied: there is no front end yet to follow them.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing

import psycopg

from runtime import dblock, pgdb
from runtime.errors import ValrunError
from runtime.store import Store

#: Each table and its columns, parents before children (foreign keys).
TABLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("users", ("id", "name", "created_at")),
    ("tokens", ("id", "user_id", "hash", "created_at", "revoked_at")),
    ("vals", ("id", "user_id", "name", "name_key", "privacy", "created_at")),
    ("versions", ("val_id", "version", "code", "created_at")),
    ("env", ("user_id", "key", "value", "sealed")),
    ("meta", ("key", "value")),
    (
        "runs",
        (
            *("id", "val_id", "user_id", "source", "version", "started_at", "duration_ms"),
            *("status", "log", "error_type", "error_message", "method", "path", "traceback"),
            *("fetches", "bytes"),
        ),
    ),
    (
        "schedules",
        (
            *("val_id", "kind", "expr", "tz", "created_at", "next_run_at", "last_run_at"),
            *("claim", "running_until"),
        ),
    ),
)
#: Tables whose ids are identities on PostgreSQL: their sequences continue after the copy.
IDENTITIES = ("users", "tokens", "vals", "runs")
BATCH_ROWS = 1000


class CopyError(ValrunError):
    pass


def copy_store(source_path: str, target_url: str, secret_key: str = "") -> dict[str, int]:
    """Copy the SQLite store at `source_path` into the PostgreSQL database `target_url`;
    how many rows of each table were copied."""
    if not pgdb.is_postgres(target_url):
        raise CopyError("--to must be a postgresql:// URL")
    with dblock.hold(source_path, exclusive=True, what="store copy"):
        # Opening migrates the source to this valrun's schema, and checks its secret key.
        with closing(Store(source_path, secret_key=secret_key)):
            pass
        # Creates or upgrades the target's schema (and, with a key, checks one it sealed with).
        with closing(Store(target_url, secret_key=secret_key)):
            pass
        with pgdb.hold_exclusive(target_url, "store copy"):
            target = pgdb.PgConnection(target_url)
            try:
                return _copy(source_path, target)
            finally:
                target.close()


def _copy(source_path: str, target: pgdb.PgConnection) -> dict[str, int]:
    counts: dict[str, int] = {}
    with closing(sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)) as source, target:
        target.execute("BEGIN IMMEDIATE")
        (users,) = target.execute("SELECT COUNT(*) FROM users").fetchone()
        if users:
            raise CopyError(f"{target.where} already holds users: copy into an empty database")
        target.execute("DELETE FROM meta")  # the key's id, written when it was opened above
        conn = target.connection()
        for table, columns in TABLES:
            names = ", ".join(columns)
            insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})"
            rows = source.execute(f"SELECT {names} FROM {table}")
            counts[table] = 0
            while batch := rows.fetchmany(BATCH_ROWS):
                if table == "runs":  # PostgreSQL's text holds no NUL (runtime/pgdb.py)
                    batch = [_no_nul(row) for row in batch]
                try:
                    with conn.cursor() as cursor:
                        cursor.executemany(insert, batch)
                except psycopg.Error as exc:
                    raise CopyError(f"copying {table} into {target.where}: {exc}") from exc
                counts[table] += len(batch)
        for table in IDENTITIES:
            # AUTOINCREMENT's high-water mark, not MAX(id): the ids of deleted rows are never
            # handed out again (a deleted val's id must not name a new one).
            row = source.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
            used = (row.fetchone() or (0,))[0]
            target.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"GREATEST(?, (SELECT coalesce(MAX(id), 0) FROM {table})) + 1, false)",
                (used,),
            )
    return counts


def _no_nul(row: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(v.replace("\0", "\ufffd") if isinstance(v, str) else v for v in row)
