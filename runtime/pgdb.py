"""The store on PostgreSQL: a psycopg 3 connection that speaks the part of sqlite3's interface
`Store` uses, so that the store's SQL and transactions are written once for both backends.

What differs, and how it is bridged:
- Placeholders: `?` becomes `%s`; `x IS ?` (SQLite's null-safe equality) becomes
  `x IS NOT DISTINCT FROM %s`. Statements are translated once and remembered.
- Write transactions: SQLite's `BEGIN IMMEDIATE` makes one writer at a time. Here it is
  `BEGIN` and a transaction-scoped advisory lock (`WRITE_LOCK`), so every invariant the store
  keeps in a transaction (the next version number, the per-user schedule quota, the claim of
  a tick, the feed's sequence order) holds unchanged across processes and nodes. Reads take no
  lock. Each writer holds it for one short transaction, as SQLite's writers hold its lock.
- Errors: a lost or refused connection, a server shutting down, a lock or statement timeout
  become StoreUnavailableError (503), a full disk StorageFullError (507). The next call
  connects again; a transaction cut short is rolled back by the server, never half applied.
- Text: PostgreSQL's text cannot hold NUL characters. Invocation records (a val's log) have
  them replaced by U+FFFD; anywhere else such text is refused (InvalidError, 400).

`PostgresReader` is the change feed's side (runtime/feed.py): its own connection, LISTENing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg import pq

from runtime.dblock import InUseError
from runtime.errors import InvalidError, StorageFullError, StoreUnavailableError

logger = logging.getLogger(__name__)

#: pg_advisory_xact_lock's key for the store's writers (any constant, fixed for good:
#: "valrun" in ASCII).
WRITE_LOCK = 0x76616C72756E
#: Held shared by every serving valrun (on its feed connection), exclusively by the commands
#: that must not run under one (rotate-key): runtime/dblock.py's file lock, for PostgreSQL.
SERVE_LOCK = WRITE_LOCK + 1
#: The change feed's NOTIFY channel.
CHANNEL = "valrun_changes"
CONNECT_TIMEOUT_S = 10


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str) -> bool:
    return location.startswith(POSTGRES_SCHEMES)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


_IS_PARAM = re.compile(r"\bIS \?")


def translate(sql: str) -> str:
    return _IS_PARAM.sub("IS NOT DISTINCT FROM ?", sql.replace("%", "%%")).replace("?", "%s")


def unavailable(exc: psycopg.Error, where: str) -> Exception:
    """A psycopg error as the store error a client should see; others stay (a bug: 500)."""
    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageFullError(
            f"the disk of valrun's store (PostgreSQL {where}) is full ({exc}): nothing was "
            "saved; reads and invocations still work"
        )
    if isinstance(exc, psycopg.OperationalError):
        return StoreUnavailableError(
            f"valrun's store (PostgreSQL {where}) cannot be used right now ({exc}): nothing "
            "was saved"
        )
    if isinstance(exc, psycopg.DataError) and "NUL" in str(exc):
        return InvalidError("text with NUL characters cannot be stored", "bad_text")
    return exc


class PgCursor:
    """What Store reads of a cursor: its rows and how many rows a write touched."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class PgConnection:
    """One PostgreSQL session, used as `Store` uses an sqlite3 connection opened with
    isolation_level=None: statements autocommit; `BEGIN IMMEDIATE` opens a write
    transaction that `with connection:` commits (or rolls back on an error)."""

    def __init__(
        self, url: str, *, on_connect: Callable[[psycopg.Connection[Any]], None] | None = None
    ) -> None:
        self.url = url
        self.where = redact(url)
        self.total_changes = 0
        self._on_connect = on_connect
        self._translated: dict[str, str] = {}
        self._conn: psycopg.Connection[Any] | None = None
        self._closed = False
        self.connection()

    def connection(self) -> psycopg.Connection[Any]:
        """The session, connected again if the last one was lost (never mid-transaction:
        a transaction dies with its session, and its error has been raised already)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._closed:  # as sqlite3's closed connection: a bug, not an outage
            raise psycopg.InterfaceError("the store's connection was closed")
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="valrun",
            )
        except psycopg.Error as exc:
            raise unavailable(exc, self.where) from exc
        try:
            if self._on_connect is not None:
                self._on_connect(conn)
        except psycopg.Error as exc:
            conn.close()
            raise unavailable(exc, self.where) from exc
        self._conn = conn
        return conn

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.close()

    def execute(self, sql: str, params: Sequence[object] | None = None) -> PgCursor:
        if sql == "BEGIN IMMEDIATE":
            self.execute("BEGIN")
            return self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
        conn = self.connection()
        query = sql  # without parameters, psycopg sends the text as it is
        if params is not None:
            query = self._translated.get(sql) or self._translated.setdefault(sql, translate(sql))
        if params is not None and sql.startswith("INSERT INTO runs"):
            params = [p.replace("\0", "\ufffd") if isinstance(p, str) else p for p in params]
        try:
            cur = conn.execute(query, params)
            rows = cur.fetchall() if cur.description is not None else []
        except psycopg.Error as exc:
            error = unavailable(exc, self.where)
            if error is exc:
                raise
            raise error from exc
        if cur.description is None and cur.rowcount > 0:
            self.total_changes += cur.rowcount
        return PgCursor(rows, cur.rowcount)

    def executemany(self, sql: str, seq_of_params: Sequence[Sequence[object]]) -> None:
        for params in seq_of_params:
            self.execute(sql, params)

    def in_transaction(self) -> bool:
        conn = self._conn
        return (
            conn is not None
            and not conn.closed
            and conn.info.transaction_status != pq.TransactionStatus.IDLE
        )

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.in_transaction():
            self.execute("COMMIT" if kind is None else "ROLLBACK")


class PostgresReader:
    """The change feed's own session: LISTENs on CHANNEL and holds SERVE_LOCK shared."""

    def __init__(self, url: str) -> None:
        self._db = PgConnection(url, on_connect=self._listen)

    @staticmethod
    def _listen(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"LISTEN {CHANNEL}")
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (SERVE_LOCK,))

    def last_seq(self) -> int:
        return int(self._db.execute("SELECT coalesce(MAX(seq), 0) FROM changes").fetchone()[0])

    def read(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def wait(self, timeout_s: float) -> None:
        """Return at the first notification, or after `timeout_s` (the poll fallback)."""
        conn = self._db.connection()
        try:
            for _ in conn.notifies(timeout=timeout_s, stop_after=1):
                pass
        except psycopg.Error as exc:
            raise unavailable(exc, self._db.where) from exc

    def close(self) -> None:
        self._db.close()


@contextmanager
def hold_exclusive(url: str, what: str) -> Iterator[None]:
    """Refuse (InUseError) while any valrun serves from this database; hold the lock that
    keeps one from starting meanwhile."""
    db = PgConnection(url)
    try:
        (held,) = db.execute("SELECT pg_try_advisory_lock(?)", (SERVE_LOCK,)).fetchone()
        if not held:
            raise InUseError(f"{what}: a valrun is serving from {db.where}; stop every node first")
        yield
    finally:
        db.close()
