"""`valrun serve --demo`: a demo user and a few vals, so a newcomer sees something at once."""

from __future__ import annotations

from runtime.errors import ConflictError
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
# Module state lives as long as the warm worker that loaded this version.
count = 0

def counter(req):
    global count
    count += 1
    print("visit", count)
    return {"visits": count}
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


def seed_demo(store: Store) -> str:
    """Create the demo user if needed and save the demo vals that are missing; a new token."""
    try:
        token = store.create_user(DEMO_USER)
    except ConflictError:
        token = store.create_token(DEMO_USER)
    for name, code in DEMO_VALS.items():
        if store.get_val(DEMO_USER, name, None) is None:
            store.put_val(DEMO_USER, name, code, "public")
    return token
