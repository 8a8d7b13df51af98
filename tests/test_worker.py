"""The worker (sandbox/worker.py) as a real subprocess speaking the wire protocol on stdin/stdout.

Each test writes every frame up front and closes stdin; the worker serves them in order and
exits at end of input, so `subprocess.run` is enough and no test waits on a pipe.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sandbox.wire import Frame
from tests.helpers import TIMEOUT_S, WORKER, load_frame, run_worker


def http_frame(
    request_id: int,
    path: str = "/",
    query: str = "",
    *,
    method: str = "GET",
    headers: list[list[str]] | None = None,
    body: bytes = b"",
) -> Frame:
    url = f"http://alice-f.web.localhost{path}" + (f"?{query}" if query else "")
    head: dict[str, object] = {
        "op": "http",
        "id": request_id,
        "method": method,
        "url": url,
        "path": path,
        "query": query,
        "headers": headers or [],
    }
    return Frame(head, body)


def header(frame: Frame, name: str) -> list[str]:
    pairs = frame.head["headers"]
    assert isinstance(pairs, list)
    return [value for key, value in pairs if key.lower() == name]


COUNTER_VAL = """
    import json
    state = {"count": 0}
    print("loading")

    def f(req):
        state["count"] = state["count"] + 1
        print("request", state["count"], req.method, req.path)
        if req.query.get("fail"):
            raise ValueError("asked to fail")
        return {
            "count": state["count"],
            "path": req.path,
            "name": req.query.get("name", "world"),
            "agent": req.headers.get("user-agent"),
            "body": req.text(),
            "secret": env.get("SECRET"),
        }
