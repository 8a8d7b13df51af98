"""What a user's SQL may do in their own database: SQLite's authorizer callback, as policy data.

SQLite asks the authorizer about every action a statement would take, when the statement is
prepared (sqlite.org/c3ref/set_authorizer.html). `SqlGuard.authorize` answers from the tables
below; a refusal makes the statement fail to prepare, so nothing of it runs. The reason is kept
on the guard, because SQLite's own message is only "not authorized".

Refused, and why:
- ATTACH and DETACH: a database is one user's file; ATTACH would open any other file by path
  (another user's database included). `VACUUM` and `VACUUM INTO` ask for ATTACH too (SQLite
  attaches the copy it writes), so they are refused with it; inside the call's transaction
  VACUUM fails before it asks, so `first_keyword` names it first.
- Transactions (BEGIN, COMMIT, ROLLBACK, SAVEPOINT): each call is one transaction of the front
  end's making; a val must not leave one open between calls. Only the front end's own
  statements, made while the guard is `trusted`, may do this.
- Pragmas, except reading the few in `READ_PRAGMAS` (the schema, sizes): the others change the
  connection (max_page_count, the quota; journal_mode, durability; trusted_schema) or reach
  outside the database (temp_store_directory).
- Temporary tables, views, triggers and indexes: they live outside the database file, where
  its size limit (the quota) does not reach.
- The functions in `REFUSED_FUNCTIONS`: loading a shared library, FTS3's tokenizer pointer.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

#: Pragmas a statement may read, with no value: `PRAGMA page_count`, `pragma_page_count()`.
READ_PRAGMAS = frozenset(
    {
        "data_version",
        "freelist_count",
        "page_count",
        "page_size",
        "schema_version",
        "user_version",
        "integrity_check",
        "quick_check",
        "foreign_key_check",
        "collation_list",
        "function_list",
        "pragma_list",
        "table_list",
    }
)
#: Pragmas a statement may read about one table or index, named as their argument.
READ_PRAGMAS_OF = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
    }
)
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})

ATTACH_REFUSAL = "ATTACH, DETACH and VACUUM are not available: the database is yours alone"
_TRANSACTION = (
    "transaction statements are not available: each execute is one transaction, and "
    "sqlite.batch runs its statements in one transaction"
)
_TEMP = "temporary tables, views, triggers and indexes are not available; create real ones"
_REFUSALS: dict[int, str] = {
    sqlite3.SQLITE_ATTACH: ATTACH_REFUSAL,
    sqlite3.SQLITE_DETACH: ATTACH_REFUSAL,
    sqlite3.SQLITE_TRANSACTION: _TRANSACTION,
    sqlite3.SQLITE_SAVEPOINT: _TRANSACTION,
    sqlite3.SQLITE_CREATE_TEMP_INDEX: _TEMP,
    sqlite3.SQLITE_CREATE_TEMP_TABLE: _TEMP,
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER: _TEMP,
    sqlite3.SQLITE_CREATE_TEMP_VIEW: _TEMP,
}


def first_keyword(sql: str) -> str:
    """The statement's first word, upper-cased, after any comments (pure)."""
    rest = sql
    while True:
        rest = rest.lstrip()
        if rest.startswith("--"):
            rest = rest.partition("\n")[2]
        elif rest.startswith("/*"):
            rest = rest.partition("*/")[2]
        else:
            break
    word = re.match(r"[A-Za-z_]+", rest)
    return word[0].upper() if word else ""


def refusal(action: int, arg1: str | None, arg2: str | None) -> str | None:
    """Why a user's statement may not take this action; None when it may (pure)."""
    if action in _REFUSALS:
        return _REFUSALS[action]
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if (arg2 is None and name in READ_PRAGMAS) or name in READ_PRAGMAS_OF:
            return None
        allowed = ", ".join(sorted(READ_PRAGMAS | READ_PRAGMAS_OF))
        return f"PRAGMA {name} is not available; pragmas you may read: {allowed}"
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in REFUSED_FUNCTIONS:
        return f"the function {arg2}() is not available"
    return None


@dataclass(slots=True)
class SqlGuard:
    """The authorizer of one connection. `trusted` while the front end runs its own
    statements (BEGIN, COMMIT, pragmas); `refused` holds the reason of the last refusal."""

    trusted: bool = False
    refused: str | None = None

    def authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None
    ) -> int:
        if self.trusted:
            return sqlite3.SQLITE_OK
        reason = refusal(action, arg1, arg2)
        if reason is None:
            return sqlite3.SQLITE_OK
        self.refused = reason
        return sqlite3.SQLITE_DENY
