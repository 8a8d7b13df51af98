"""Who uses a database file: a running service holds a shared lock, the commands that must
not run under it (restore, rotate-key) an exclusive one.

An flock on a file beside the database (`valrun.db.lock`), never on the database itself:
SQLite's own locks are POSIX record locks, and any other descriptor closed on the database
file would drop them. flock locks go when their holder exits, however it exits.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from runtime.errors import ValrunError


class InUseError(ValrunError):
    pass


@contextmanager
def hold(db_path: str, *, exclusive: bool, what: str) -> Iterator[None]:
    """Hold the lock while the block runs; InUseError at once if it is held otherwise."""
    fd = os.open(f"{db_path}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if exclusive:
                raise InUseError(
                    f"{what}: a valrun is serving from {db_path}; stop it first"
                ) from None
            raise InUseError(f"{what}: {db_path} is being restored or re-keyed") from None
        yield
    finally:
        os.close(fd)
