"""Checks at save: `PUT /v1/vals/...` refuses code that could not load (400 `bad_code`, with
the line and what to change), compiled in a confined worker so bombs cannot hurt the front end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import trio

from runtime.config import Config, PoolConfig
from runtime.errors import OverloadedError, WorkerError
from runtime.pool import Pool
from runtime.savecheck import SaveChecks, problems_from, refusal
from runtime.store import AsyncStore
from sandbox.check import MAX_PROBLEMS, check_source
from sandbox.wire import Frame
from tests.helpers import HELLO, Service, assert_json_error, valrun

# --- The checks themselves (pure, inside the worker) -------------------------------------------


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        ("def v(req:\n    return 1\n", 1, "SyntaxError"),
        ("import json\n\ndef v(req):\n    return req._secret\n", 4, 'starts with "_"'),
        ("import requests\ndef v(req):\n    return 1\n", 1, "std.fetch"),
        ("def v(req):\n    import urllib.request\n", 2, "std.fetch"),
        ("import sqlite3\ndef v(req):\n    return 1\n", 1, "std.sqlite"),
        ("import os\nv = 1\n", 1, "no operating system access"),
        ("from subprocess import run\nv = 1\n", 1, "no operating system access"),
        ("from json import dump\nv = 1\n", 1, "valrun's json offers only: "),
        ("from json import *\nv = 1\n", 1, '"*" imports are not allowed'),
        ("from . import x\nv = 1\n", 1, "relative import"),
        ("async def v(req):\n    return 1\n", 1, "write 'def', not 'async def'"),
        ("def v(req):\n    return 1\nasync def helper():\n    pass\n", 3, "not 'async def'"),
        ("def other(req):\n    return 1\n", None, "define a top-level 'v'"),
        ("def helper():\n    v = 1\n", None, "define a top-level 'v'"),
    ],
)
def test_check_names_the_line_and_what_to_change(
    source: str, line: int | None, fragment: str
) -> None:
    problems = check_source(source, "v", 262144)
    assert problems, source
    assert problems[0].line == line
    assert fragment in problems[0].message


@pytest.mark.parametrize(
    "source",
    [
        "def v(req):\n    return 1\n",
        "class v:\n    pass\n",
        "v = {'a': 1}\n",
        "a, (b, v) = 1, (2, 3)\n",
        "from json import dumps as v\n",
        "import json as v\n",
        "try:\n    v = 1\nexcept ValueError:\n    v = 2\n",
        "if True:\n    def v(req):\n        return 1\n",
        "for v in range(3):\n    pass\n",
        "import time, datetime\nfrom urllib.parse import quote\nv = quote('a b')\n",
    ],
)
def test_loadable_code_has_no_problems(source: str) -> None:
    assert check_source(source, "v", 262144) == []


def test_an_import_in_a_try_that_catches_its_refusal_is_saved() -> None:
    guarded = "try:\n    import requests\nexcept ImportError:\n    requests = None\nv = 1\n"
    assert check_source(guarded, "v", 262144) == []
    other = guarded.replace("except ImportError", "except KeyError")
    assert check_source(other, "v", 262144)[0].line == 2


def test_check_refuses_source_over_the_size_limit() -> None:
    (problem,) = check_source("v = 1\n" + "#" * 100, "v", 50)
    assert "over the 50-byte limit" in problem.message


@pytest.mark.parametrize(
    "source",
    ["-" * 200_000 + "1", "1+" * 100_000 + "1", "(" * 100_000, "[" * 5000 + "]" * 5000],
    ids=["unary_chain", "binary_chain", "open_parens", "nested_lists"],
)
def test_nesting_bombs_are_problems_not_crashes(source: str) -> None:
    problems = check_source(source, "v", 10**6)
    assert 1 <= len(problems) <= MAX_PROBLEMS
    assert "nested" in problems[0].message


def test_many_problems_are_cut_short() -> None:
    source = "".join(f"import os{i}\n" for i in range(100)) + "v = 1\n"
    assert len(check_source(source, "v", 262144)) == MAX_PROBLEMS


# --- What the front end accepts from a check worker (hostile input) ---------------------------


@pytest.mark.parametrize(
    "head",
    [
        {"op": "loaded"},
        {"op": "checked"},
        {"op": "checked", "problems": "none"},
        {"op": "checked", "problems": [{"line": 1}]},
        {"op": "checked", "problems": [{"line": 0, "message": "x"}]},
        {"op": "checked", "problems": [{"line": True, "message": "x"}]},
        {"op": "checked", "problems": [{"line": "1", "message": "x"}]},
        {"op": "checked", "problems": [{"line": 1, "message": 5}]},
        {"op": "checked", "problems": [{"line": 1, "message": "x", "more": 1}]},
        {"op": "checked", "problems": [{"line": 1, "message": "x"}] * (MAX_PROBLEMS + 1)},
    ],
)
def test_a_malformed_check_reply_is_a_protocol_error(head: dict[str, object]) -> None:
    with pytest.raises(WorkerError) as caught:
        problems_from(Frame(head))
    assert caught.value.type == "protocol_error"


def test_check_reply_messages_are_cut_and_cleaned() -> None:
    frame = Frame({"op": "checked", "problems": [{"line": 3, "message": "a\ud800b" + "x" * 5000}]})
    (problem,) = problems_from(frame)
    assert problem["line"] == 3
    assert isinstance(problem["message"], str)
    assert len(problem["message"]) <= 1000
    assert "\ud800" not in problem["message"]  # a lone surrogate cannot be re-encoded
    error = refusal([problem])
    assert error.status == 400
    assert error.type == "bad_code"
    assert error.message.startswith("the code was not saved: line 3: a")


# --- Through the real server ------------------------------------------------------------------


async def put(service: Service, name: str, code: str) -> Any:
    return await service.api("PUT", f"/v1/vals/alice/{name}", json={"code": code})


@pytest.mark.parametrize(
    ("code", "line", "fragment"),
    [
        ("def broken(req:\n    return 1\n", 1, "SyntaxError"),
        ("import json\nimport requests\n\ndef broken(req):\n    return 1\n", 2, "std.fetch"),
        ("def other(req):\n    return 1\n", None, "define a top-level 'broken'"),
        ("async def broken(req):\n    return 1\n", 1, "not 'async def'"),
    ],
)
async def test_code_that_could_not_load_is_not_saved(
    service: Service, code: str, line: int | None, fragment: str
) -> None:
    response = await put(service, "broken", code)
    assert_json_error(response, 400, "bad_code")
    error = response.json()["error"]
    assert error["line"] == line
    assert fragment in error["message"]
    assert error["problems"][0]["line"] == line
    # Nothing was saved: not a version 1 that fails for every visitor.
    assert_json_error(await service.api("GET", "/v1/vals/alice/broken"), 404, "not_found")


async def test_cli_val_put_of_code_that_could_not_load_fails_saying_why(
    service: Service, tmp_path: Path
) -> None:
    source = tmp_path / "fetcher.py"
    source.write_text("import json\nimport requests\n\ndef fetcher(req):\n    return 1\n")
    token = ("--token", service.tokens["alice"])
    put = await valrun(service, "val", *token, "put", "alice/fetcher", str(source))
    assert put.returncode != 0
    assert b"line 2: import of 'requests' is not allowed in a val" in put.stderr
    assert b"std.fetch" in put.stderr


async def test_a_refused_save_keeps_the_previous_version_serving(service: Service) -> None:
    await service.put_val("hello", HELLO)
    refused = await put(service, "hello", "import os\ndef hello(req):\n    return 1\n")
    assert_json_error(refused, 400, "bad_code")
    response = await service.web("alice", "hello", "/?name=still")
    assert response.json() == {"greeting": "hi still"}
    versions = (await service.api("GET", "/v1/vals/alice/hello/versions")).json()["versions"]
    assert len(versions) == 1


async def test_checks_run_nothing_of_the_val(service: Service) -> None:
    # The module's top level would loop for ever; a check only compiles it.
    code = "while True:\n    pass\n\ndef spin(req):\n    return 'ok'\n"
    with trio.fail_after(20):
        saved = await put(service, "spin", code)
    assert saved.status_code == 201, saved.text


BOMBS = [
    "-" * 200_000 + "1",
    "1+" * 100_000 + "1",
    "x = [" + "[" * 90 + "1" + "]" * 90 + "] * 10\n" + "y = " + " + ".join(["x"] * 30_000),
    "x = (" + "(" * 150 + "1" + ")" * 150 + ")\n" * 1000,
]


async def test_bombs_at_save_leave_the_front_end_answering(service: Service) -> None:
    """An attack: nesting and size bombs saved at once, while the front end keeps answering."""
    await service.put_val("hello", HELLO)
    answered: list[float] = []

    async def bomb(n: int, code: str) -> None:
        user = ("alice", "bob")[n % 2]  # two checks at once per user at most
        path = f"/v1/vals/{user}/bomb{n}"
        response = await service.api("PUT", path, user=user, json={"code": code})
        error = assert_json_error(response, 400, "bad_code")
        assert "not saved" in error["message"]

    async def probe() -> None:
        for _ in range(10):
            started = trio.current_time()
            response = await service.api("GET", "/healthz", user=None)
            assert response.status_code == 200
            answered.append(trio.current_time() - started)
            await trio.sleep(0.05)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for n, code in enumerate(BOMBS):
                nursery.start_soon(bomb, n, code)
            nursery.start_soon(probe)
    # The front end never compiled anything: it answered every probe, none slowly.
    assert len(answered) == 10, answered
    assert max(answered) < 5, answered
    response = await service.web("alice", "hello", "/?name=after")
    assert response.json() == {"greeting": "hi after"}


def test_concurrent_checks_are_bounded_per_user() -> None:
    config = Config(pool=PoolConfig(max_workers=3))
    checks = SaveChecks(config, cast(Pool, None), cast(AsyncStore, None))  # slots only
    with checks._slot("alice"), checks._slot("alice"):
        with pytest.raises(OverloadedError, match="alice is saving 2 vals"), checks._slot("alice"):
            pass
        # Another user is not held up by alice, until the pool's bound is reached.
        bound = pytest.raises(OverloadedError, match="too many vals")
        with checks._slot("bob"), bound, checks._slot("carol"):
            pass
    with checks._slot("alice"), checks._slot("alice"):  # released on the way out
        pass
