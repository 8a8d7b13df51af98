"""The wire messages (sandbox/messages.py): each kind survives its own frame, and refuses every
frame that is not a valid message of that kind. Pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sandbox.limits import WorkerLimits
from sandbox.messages import (
    Call,
    Failure,
    HttpRequest,
    HttpResponse,
    Load,
    Loaded,
    MessageError,
    Result,
    ValueRefusedError,
    parse,
)
from sandbox.wire import Frame, FrameDecoder, encode_frame

ROOT = Path(__file__).resolve().parent.parent

MESSAGES = [
    Load("hello", "def hello(req):\n    return 'hi'\n"),
    Load("e", "1 + 1", "eval", (("KEY", "value"), ("OTHER", "é")), WorkerLimits(memory_mb=64)),
    HttpRequest(7, "POST", "http://a-b.web.localhost/x?y=1", "/x", "y=1", (("a", "1"),), b"\0"),
    Call(3, [1, "two", {"three": [3.0]}]),
    Call(4, []),
    Call(5, None),
    Loaded("printed while loading\n"),
    HttpResponse(7, 201, (("content-type", "text/plain"), ("x", "")), b"body", "log", True),
    Result(3, b'{"ok":true}', "", False),
    Failure(3, "val_error", "ValueError: no", ("line 2, in f",), "log", False),
    Failure(None, "memory_limit", "the val ran out of memory"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_survives_its_frame_on_the_wire(message: object) -> None:
    frame = message.to_frame()  # type: ignore[attr-defined]
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame))
    received = decoder.next_frame()
    assert received is not None
    assert type(message).from_frame(received) == message  # type: ignore[attr-defined]


RESPONSE = {"op": "response", "id": 1, "status": 200, "headers": [], "log": ""}


@pytest.mark.parametrize(
    ("kind", "head", "body"),
    [
        pytest.param(Load, {"op": "load"}, b"", id="load-without-name"),
        pytest.param(Load, {"op": "load", "name": 1}, b"", id="load-name-not-str"),
        pytest.param(Load, {"op": "load", "name": "f", "mode": "pickle"}, b"", id="load-mode"),
        pytest.param(Load, {"op": "load", "name": "f", "env": {"K": 1}}, b"", id="load-env-int"),
        pytest.param(Load, {"op": "load", "name": "f", "env": ["K"]}, b"", id="load-env-list"),
        pytest.param(
            Load, {"op": "load", "name": "f", "limits": {"memory_mb": -1}}, b"", id="load-limit"
        ),
        pytest.param(
            Load, {"op": "load", "name": "f", "limits": {"memory_mb": True}}, b"", id="limit-bool"
        ),
        pytest.param(HttpRequest, {"op": "http", "id": 1}, b"", id="http-missing-fields"),
        pytest.param(
            HttpRequest,
            {"op": "http", "id": 1, "method": "GET", "url": "/", "path": "/", "query": ""},
            b"",
            id="http-without-headers",
        ),
        pytest.param(
            HttpRequest,
            {
                "op": "http",
                "id": 1,
                "method": "GET",
                "url": "/",
                "path": "/",
                "query": "",
                "headers": [["a", 1]],
            },
            b"",
            id="http-header-value-int",
        ),
        pytest.param(Call, {"op": "call"}, b"[]", id="call-without-id"),
        pytest.param(Call, {"op": "call", "id": True}, b"[]", id="call-id-bool"),
        pytest.param(Call, {"op": "call", "id": 1.0}, b"[]", id="call-id-float"),
        pytest.param(Call, {"op": "call", "id": 1}, b"{}", id="call-args-object"),
        pytest.param(Call, {"op": "call", "id": 1}, b"[1", id="call-args-broken"),
        pytest.param(Call, {"op": "call", "id": 1}, b"\xff", id="call-args-not-utf8"),
        pytest.param(Loaded, {"op": "loaded", "log": 5}, b"", id="loaded-log-int"),
        pytest.param(HttpResponse, {**RESPONSE, "id": "1"}, b"", id="response-id-str"),
        pytest.param(HttpResponse, {**RESPONSE, "headers": {}}, b"", id="response-headers-dict"),
        pytest.param(HttpResponse, {**RESPONSE, "retire": 1}, b"", id="response-retire-int"),
        pytest.param(HttpResponse, {**RESPONSE, "log": None}, b"", id="response-log-none"),
        pytest.param(Result, {"op": "result"}, b"1", id="result-without-id"),
        pytest.param(
            Failure, {"op": "error", "type": "all_good", "message": ""}, b"", id="failure-type"
        ),
        pytest.param(Failure, {"op": "error", "type": "val_error"}, b"", id="failure-no-message"),
        pytest.param(
            Failure,
            {"op": "error", "type": "val_error", "message": "", "traceback": [1]},
            b"",
            id="failure-traceback-ints",
        ),
        pytest.param(Loaded, {"op": "response"}, b"", id="wrong-op"),
    ],
)
def test_malformed_frame_is_not_a_message(
    kind: type[Load], head: dict[str, object], body: bytes
) -> None:
    with pytest.raises(MessageError):
        kind.from_frame(Frame(head, body))


@pytest.mark.parametrize("status", [100, 199, 600, 0, -1, "200", None, [200], 2.0, True])
def test_status_outside_200_to_599_is_refused_as_the_vals_doing(status: object) -> None:
    with pytest.raises(ValueRefusedError):
        HttpResponse.from_frame(Frame({**RESPONSE, "status": status}))


def test_parse_reads_the_kind_the_frame_names_and_refuses_the_rest() -> None:
    frame = Result(1, b"2").to_frame()
    assert parse(frame, HttpResponse, Result, Failure) == Result(1, b"2")
    with pytest.raises(MessageError, match="'result' message where 'response' or 'error'"):
        parse(frame, HttpResponse, Failure)


def test_load_limits_are_the_worker_fields_only_even_from_the_front_ends_config() -> None:
    from runtime.config import LimitsConfig

    load = Load("f", "f = 1", limits=LimitsConfig(wall_time_s=3.0, memory_mb=99))
    sent = load.to_frame().head["limits"]
    assert isinstance(sent, dict)
    assert sent["memory_mb"] == 99
    assert "wall_time_s" not in sent
    assert Load.from_frame(load.to_frame()).limits == WorkerLimits(memory_mb=99)


# Both trust zones build and read frames only through the message classes: no module on the
# request path writes a head by hand.
HAND_BUILT_HEADS_FORBIDDEN_IN = [
    "runtime/app.py",
    "runtime/invoke.py",
    "runtime/run_api.py",
    "runtime/pool.py",
    "runtime/reply.py",
    "sandbox/worker.py",
]


@pytest.mark.parametrize("path", HAND_BUILT_HEADS_FORBIDDEN_IN)
def test_request_path_builds_no_head_by_hand(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
            assert "op" not in keys, f"{path}:{node.lineno} builds a frame head by hand"
