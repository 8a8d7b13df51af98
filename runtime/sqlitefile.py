"""Opening an SQLite file that other processes may be opening at the same moment.

valrun's front-end processes open the same files as they start (the store, the blob store),
and the same user's SQL database on its first use in each. Most of SQLite's locks are waited
for (`busy_timeout`), but some are refused at once with "database is locked" (as while
another connection switches the file to WAL). Four processes opening a new blob store at
once failed in 6 rounds of 60 that way, and a two-process start failed in CI. So each file
is prepared by `prepare`, which tries again for a while.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

#: Tries while another connection holds a lock SQLite refuses at once.
OPEN_ATTEMPTS = 8
#: How long a statement waits for a lock SQLite does wait for.
BUSY_TIMEOUT_MS = 5000


def prepare(db: sqlite3.Connection, setup: Callable[[sqlite3.Connection], object]) -> None:
    """`busy_timeout`, WAL mode, then `setup` (which must be safe to run again); the last
    two tried again on "database is locked", after 0.05 s, then twice as long each time
    (6.35 s in all). WAL is set only when the file is not in it already: a file keeps it."""
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    for attempt in range(OPEN_ATTEMPTS):
        try:
            (mode,) = db.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            setup(db)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2**attempt)
