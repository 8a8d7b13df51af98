"""The Run (docs/contract.md §4.2) and Eval (§4.3) APIs: input parsing and result checks as
tables, the worker's `call` op and eval mode as a subprocess, and both APIs through the real
server."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from runtime.config import Config
from runtime.errors import HTTPError, WorkerError
from runtime.http import HTTPRequest
from runtime.invoke import Invoker
from runtime.pool import Pool, ValSpec
from runtime.records import Recorder, loggable_path
from runtime.reply import Reply, ValResponse, ValResult, check_reply, check_result_body
from runtime.run_api import eval_input, run_args
from runtime.store import AsyncStore, Store
from sandbox.errors import ValError
from sandbox.evaluate import compile_eval, evaluate
from sandbox.messages import Call, Invocation
from sandbox.policy import LogBuffer
from sandbox.wire import Frame
from sandbox.worker import result_json
from tests.helpers import (
    COUNTER,
    TEST_LIMITS,
    Service,
    StartService,
    assert_json_error,
    configured_service,
    counter_code,
    load_frame,
    run_worker,
    valrun,
)


def request(
    method: str, query: str = "", body: bytes = b"", path: str = "/v1/run/alice.f"
) -> HTTPRequest:
    return HTTPRequest(method, "http", "api.localhost", path, path, query, [], body)


# Run's args (pure)


@pytest.mark.parametrize(
    ("method", "query", "body", "args"),
    [
        pytest.param("GET", "", b"", [], id="get-none"),
        pytest.param("GET", "args=%5B1%2C%22two%22%5D", b"", [1, "two"], id="get-encoded"),
        pytest.param("GET", "args=[1,2]&v=3", b"", [1, 2], id="get-with-pin"),
        pytest.param("GET", "args=", b"", [], id="get-empty"),
        pytest.param("HEAD", "args=[true]", b"", [True], id="head"),
        pytest.param("POST", "", b"", [], id="post-empty-body"),
        pytest.param("POST", "", b"  \n", [], id="post-blank-body"),
        pytest.param("POST", "", b"[1, null]", [1, None], id="post-bare-array"),
        pytest.param("POST", "", b'{"args": [{"a": 1}]}', [{"a": 1}], id="post-object"),
        pytest.param("POST", "", b"{}", [], id="post-object-without-args"),
        pytest.param("POST", "v=2", b"[]", [], id="post-with-pin"),
    ],
)
def test_run_args_come_from_the_query_or_the_body(
    method: str, query: str, body: bytes, args: list[object]
) -> None:
    assert run_args(request(method, query, body)) == args


@pytest.mark.parametrize(
    ("method", "query", "body", "error_type", "says"),
    [
        pytest.param("GET", "args=5", b"", "bad_args", "not a JSON number", id="number"),
        pytest.param("GET", "args=%22x%22", b"", "bad_args", "JSON string", id="string"),
        pytest.param("GET", "args=%7B%7D", b"", "bad_args", "JSON object", id="object"),
        pytest.param("GET", "args=null", b"", "bad_args", "JSON null", id="null"),
        pytest.param("GET", "args=[1", b"", "bad_json", "not valid JSON", id="broken"),
        pytest.param("GET", "args=[NaN]", b"", "bad_json", "NaN", id="nan"),
        pytest.param("POST", "", b"[1", "bad_json", "not valid JSON", id="post-broken"),
        pytest.param("POST", "", b"\xff", "bad_json", "not valid JSON", id="post-not-utf8"),
        pytest.param("POST", "", b'"x"', "bad_args", "JSON string", id="post-string"),
        pytest.param("POST", "", b'{"args": 1}', "bad_args", "JSON number", id="post-args-1"),
        pytest.param("POST", "", b'{"arg": [1]}', "bad_request", "arg", id="post-typo"),
        pytest.param("POST", "args=[1]", b"", "bad_args", "in the body", id="post-query"),
    ],
)
def test_run_args_that_are_not_a_json_array_are_400(
    method: str, query: str, body: bytes, error_type: str, says: str
) -> None:
    with pytest.raises(HTTPError) as caught:
        run_args(request(method, query, body))
    assert (caught.value.status, caught.value.type) == (400, error_type)
    assert says in caught.value.message


# Eval's input (pure)


@pytest.mark.parametrize(
    ("method", "path_code", "query", "body", "expected"),
    [
        pytest.param("GET", "1+1", "", b"", ("1+1", None), id="get"),
        pytest.param("GET", "f", "args=[2]", b"", ("f", [2]), id="get-args"),
        pytest.param("POST", None, "", b'{"code": "x"}', ("x", None), id="post"),
        pytest.param("POST", None, "", b'{"code": "f", "args": []}', ("f", []), id="post-args"),
    ],
)
def test_eval_input_is_code_and_maybe_args(
    method: str,
    path_code: str | None,
    query: str,
    body: bytes,
    expected: tuple[str, list[object] | None],
) -> None:
    assert eval_input(request(method, query, body, "/v1/eval"), path_code) == expected


@pytest.mark.parametrize(
    ("method", "path_code", "body", "error_type"),
    [
        pytest.param("GET", "", b"", "bad_request", id="get-empty"),
        pytest.param("GET", " \n", b"", "bad_request", id="get-blank"),
        pytest.param("POST", None, b"", "bad_json", id="post-empty"),
        pytest.param("POST", None, b'"1+1"', "bad_request", id="post-string"),
        pytest.param("POST", None, b'{"code": 1}', "bad_request", id="post-code-not-str"),
        pytest.param("POST", None, b'{"code": "x", "args": 1}', "bad_args", id="args-1"),
        pytest.param("POST", None, b'{"code": "x", "env": {}}', "bad_request", id="unknown"),
    ],
)
def test_bad_eval_input_is_400(
    method: str, path_code: str | None, body: bytes, error_type: str
) -> None:
    with pytest.raises(HTTPError) as caught:
        eval_input(request(method, "", body, "/v1/eval"), path_code)
    assert (caught.value.status, caught.value.type) == (400, error_type)


# A worker's result is hostile input (pure)


@pytest.mark.parametrize(
    "body", [b"1", b"null", b'"\\ud800"', b'{"a":[1,2.5,true]}', '"é"'.encode()]
)
def test_result_that_is_json_is_forwarded_as_sent(body: bytes) -> None:
    assert check_result_body(body, TEST_LIMITS) == body


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="broken"),
        pytest.param(b"NaN", id="nan"),
        pytest.param(b"[-Infinity]", id="infinity"),
        pytest.param(b"1 2", id="two-values"),
        pytest.param(b'"\xff"', id="not-utf8"),
        pytest.param('"x"'.encode("utf-16"), id="utf16"),
    ],
)
def test_result_that_is_not_json_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(WorkerError) as caught:
        check_result_body(body, TEST_LIMITS)
    assert (caught.value.status, caught.value.type) == (502, "protocol_error")


def test_valid_result_nested_too_deeply_is_the_vals_error() -> None:
    # Valid JSON that a val can build: its fault, not a lying worker's.
    with pytest.raises(WorkerError) as caught:
        check_result_body(b"[" * 100_000 + b"]" * 100_000, TEST_LIMITS)
    assert (caught.value.status, caught.value.type) == (502, "val_error")
    assert "nested too deeply" in caught.value.message


def test_result_over_the_response_limit_is_response_too_large() -> None:
    limits = replace(TEST_LIMITS, max_response_body_bytes=10)
    assert check_result_body(b'"12345678"', limits) == b'"12345678"'
    with pytest.raises(WorkerError) as caught:
        check_result_body(b'"123456789"', limits)
    assert caught.value.type == "response_too_large"


def test_result_reply_is_checked_like_a_response() -> None:
    head: dict[str, object] = {"op": "result", "id": 3, "log": "hi\n", "retire": True}
    reply = check_reply(Frame(head, b"[1]"), 3, Call, TEST_LIMITS, "")
    assert reply.outcome == ValResult(b"[1]", "hi\n")
    assert (reply.log, reply.retire) == ("hi\n", True)
    for bad in ({"id": 4}, {"retire": "yes"}, {"log": 5}):
        with pytest.raises(WorkerError) as caught:
            check_reply(Frame({**head, **bad}, b"[1]"), 3, Call, TEST_LIMITS, "")
        assert caught.value.type == "protocol_error"


# Results become JSON inside the worker (sandbox.worker.result_json)


@pytest.mark.parametrize(
    ("value", "body"),
    [
        (None, b"null"),
        ({"a": [1, 2.5, True]}, b'{"a":[1,2.5,true]}'),
        ("é", '"é"'.encode()),
        ("\ud800", b'"\\ud800"'),  # a lone surrogate: the JSON escape, not invalid UTF-8
        ("\\\ud800", b'"\\\\\\ud800"'),  # a backslash before it stays a backslash
        ((1, 2), b"[1,2]"),
    ],
)
def test_result_json_is_compact_utf8(value: object, body: bytes) -> None:
    assert result_json(value) == body
    assert json.loads(body) == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({1, 2}, "set"),
        (len, "builtin_function_or_method"),
        (b"x", "bytes"),
        ([1, {"a": frozenset()}], "frozenset"),
        (float("nan"), "float"),
        ({(1, 2): 3}, "tuple"),
    ],
)
def test_result_that_is_not_json_is_a_val_error_naming_the_type(value: object, named: str) -> None:
    with pytest.raises(ValError) as caught:
        result_json(value)
    assert "not JSON" in str(caught.value)
    assert named in str(caught.value)


# Eval mode (sandbox.evaluate), in process


@pytest.mark.parametrize(
    ("code", "value", "log"),
    [
        ("1 + 1", 2, ""),
        ("x = 2\ny = 3\nx * y", 6, ""),
        ("x = 2; x * 5", 10, ""),
        ("x = 1", None, ""),
        ("print('a')\nprint('b')", None, "a\nb\n"),
        ("print('only')", None, "only\n"),
        ("import json\njson.dumps({'a': env['K']})", '{"a": "v"}', ""),
        ("def f():\n    return 7\n(f()\n +\n 1)", 8, ""),
        ("# a comment\n\n[i * i for i in range(4)]\n# trailing", [0, 1, 4, 9], ""),
    ],
)
def test_eval_runs_statements_then_the_final_expression(code: str, value: object, log: str) -> None:
    buffer = LogBuffer(1000)
    assert evaluate(compile_eval(code), {"K": "v"}, buffer) == value
    assert buffer.take() == log


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("x._secret", "_secret"),
        ("__import__('os')", "__import__"),
        ("exec('1')", "Exec calls are not allowed"),
        ("1 +", "SyntaxError"),
    ],
)
def test_eval_code_is_restricted_like_a_val(code: str, says: str) -> None:
    with pytest.raises((SyntaxError, ValError)) as caught:
        compile_eval(code)
    assert says in f"{type(caught.value).__name__}: {caught.value}"


def test_eval_runs_afresh_each_time_in_its_own_namespace() -> None:
    compiled = compile_eval("items = []\nitems.append(1)\nitems")
    assert evaluate(compiled, {}, LogBuffer(100)) == [1]
    assert evaluate(compiled, {}, LogBuffer(100)) == [1]


# The worker's `call` op, as a real subprocess


def call_frame(request_id: int, args: list[object] | None = None) -> Frame:
    return Frame(
        {"op": "call", "id": request_id}, b"" if args is None else json.dumps(args).encode()
    )


def eval_load(code: str) -> Frame:
    return Frame({"op": "load", "name": "ignored", "mode": "eval", "env": {}}, code.encode())


def test_call_calls_a_callable_export_and_keeps_module_state() -> None:
    run = run_worker(
        load_frame("n = []\ndef f(a, b=10):\n    n.append(a)\n    print(len(n))\n    return a + b"),
        call_frame(1, [1]),
        call_frame(2, [1, 2]),
        call_frame(3, []),
    )
    assert [f.op for f in run.frames] == ["loaded", "result", "result", "error"]
    assert [f.body for f in run.frames[1:3]] == [b"11", b"3"]
    assert [f.head["log"] for f in run.frames[1:3]] == ["1\n", "2\n"]
    assert "missing 1 required positional argument" in str(run.frames[3].head["message"])


def test_call_returns_a_non_callable_export_as_it_is() -> None:
    run = run_worker(load_frame("f = {'answer': 42}"), call_frame(1, [1, 2]))
    assert (run.frames[1].op, run.frames[1].body) == ("result", b'{"answer":42}')


def test_eval_worker_returns_the_value_or_calls_it_with_args() -> None:
    code = "k = 3\nprint('evaluated')\nlambda a: a * k"
    uncalled = run_worker(eval_load(code), call_frame(1))
    called = run_worker(eval_load(code), call_frame(1, [2]))
    assert (called.frames[1].op, called.frames[1].body) == ("result", b"6")
    assert called.frames[1].head["log"] == "evaluated\n"
    error = uncalled.frames[1].head
    assert error["type"] == "val_error"
    assert "function" in str(error["message"])
    assert "args" in str(error["message"])
    assert error["log"] == "evaluated\n"  # printed before the failure: still in the log


def test_eval_code_that_does_not_compile_fails_the_load() -> None:
    run = run_worker(eval_load("1 +"), call_frame(1))
    assert [f.op for f in run.frames] == ["error"]
    assert run.frames[0].head["message"] == "SyntaxError: invalid syntax (line 1)"


def test_result_over_the_limit_is_refused_in_the_worker() -> None:
    run = run_worker(
        load_frame("def f():\n    return 'x' * 2000", max_response_body_bytes=1000),
        call_frame(1, []),
    )
    assert run.frames[1].head["type"] == "response_too_large"


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(Frame({"op": "call", "id": 1}, b"{}"), id="args-object"),
        pytest.param(Frame({"op": "call", "id": 1}, b"[1"), id="args-broken"),
        pytest.param(Frame({"op": "wat", "id": 1}), id="unknown-op"),
    ],
)
def test_malformed_call_ends_the_worker(frame: Frame) -> None:
    run = run_worker(load_frame("def f():\n    return 1"), frame)
    assert [f.op for f in run.frames] == ["loaded"]
    assert run.returncode == 2


def test_unknown_mode_ends_the_worker() -> None:
    load = Frame({"op": "load", "name": "f", "mode": "pickle", "env": {}}, b"f = 1")
    run = run_worker(load, call_frame(1, []))
    assert (run.frames, run.returncode) == ([], 2)


# Run, through the real server

ADD = "def add(a, b=1):\n    return a + b\n"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "result"),
    [
        pytest.param("GET", "/v1/run/alice.add?args=[1,2]", {}, 3, id="get"),
        pytest.param("GET", "/v1/run/alice.add?args=%5B41%5D", {}, 42, id="get-encoded"),
        pytest.param("POST", "/v1/run/alice.add", {"json": {"args": [5]}}, 6, id="post-object"),
        pytest.param("POST", "/v1/run/alice.add", {"json": [2, 2]}, 4, id="post-array"),
        pytest.param("POST", "/v1/run/alice.ADD", {"json": ["a", "b"]}, "ab", id="any-case"),
    ],
)
async def test_run_calls_the_export_with_the_args(
    service: Service, method: str, path: str, kwargs: dict[str, Any], result: object
) -> None:
    await service.put_val("add", ADD)
    with trio.fail_after(15):
        response = await service.api(method, path, user=None, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == result


async def test_run_returns_a_non_callable_export(service: Service) -> None:
    await service.put_val("config", "config = {'colors': ['red'], 'n': 2 ** 70}\n")
    with trio.fail_after(15):
        response = await service.api("GET", "/v1/run/alice.config", user=None)
    assert response.json() == {"colors": ["red"], "n": 2**70}


async def test_run_and_web_share_the_warm_worker_of_a_version(service: Service) -> None:
    await service.put_val("counter", counter_code(1))
    with trio.fail_after(15):
        await service.web("alice", "counter")
        ran = await service.api("POST", "/v1/run/alice.counter", json=[None])
    assert ran.json() == {"count": 2, "version": 1}


async def test_run_pins_a_version_with_v(service: Service) -> None:
    for version in (1, 2):
        await service.put_val("counter", counter_code(version))
    with trio.fail_after(20):
        latest = await service.api("POST", "/v1/run/alice.counter?args=", json=[None])
        pinned = await service.api("POST", "/v1/run/alice.counter?v=1", json=[None])
        web_pinned = await service.web("alice", "counter", "/?v=1")
        web_own_v = await service.web("alice", "counter", "/?v=latest")
        missing = await service.api("GET", "/v1/run/alice.counter?v=3&args=[0]")
    assert latest.json()["version"] == 2
    assert pinned.json()["version"] == 1
    assert web_pinned.json()["version"] == 1
    assert web_own_v.json()["version"] == 2  # a `v` that is no number is the val's own
    assert_json_error(missing, 404, "not_found")


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "error_type"),
    [
        ("/v1/run/alice.add?args=5", {}, 400, "bad_args"),
        ("/v1/run/alice.add?args=[1", {}, 400, "bad_json"),
        ("/v1/run/alice.nosuch", {}, 404, "not_found"),
        ("/v1/run/nobody.add", {}, 404, "not_found"),
        ("/v1/run/alice", {}, 400, "bad_name"),
        ("/v1/run/alice.add?v=0", {}, 400, "bad_version"),
        ("/v1/run/alice.add", {"headers": {"authorization": "Bearer nope"}}, 401, "unauthorized"),
    ],
)
async def test_bad_run_requests_get_json_errors_with_cors(
    service: Service, path: str, kwargs: dict[str, Any], status: int, error_type: str
) -> None:
    await service.put_val("add", ADD)
    response = await service.api("GET", path, user=None, **kwargs)
    assert_json_error(response, status, error_type)
    assert response.headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    ("code", "named"),
    [
        pytest.param("def v():\n    return {1, 2}", "set", id="set"),
        pytest.param("def v():\n    return v", "function", id="function"),
        pytest.param("def v():\n    return Response('hi')", "Response", id="response"),
        pytest.param("def v():\n    return float('nan')", "float", id="nan"),
        pytest.param("def v():\n    return [b'raw']", "bytes", id="nested-bytes"),
    ],
)
async def test_run_result_that_is_not_json_is_502_naming_the_type(
    service: Service, code: str, named: str
) -> None:
    await service.put_val("v", code)
    with trio.fail_after(15):
        response = await service.api("GET", "/v1/run/alice.v")
    error = assert_json_error(response, 502, "val_error")
    assert named in error["message"]
    assert "not JSON" in error["message"]
    assert response.headers["access-control-allow-origin"] == "*"


async def test_run_result_over_the_response_limit_is_502(start_service: StartService) -> None:
    service = await start_service(max_response_body_bytes=1000)
    await service.put_val("big", "def big(n):\n    return 'x' * n")
    with trio.fail_after(15):
        small = await service.api("GET", "/v1/run/alice.big?args=[10]")
        big = await service.api("GET", "/v1/run/alice.big?args=[1000]")
    assert small.json() == "x" * 10
    assert_json_error(big, 502, "response_too_large")


async def test_run_preflight_is_answered_with_cors(service: Service) -> None:
    response = await service.api(
        "OPTIONS",
        "/v1/run/alice.add",
        user=None,
        headers={
            "origin": "http://page.localhost",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    management = await service.api("GET", "/v1/me")
    assert "access-control-allow-origin" not in management.headers


# Eval, through the real server


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "result"),
    [
        pytest.param("GET", "/v1/eval/1%2B1", {}, 2, id="get"),
        pytest.param("GET", "/v1/eval/x%20%3D%209%0Ax%2F2", {}, 4.5, id="get-slash-newline"),
        pytest.param("GET", "/v1/eval/lambda%20a%3A%20-a?args=[3]", {}, -3, id="get-args"),
        pytest.param(
            "POST",
            "/v1/eval",
            {"json": {"code": "k = 2\nlambda a: a * k", "args": [4]}},
            8,
            id="post-args",
        ),
        pytest.param("POST", "/v1/eval", {"json": {"code": "x = 1"}}, None, id="statement-only"),
        pytest.param(
            "POST", "/v1/eval", {"json": {"code": "(lambda: 'called')()"}}, "called", id="no-args"
        ),
    ],
)
async def test_eval_answers_the_json_of_the_value(
    service: Service, method: str, path: str, kwargs: dict[str, Any], result: object
) -> None:
    with trio.fail_after(15):
        response = await service.api(method, path, **kwargs)
    assert response.status_code == 200, response.text
    assert response.json() == result
    assert response.headers["access-control-allow-origin"] == "*"


async def test_eval_of_a_callable_without_args_says_to_send_args(service: Service) -> None:
    with trio.fail_after(15):
        response = await service.api("POST", "/v1/eval", json={"code": "lambda: 1"})
    error = assert_json_error(response, 502, "val_error")
    assert "function" in error["message"]
    assert "args" in error["message"]


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("GET", {}), ("POST", {"json": {"code": "1"}}), ("GET", {"headers": {"authorization": "x"}})],
)
async def test_eval_needs_a_token_by_default(
    service: Service, method: str, kwargs: dict[str, Any]
) -> None:
    path = "/v1/eval/1" if method == "GET" else "/v1/eval"
    response = await service.api(method, path, user=None, **kwargs)
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["access-control-allow-origin"] == "*"


async def test_anonymous_eval_when_configured_runs_with_no_env(tmp_path: Path) -> None:
    async with configured_service(tmp_path, server={"anonymous_eval": True}) as service:
        await service.api("PUT", "/v1/env/K", content=b"alice-value")
        with trio.fail_after(15):
            anonymous = await service.api("GET", "/v1/eval/dict(env)", user=None)
            bad_token = await service.api(
                "GET", "/v1/eval/1", user=None, headers={"authorization": "Bearer nope"}
            )
    assert anonymous.json() == {}
    assert_json_error(bad_token, 401, "unauthorized")  # a token that is sent must be valid


async def test_eval_runs_as_the_tokens_user_with_their_env(service: Service) -> None:
    await service.api("PUT", "/v1/env/WHO", user="alice", content=b"alice-secret")
    await service.api("PUT", "/v1/env/WHO", user="bob", content=b"bob-secret")
    with trio.fail_after(15):
        as_alice = await service.api("GET", "/v1/eval/env%5B'WHO'%5D", user="alice")
        as_bob = await service.api("GET", "/v1/eval/env%5B'WHO'%5D", user="bob")
    assert (as_alice.json(), as_bob.json()) == ("alice-secret", "bob-secret")


async def test_eval_never_runs_in_a_vals_warm_worker(service: Service) -> None:
    await service.put_val("counter", COUNTER.replace("VERSION", "1"))
    with trio.fail_after(15):
        await service.web("alice", "counter")
        before = (await service.api("GET", "/healthz")).json()["workers"]["idle"]
        response = await service.api("GET", "/v1/eval/count")
        after = (await service.api("GET", "/healthz")).json()["workers"]["idle"]
    error = assert_json_error(response, 502, "val_error")
    assert "NameError" in error["message"]  # the val's module state is not there
    assert before == after == 1


async def test_eval_code_over_the_source_limit_is_413(service: Service) -> None:
    code = "1" + " " * service.config.limits.max_source_bytes
    response = await service.api("POST", "/v1/eval", json={"code": code})
    assert_json_error(response, 413, "request_too_large")


# The CLI


async def test_cli_run_and_eval(service: Service) -> None:
    await service.put_val("add", ADD)
    token = ("--token", service.tokens["alice"])
    ran = await valrun(service, "run", *token, "alice.add", "1", "2")
    assert (ran.returncode, json.loads(ran.stdout)) == (0, 3), ran.stderr
    strings = await valrun(service, "run", *token, "alice.add", "a", '"1"')
    assert json.loads(strings.stdout) == "a1"  # not JSON: a string; "1" quoted: a string
    evaluated = await valrun(service, "eval", *token, "x = 20\nx + 1")
    assert json.loads(evaluated.stdout) == 21
    called = await valrun(service, "eval", *token, "lambda a, b: [b, a]", "1", "[2]")
    assert json.loads(called.stdout) == [[2], 1]
    failed = await valrun(service, "run", *token, "alice.add")
    assert failed.returncode != 0
    assert b"502" in failed.stderr


@pytest.mark.parametrize(
    ("path", "logged"),
    [
        ("/v1/eval/'sk-live-123'[:2]", "/v1/eval/…"),
        ("/v1/eval/", "/v1/eval/…"),
        ("/v1/eval", "/v1/eval"),
        ("/v1/run/alice.hello", "/v1/run/alice.hello"),
    ],
)
def test_eval_code_stays_out_of_the_access_log(path: str, logged: str) -> None:
    assert loggable_path(path) == logged


# The Invoker, with a pool that answers what a hostile worker could


class FakePool:
    def __init__(self, outcome: ValResponse | ValResult | WorkerError) -> None:
        self.outcome = outcome
        self.retired: list[int] = []

    async def invoke(self, spec: ValSpec, request: Invocation) -> Reply:
        return Reply(self.outcome, "log of the secret-value\n", retire=False)

    def retire(self, val_id: int) -> None:
        self.retired.append(val_id)


SPEC = ValSpec(1, 1, "alice", "f", "f = 1", (("KEY", "secret-value"),), "alice-f.web.localhost")


async def runner_with(
    outcome: ValResponse | ValResult | WorkerError, tmp_path: Path
) -> tuple[Invoker, FakePool, Recorder]:
    store = Store(tmp_path / "runner.db")
    store.create_user("alice")
    store.put_val("alice", "f", "f = 1", None)  # val 1, as in SPEC
    pool = FakePool(outcome)
    recorder = Recorder(AsyncStore(store), keep_per_val=10)
    return Invoker(Config(), cast(Pool, pool), recorder), pool, recorder


async def test_a_reply_of_the_wrong_kind_is_refused_and_recorded(tmp_path: Path) -> None:
    # The pool refuses and kills such a worker itself (tests/test_reply.py); the Invoker
    # keeps its own contract even with a pool that did not.
    runner, _, recorder = await runner_with(ValResponse(200, [], b"<html>", ""), tmp_path)
    with pytest.raises(WorkerError) as caught:
        await runner.invoke(SPEC, Call(0, []), source="run", expect=ValResult)
    assert (caught.value.status, caught.value.type) == (502, "protocol_error")
    assert recorder.pending == 1


async def test_a_vals_error_and_log_lose_its_env_values(tmp_path: Path) -> None:
    failure = WorkerError("KeyError: 'secret-value'", "val_error", details={"traceback": []})
    runner, _, recorder = await runner_with(failure, tmp_path)
    with pytest.raises(WorkerError) as caught:
        await runner.invoke(SPEC, Call(0, []), source="run", expect=ValResult)
    assert caught.value.message == "KeyError: '[env KEY]'"
    assert caught.value.details == {"traceback": []}
    await recorder.flush()
    val = recorder.store.store.get_val("alice", "f", None)
    assert val is not None
    (record,) = recorder.store.store.records(val, 10)
    assert (record.log, record.error_message) == ("log of the [env KEY]\n", "KeyError: '[env KEY]'")
