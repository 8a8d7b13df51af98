"""A tenant's SQL text as PostgreSQL will read it (pure): the words it starts with, and its
`?` placeholders numbered `$1, $2, ...`.

Both walk the text with PostgreSQL's lexical rules for what is *not* code: '...' strings
('' inside), E'...' strings (backslash escapes), "..." identifiers, $tag$...$tag$ bodies,
`--` comments and nested /* /* */ */ comments. A policy check that read comments as
SQLite does (the first `*/` ends one) would see `SELECT` where PostgreSQL runs `SET`.
"""

from __future__ import annotations

import re

#: Statements a val may send. Everything else is refused before it reaches the server.
ALLOWED_FIRST = frozenset(
    {
        "SELECT", "WITH", "VALUES", "TABLE", "INSERT", "UPDATE", "DELETE", "MERGE",
        "CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "EXPLAIN", "SHOW", "ANALYZE",
        "REINDEX", "REFRESH", "LOCK", "GRANT", "REVOKE",
    }
)  # fmt: skip
#: Commands PostgreSQL has and a val may not send (`sql_refused`): they would change the
#: session, end the call's one transaction, or reach outside the database. A first word
#: that is neither allowed nor here is no command at all (`sql_error`, as the server's
#: syntax error would be). SQLite's ATTACH, DETACH and PRAGMA are here for a clear answer.
REFUSED_FIRST = frozenset(
    {
        "SET", "RESET", "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT",
        "RELEASE", "PREPARE", "EXECUTE", "DEALLOCATE", "DECLARE", "FETCH", "MOVE", "CLOSE",
        "COPY", "LISTEN", "UNLISTEN", "NOTIFY", "DO", "CALL", "DISCARD", "LOAD", "VACUUM",
        "CHECKPOINT", "CLUSTER", "SECURITY", "IMPORT", "REASSIGN", "ATTACH", "DETACH",
        "PRAGMA",
    }
)  # fmt: skip
#: `ALTER ROLE tenant SET work_mem = ...` is allowed to a role on itself in PostgreSQL, and
#: would apply at its next connection; `ALTER DATABASE/SYSTEM` are refused by privileges.
REFUSED_SECOND = {"ALTER": frozenset({"ROLE", "USER", "GROUP", "DATABASE", "SYSTEM"})}

_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")
_ESCAPE_STRING = re.compile(r"[Ee]'")


class SqlTextError(ValueError):
    """The text ends inside a string, an identifier or a comment."""


def _skip(sql: str, i: int) -> int:
    """The index after the string, identifier, dollar body or comment at `i`, or `i` when
    none starts there."""
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", i):
        depth, j = 1, i + 2
        while depth:
            if j >= len(sql):
                raise SqlTextError("a /* comment is not closed")
            if sql.startswith("/*", j):
                depth, j = depth + 1, j + 2
            elif sql.startswith("*/", j):
                depth, j = depth - 1, j + 2
            else:
                j += 1
        return j
    if _ESCAPE_STRING.match(sql, i) and (i == 0 or not _is_word_char(sql[i - 1])):
        j = i + 2
        while j < len(sql):
            if sql[j] == "\\" or sql.startswith("''", j):
                j += 2
            elif sql[j] == "'":
                return j + 1
            else:
                j += 1
        raise SqlTextError("a string is not closed")
    if sql[i] in "'\"":
        quote, j = sql[i], i + 1
        while True:
            end = sql.find(quote, j)
            if end < 0:
                raise SqlTextError("a string or quoted name is not closed")
            if sql.startswith(quote * 2, end):
                j = end + 2
                continue
            return end + 1
    if sql[i] == "$" and (i == 0 or not _is_word_char(sql[i - 1])):
        tag = _DOLLAR_TAG.match(sql, i)
        if tag:
            end = sql.find(tag[0], tag.end())
            if end < 0:
                raise SqlTextError(f"a {tag[0]} body is not closed")
            return end + len(tag[0])
    return i


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c in "_$"


def first_words(sql: str, count: int = 2) -> list[str]:
    """The statement's first `count` words, upper-cased, past comments and parentheses."""
    words: list[str] = []
    i = 0
    while i < len(sql) and len(words) < count:
        j = _skip(sql, i)
        if j != i:
            if sql[i] not in "-/":  # a string or a quoted name is a word too
                words.append(sql[i:j])
            i = j
            continue
        word = _WORD.match(sql, i)
        if word:
            words.append(word[0].upper())
            i = word.end()
        elif sql[i].isspace() or sql[i] == "(":
            i += 1
        else:
            words.append(sql[i])
            i += 1
    return words


def refusal(sql: str) -> tuple[str, str] | None:
    """Why a val may not send this statement, as (error type, message); None if it may."""
    try:
        words = first_words(sql)
    except SqlTextError as exc:
        return "sql_error", str(exc)
    first = words[0] if words else ""
    second = words[1] if len(words) > 1 else ""
    if first in REFUSED_FIRST or second in REFUSED_SECOND.get(first, ()):
        shown = f"{first} {second}" if first == "ALTER" else first
        return "sql_refused", (
            f"{shown} is not available here: every call is one transaction in your own "
            "database, and the session, its settings and your role are the service's"
        )
    if first not in ALLOWED_FIRST:
        return "sql_error", f"syntax error at or near {first or 'the end'!r}"
    return None


def number_placeholders(sql: str) -> tuple[str, int]:
    """`?` placeholders (SQLite's, outside strings, names and comments) as `$1, $2, ...`,
    and how many there were. A statement with no `?` is unchanged, so `$n` works too."""
    out: list[str] = []
    count = 0
    i = start = 0
    while i < len(sql):
        j = _skip(sql, i)
        if j != i:
            i = j
        elif sql[i] == "?":
            count += 1
            out.append(sql[start:i])
            out.append(f"${count}")
            i = start = i + 1
        else:
            i += 1
    out.append(sql[start:])
    return "".join(out), count
