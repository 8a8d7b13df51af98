"""`valrun backup` and `valrun restore`: consistent copies of a live database.

A plain `cp` of a database in WAL mode copies the main file without the writes still in its
-wal file (most recent ones, until a checkpoint). SQLite's online backup API copies the
database as one reader sees it, WAL included, while the service keeps writing; a writer that
commits during the copy makes the copy restart, so what lands is one consistent snapshot.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from runtime.errors import ValrunError
from runtime.schema import check_version, create_private, schema_version


class BackupError(ValrunError):
    pass


def _copy(source: sqlite3.Connection, dest_path: Path) -> None:
    """Copy `source` into a new private file at `dest_path`, atomically (write, then rename)."""
    partial = dest_path.with_name(dest_path.name + ".partial")
    partial.unlink(missing_ok=True)
    create_private(partial)
    with closing(sqlite3.connect(partial)) as dest:
        source.backup(dest)
        # A backup is a single file: no -wal beside it to lose on the way to another disk.
        dest.execute("PRAGMA journal_mode=DELETE")
        (result,) = dest.execute("PRAGMA quick_check").fetchone()
    if result != "ok":
        partial.unlink()
        raise BackupError(f"the copy failed SQLite's check: {result}")
    os.replace(partial, dest_path)


def backup(db_path: str, dest: str | Path) -> int:
    """Copy the live database to `dest` (which must not exist); its schema version."""
    dest = Path(dest)
    if not Path(db_path).is_file():
        raise BackupError(f"there is no database at {db_path} (check [store] url)")
    if dest.exists():
        raise BackupError(f"{dest} already exists; back up to a new file")
    with closing(sqlite3.connect(db_path)) as source:
        source.execute("PRAGMA busy_timeout=5000")
        version = schema_version(source)
        _copy(source, dest)
    return version


def restore(db_path: str, source_path: str | Path) -> Path | None:
    """Replace the database at `db_path` with the backup at `source_path`.

    The backup is checked first (a valrun database, a schema this valrun knows); the database
    it replaces is itself backed up next to it first. Returns that copy's path (None when
    there was no database). The caller holds the database's exclusive lock
    (runtime.dblock): a running service would keep serving from its caches and warm workers.
    """
    source_path = Path(source_path)
    if not source_path.is_file():
        raise BackupError(f"no backup file at {source_path}")
    try:
        with closing(sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)) as source:
            tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master")}
            if "users" not in tables or "vals" not in tables:
                raise BackupError(f"{source_path} is not a valrun database")
            check_version(schema_version(source), str(source_path))
            (result,) = source.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{source_path} is not a readable SQLite database: {exc}") from None
    if result != "ok":
        raise BackupError(f"{source_path} failed SQLite's check: {result}")
    saved = None
    if Path(db_path).is_file():
        saved = Path(f"{db_path}.before-restore-{time.strftime('%Y%m%d-%H%M%S')}")
        backup(db_path, saved)
    create_private(db_path)
    with (
        closing(sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)) as source,
        closing(sqlite3.connect(db_path)) as dest,
    ):
        dest.execute("PRAGMA busy_timeout=5000")
        source.backup(dest)
        dest.execute("PRAGMA journal_mode=WAL")
    return saved