"""


def test_val_loads_and_answers_requests_in_order_keeping_module_state() -> None:
    run = run_worker(
        load_frame(COUNTER_VAL, env={"SECRET": "s"}),
        http_frame(1, "/a", "name=bob", headers=[["User-Agent", "pytest"]]),
        http_frame(2, "/b", method="POST", body=b"hello"),
        http_frame(3, "/c"),
    )
    assert run.returncode == 0, run.stderr
    assert [f.op for f in run.frames] == ["loaded", "response", "response", "response"]
    responses = run.frames[1:]
    assert [f.head["id"] for f in responses] == [1, 2, 3]
    assert [f.head["status"] for f in responses] == [200, 200, 200]
    assert header(responses[0], "content-type") == ["application/json"]
    bodies = [json.loads(f.body) for f in responses]
    assert [b["count"] for b in bodies] == [1, 2, 3]
    assert [b["path"] for b in bodies] == ["/a", "/b", "/c"]
    assert bodies[0]["name"] == "bob"
    assert bodies[0]["agent"] == "pytest"
    assert bodies[1]["body"] == "hello"
    assert bodies[2]["secret"] == "s"


def test_print_output_comes_back_in_the_log_of_its_own_invocation() -> None:
    run = run_worker(load_frame(COUNTER_VAL), http_frame(1, "/x"), http_frame(2, "/y"))
    assert [f.head["log"] for f in run.frames] == [
        "loading\n",
        "request 1 GET /x\n",
        "request 2 GET /y\n",
    ]


def test_log_over_the_limit_is_truncated_and_marked() -> None:
    run = run_worker(
        load_frame("def f(req):\n    print('x' * 5000)\n    return ''\n", max_log_bytes=1000),
        http_frame(1),
    )
    log = run.frames[1].head["log"]
    assert isinstance(log, str)
    assert log.startswith("x" * 1000)
    assert "truncated" in log
    assert len(log) < 1100


def test_val_exception_is_an_error_frame_and_the_worker_keeps_serving() -> None:
    run = run_worker(
        load_frame(COUNTER_VAL),
        http_frame(1, "/", "fail=1"),
        http_frame(2, "/ok"),
    )
    assert run.returncode == 0, run.stderr
    _loaded, error, response = run.frames
    assert error.op == "error"
    assert error.head["id"] == 1
    assert error.head["type"] == "val_error"
    assert str(error.head["message"]).startswith("ValueError: asked to fail")
    assert error.head["traceback"] == ["line 10, in f"]
    assert error.head["log"] == "request 1 GET /\n"
    assert response.op == "response"
    assert response.head["id"] == 2
    assert response.head["log"] == "request 2 GET /ok\n"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("def f(:\n    pass\n", "line 1", id="syntax_error"),
        pytest.param("def g(req):\n    return ''\n", "'f'", id="missing_export"),
        pytest.param("import os\ndef f(req):\n    return ''\n", "os", id="refused_import"),
        pytest.param("raise ValueError('at load')\n", "at load", id="raises_at_load"),
        pytest.param("x = (1).__class__\n", "__class__", id="underscore_attribute"),
    ],
)
def test_load_failure_is_one_error_frame_without_an_id_then_exit(
    source: str, expected: str
) -> None:
    run = run_worker(load_frame(source), http_frame(1), http_frame(2))
    assert len(run.frames) == 1
    (error,) = run.frames
    assert error.op == "error"
    assert "id" not in error.head
    assert error.head["type"] == "val_error"
    assert expected.lower() in str(error.head["message"]).lower()


def test_print_before_a_load_failure_comes_back_in_the_error_log() -> None:
    run = run_worker(load_frame("print('before')\nraise RuntimeError('x')\n"))
    (error,) = run.frames
    assert error.head["log"] == "before\n"


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(
            [load_frame("def f(req):\n    return ''\n"), Frame({"op": "bogus", "id": 1})],
            id="unknown_op_after_load",
        ),
        pytest.param(
            [load_frame("def f(req):\n    return ''\n"), http_frame(1), Frame({"id": 2})],
            id="missing_op_after_a_request",
        ),
        pytest.param([http_frame(1)], id="first_frame_not_load"),
        pytest.param([Frame({"op": "bogus"})], id="unknown_first_op"),
        pytest.param([Frame({"op": "load", "name": "f", "env": {"K": 1}})], id="env_not_strings"),
        pytest.param([Frame({"op": "load", "name": "f", "mode": "x"})], id="unknown_mode"),
    ],
)
def test_unknown_op_makes_the_worker_exit_non_zero(frames: list[Frame]) -> None:
    run = run_worker(*frames)
    assert run.returncode != 0
    assert "valrun worker:" in run.stderr  # it says why
    assert all(f.op in ("loaded", "response") for f in run.frames)


def test_a_generic_worker_closed_before_any_val_exits_cleanly() -> None:
    # A spare worker at shutdown: its input ends before a load frame. Not an error.
    run = run_worker()
    assert (run.returncode, run.frames) == (0, [])


def test_bytes_that_are_not_a_frame_make_the_worker_exit_non_zero() -> None:
    proc = subprocess.run(
        WORKER, input=b"GET / HTTP/1.1\r\n\r\n", capture_output=True, timeout=TIMEOUT_S
    )
    assert proc.returncode != 0
    assert proc.stdout == b""


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("f = 3\n", id="int"),
        pytest.param("f = 'hello'\n", id="str"),
        pytest.param("f = {'a': 1}\n", id="dict"),
    ],
)
def test_non_callable_export_is_a_val_error(source: str) -> None:
    run = run_worker(load_frame(source), http_frame(1), http_frame(2))
    assert [f.op for f in run.frames] == ["loaded", "error", "error"]
    error = run.frames[1]
    assert error.head["id"] == 1
    assert error.head["type"] == "val_error"
    assert "'f'" in str(error.head["message"])


@pytest.mark.parametrize(
    ("returned", "type_name"),
    [
        pytest.param("42", "int", id="int"),
        pytest.param("None", "NoneType", id="none"),
        pytest.param("{1, 2}", "set", id="set"),
        pytest.param("(x for x in [1])", "generator", id="generator"),
    ],
)
def test_unsupported_return_value_is_a_val_error_naming_its_type(
    returned: str, type_name: str
) -> None:
    run = run_worker(load_frame(f"def f(req):\n    return {returned}\n"), http_frame(1))
    error = run.frames[1]
    assert error.head["type"] == "val_error"
    assert type_name in str(error.head["message"])


@pytest.mark.parametrize(
    ("returned", "status", "content_type", "body"),
    [
        pytest.param("'<p>hi</p>'", 200, "text/html; charset=utf-8", b"<p>hi</p>", id="str"),
        pytest.param("b'\\x00'", 200, "application/octet-stream", b"\x00", id="bytes"),
        pytest.param("[1]", 200, "application/json", b"[1]", id="list"),
        pytest.param(
            "Response('gone', 410)", 410, "text/plain; charset=utf-8", b"gone", id="response"
        ),
    ],
)
def test_return_values_become_responses(
    returned: str, status: int, content_type: str, body: bytes
) -> None:
    run = run_worker(load_frame(f"def f(req):\n    return {returned}\n"), http_frame(1))
    response = run.frames[1]
    assert response.op == "response"
    assert response.head["status"] == status
    assert header(response, "content-type") == [content_type]
    assert response.body == body


def test_repeated_response_headers_survive_the_wire() -> None:
    source = """
        def f(req):
            return Response("x", headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    """
    run = run_worker(load_frame(source), http_frame(1))
    assert header(run.frames[1], "set-cookie") == ["a=1", "b=2"]


@pytest.mark.parametrize(
    ("size", "op"),
    [
        pytest.param(100, "response", id="at_the_limit"),
        pytest.param(101, "error", id="one_byte_over"),
        pytest.param(100_000, "error", id="far_over"),
    ],
)
def test_response_body_over_the_limit_is_response_too_large(size: int, op: str) -> None:
    source = f"def f(req):\n    print('made it')\n    return b'x' * {size}\n"
    run = run_worker(load_frame(source, max_response_body_bytes=100), http_frame(1), http_frame(2))
    assert [f.op for f in run.frames] == ["loaded", op, op]
    reply = run.frames[1]
    assert reply.head["id"] == 1
    assert reply.head["log"] == "made it\n"
    if op == "error":
        assert reply.head["type"] == "response_too_large"
        assert reply.body == b""
    else:
        assert reply.body == b"x" * size


def test_str_body_over_the_limit_counts_utf8_bytes() -> None:
    source = "def f(req):\n    return 'é' * 60\n"  # 60 characters, 120 bytes
    run = run_worker(load_frame(source, max_response_body_bytes=100), http_frame(1))
    assert run.frames[1].head["type"] == "response_too_large"


def test_a_val_cannot_write_to_the_protocol_stream() -> None:
    source = """
        def f(req):
            print("\\x00\\x00\\x00\\x05 not a frame")
            return "ok"
    """
    run = run_worker(load_frame(source), http_frame(1))
    assert [f.op for f in run.frames] == ["loaded", "response"]


SANDBOX_IMPORT_CHECK = """
import importlib.util, pkgutil, sys
spec = importlib.util.find_spec("sandbox")  # finds the package without importing it
before = set(sys.modules)
import sandbox.worker
for info in pkgutil.iter_modules(spec.submodule_search_locations, "sandbox."):
    __import__(info.name)
roots = {name.partition(".")[0] for name in sys.modules}
new_roots = {name.partition(".")[0] for name in set(sys.modules) - before}
allowed = set(sys.stdlib_module_names) | {"sandbox", "RestrictedPython"}
print("forbidden:", sorted(roots & {"runtime", "trio", "hypercorn"}))
# sysconfig's build data (imported by zoneinfo for its TZPATH) is stdlib under a per-platform
# name that sys.stdlib_module_names does not list.
stdlib = lambda root: root in allowed or root.startswith("_sysconfigdata_")
print("third-party:", sorted(r for r in new_roots if not stdlib(r)))
"""


def isolated_python(code: str) -> str:
    """What `code` prints, run by a fresh `python -I` (no site, no environment)."""
    return subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=True,
    ).stdout


def test_sandbox_imports_nothing_from_runtime_trio_or_hypercorn() -> None:
    out = isolated_python(SANDBOX_IMPORT_CHECK)
    assert "forbidden: []" in out.splitlines(), out
    # docs/architecture.md §1: sandbox uses only the standard library and RestrictedPython.
    assert "third-party: []" in out.splitlines(), out


FORK_SERVER_PRELOAD = """
import sys
import sandbox.forkserver
sandbox.forkserver._warm_up()  # what main() runs before it forks
print("threading:", "threading" in sys.modules, "subprocess:", "subprocess" in sys.modules)
"""


def test_the_preloaded_fork_server_has_no_threading_module() -> None:
    # threading registers an after-fork hook: it would run Python in every forked worker
    # before its first line and copy ~0.4 MiB of the fork server's pages into each of them
    # (docs/design.md §7.3). subprocess imports threading.
    out = isolated_python(FORK_SERVER_PRELOAD)
    assert out.split() == ["threading:", "False", "subprocess:", "False"], out
