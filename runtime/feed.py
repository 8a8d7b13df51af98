"""The change feed: how a front end learns what another process or node changed in the store
it shares, so that what it cached (val resolutions, warm workers) never outlives a save, an
env change, a privacy change, a delete or a token revocation by more than about a second.

Every store write that changes what a front end caches appends a row to the `changes` table
in the same transaction (`Store._note`), so a change is visible exactly when the write is.
Each front end follows the table with its own connection, never queued behind the store's:

- SQLite: a cheap indexed read of the rows after the last one seen, every `poll_s` (0.2 s);
- PostgreSQL: LISTEN on a dedicated connection (the writer's NOTIFY is delivered at its
  commit), with the same read as a fallback every `poll_s`; after a lost connection it
  reconnects and reads everything after the last sequence seen (the resync).

Writers on PostgreSQL take the store's write lock (runtime/pgdb.py), so sequences become
visible in order and "after the last seen" misses nothing. Rows older than an hour are pruned
(`Store._note`); a follower that finds its last seen row pruned (it lost the feed that long)
drops everything it cached: a `Change` of kind "all".

A process skips the changes it made itself (`Store.origin`): its own writes already empty its
caches at once (`AsyncStore.call`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import trio

from runtime.errors import StoreUnavailableError
from runtime.pgdb import PostgresReader, is_postgres

if TYPE_CHECKING:
    from runtime.store import AsyncStore

logger = logging.getLogger(__name__)

#: A listener's arguments: what changed, whose, which val (None: not one val).
ChangeListener = Callable[[str, str | None, int | None], None]
#: Rows read at most per poll; more wait for the next one (a poll per 0.2 s).
READ_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: str  # val, env, token, user; "all": the feed was lost, drop everything
    user: str | None
    val_id: int | None


class Reader(Protocol):
    """One backend's way of reading the feed; its methods run in a worker thread."""

    def last_seq(self) -> int: ...
    def read(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]: ...
    def wait(self, timeout_s: float) -> None: ...
    def close(self) -> None: ...


class SqliteReader:
    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA busy_timeout=5000")

    def last_seq(self) -> int:
        return int(self._db.execute("SELECT coalesce(MAX(seq), 0) FROM changes").fetchone()[0])

    def read(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk gone
            raise StoreUnavailableError(f"cannot read the change feed: {exc}") from exc

    def wait(self, timeout_s: float) -> None:
        raise NotImplementedError  # polled: follow_changes sleeps in trio instead

    def close(self) -> None:
        self._db.close()


def read_after(reader: Reader, last: int, origin: str) -> tuple[list[Change], int]:
    """The changes after `last` made by others than `origin`, and the new last seen."""
    rows = reader.read(
        "SELECT seq, origin, kind, user_name, val_id FROM changes WHERE seq > ? "
        "ORDER BY seq LIMIT ?",
        (last, READ_LIMIT),
    )
    if rows and int(rows[0][0]) > last + 1:
        # A gap: a rolled-back sequence (PostgreSQL), or rows pruned before they were seen.
        ((oldest,),) = reader.read("SELECT coalesce(MIN(seq), 0) FROM changes", ())
        if int(oldest) > last + 1:
            newest = reader.last_seq()
            logger.warning("change feed: rows after %d were pruned unseen; dropping caches", last)
            return [Change(newest, "all", None, None)], newest
    changes = [
        Change(int(seq), kind, user, None if val_id is None else int(val_id))
        for seq, row_origin, kind, user, val_id in rows
        if row_origin != origin
    ]
    return changes, int(rows[-1][0]) if rows else last


def open_reader(location: str) -> Reader:
    if is_postgres(location):
        return PostgresReader(location)
    return SqliteReader(location)


async def follow_changes(
    store: AsyncStore,
    *,
    poll_s: float = 0.2,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Follow the store's change feed until cancelled, handing each batch of others'
    changes to `store.apply_changes`."""
    location, origin = store.store.path, store.store.origin
    limiter = trio.CapacityLimiter(1)
    reader = await trio.to_thread.run_sync(open_reader, location)
    with closing(reader):
        last = await trio.to_thread.run_sync(reader.last_seq, limiter=limiter)
        task_status.started()
        backoff_s = poll_s
        while True:
            try:
                if isinstance(reader, SqliteReader):
                    await trio.sleep(poll_s)
                else:  # a NOTIFY ends the wait early
                    await trio.to_thread.run_sync(reader.wait, poll_s, limiter=limiter)
                changes, last = await trio.to_thread.run_sync(
                    read_after, reader, last, origin, limiter=limiter
                )
            except StoreUnavailableError as exc:
                # The reader reconnects on its next call and reads from `last` (the resync).
                logger.warning("change feed: %s; retrying in %.1f s", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = poll_s
            if changes:
                store.apply_changes(changes)
