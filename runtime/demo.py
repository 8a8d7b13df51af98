"""`valrun serve --demo`: a demo user and a few vals, so a newcomer sees something at once."""

from __future__ import annotations

import os
from pathlib import Path

from runtime.errors import ExistsError
from runtime.store import Store

DEMO_USER = "demo"

DEMO_VALS = {
    "hello": """\
def hello(req):
    name = req.query.get("name", "world")
    return Response.json({"greeting": "hi " + name})
""",
    "page": """\
import html

def page(req):
    who = html.escape(req.query.get("who", "stranger"))
    return "<!doctype html><title>valrun</title><h1>Hello, " + who + "!</h1>"
""",
    "counter": """\
# The count lives in the owner's SQL database, not in the worker: every warm worker of
# every version sees the same one, and it survives restarts. (The SQL reads the same on
# SQLite and PostgreSQL: `visits.n`, not `n`, which PostgreSQL finds ambiguous here.)
from std import sqlite

def counter(req):
    visits = sqlite.batch([
        "CREATE TABLE IF NOT EXISTS visits "
        "(id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL)",
        "INSERT INTO visits (id, n) VALUES (1, 1) "
        "ON CONFLICT (id) DO UPDATE SET n = visits.n + 1 RETURNING n",
    ])[1].rows[0][0]
    print("visit", visits)
    return {"visits": visits}
""",
    "guestbook": """\
# A guestbook: POST name and message (a form), GET the newest entries (?format=json for JSON).
import html
from std import sqlite

def guestbook(req):
    sqlite.execute(
        "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "message TEXT NOT NULL, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    if req.method == "POST":
        form = req.form()
        name = (form.get("name") or "").strip()[:80] or "anonymous"
        message = (form.get("message") or "").strip()[:1000]
        if not message:
            return Response("a message is needed", 400)
        # The next id spelled out: the same SQL on SQLite and PostgreSQL (one call is one
        # transaction, and one user's calls run one at a time).
        sqlite.execute(
            "INSERT INTO entries (id, name, message) "
            "VALUES ((SELECT coalesce(max(id), 0) + 1 FROM entries), ?, ?)",
            (name, message),
        )
        return Response.redirect("/", 303)
    rows = sqlite.execute(
        "SELECT name, message, at FROM entries ORDER BY id DESC LIMIT 50"
    ).rows
    if req.query.get("format") == "json":
        return [{"name": n, "message": m, "at": at} for n, m, at in rows]
    items = "".join(
        "<li><b>" + html.escape(n) + "</b> (" + at + "): " + html.escape(m) + "</li>"
        for n, m, at in rows
    )
    return (
        "<!doctype html><title>guestbook</title><h1>Guestbook</h1>"
        "<form method=post><input name=name placeholder=name> "
        "<input name=message placeholder=message required> <button>sign</button></form>"
        "<ul>" + items + "</ul>"
    )
""",
    "add": """\
# A JSON function for the Run API: GET /v1/run/demo.add?args=[1,2] answers 3.
def add(a, b):
    return a + b
""",
    "echo": """\
def echo(req):
    return Response.json({
        "method": req.method,
        "url": req.url,
        "path": req.path,
        "query": dict(req.query.items()),
        "headers": dict(req.headers.items()),
        "body": req.text(),
    })
""",
}


def demo_token_path(store: Store) -> Path:
    return Path(store.path + ".demo-token")


def seed_demo(store: Store) -> str:
    """Create the demo user if needed and save the demo vals that are missing; its token.

    The store keeps only tokens' hashes, so a token cannot be shown again from it. The demo
    token is therefore kept in a file beside the database, private (0600) like the database
    itself: whoever can read it could read and write the database anyway, and it names only
    the demo user. Each start reuses it while it is still valid (not revoked); otherwise a
    new one is made and the file replaced. Other users' tokens are never written anywhere.
    """
    path = demo_token_path(store)
    try:
        token = store.create_user(DEMO_USER)
    except ExistsError:
        token = _saved_token(store, path) or store.create_token(DEMO_USER)
    _save_token(path, token)
    for name, code in DEMO_VALS.items():
        if store.get_val(DEMO_USER, name, None) is None:
            store.put_val(DEMO_USER, name, code, "public")
    return token


def _saved_token(store: Store, path: Path) -> str | None:
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    user = store.user_for_token(token) if token else None
    return token if user is not None and user.name == DEMO_USER else None


def _save_token(path: Path, token: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(token + "\n")
    os.replace(partial, path)
