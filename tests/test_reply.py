"""A worker's reply is hostile input (docs/contract.md §11.4): every violation is a 502, tabled
here."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from runtime.config import LimitsConfig
from runtime.errors import WorkerError
from runtime.reply import ValResponse, check_reply
from sandbox.messages import Call, HttpRequest
from sandbox.wire import Frame

HOST = "alice-hello.web.localhost"
LIMITS = LimitsConfig()
REQUEST_ID = 7
MISSING = object()  # a head key the worker left out

MakeHead = Callable[..., dict[str, object]]


def response_head(**overrides: object) -> dict[str, object]:
    head: dict[str, object] = {
        "id": REQUEST_ID,
        "op": "response",
        "status": 200,
        "headers": [],
        "log": "",
    }
    head.update(overrides)
    return {k: v for k, v in head.items() if v is not MISSING}


def error_head(**overrides: object) -> dict[str, object]:
    head: dict[str, object] = {
        "id": REQUEST_ID,
        "op": "error",
        "type": "val_error",
        "message": "ZeroDivisionError: division by zero",
        "traceback": ['  File "<val alice/hello>", line 2, in hello'],
        "log": "",
    }
    head.update(overrides)
    return {k: v for k, v in head.items() if v is not MISSING}


def check(head: dict[str, object], body: bytes = b"", limits: LimitsConfig = LIMITS) -> ValResponse:
    outcome = check_reply(Frame(head, body), REQUEST_ID, HttpRequest, limits, HOST).outcome
    assert isinstance(outcome, ValResponse), outcome
    return outcome


def refused(
    head: dict[str, object], body: bytes = b"", limits: LimitsConfig = LIMITS
) -> WorkerError:
    """The 502 for a reply: raised when the worker broke the protocol (it is killed), or the
    outcome of a well-formed reply whose content the val got wrong (the worker serves on)."""
    try:
        reply = check_reply(Frame(head, body), REQUEST_ID, HttpRequest, limits, HOST)
    except WorkerError as exc:
        assert exc.status == 502  # noqa: PT017 (raised or returned: both are refusals)
        assert exc.type in ("protocol_error", "bad_response"), exc.type  # noqa: PT017
        return exc
    assert isinstance(reply.outcome, WorkerError), reply.outcome
    assert reply.outcome.status == 502
    assert reply.outcome.type != "protocol_error"
    return reply.outcome


def checked_headers(raw: object) -> list[tuple[bytes, bytes]]:
    return check(response_head(headers=raw)).headers


def headers_refused(raw: object, limits: LimitsConfig = LIMITS) -> WorkerError:
    return refused(response_head(headers=raw), limits=limits)


def test_well_formed_reply_becomes_a_response() -> None:
    head = response_head(status=201, headers=[["Content-Type", "text/plain"]], log="hi\n")
    reply = check_reply(Frame(head, b"body"), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert reply.outcome == ValResponse(201, [(b"content-type", b"text/plain")], b"body", "hi\n")
    assert (reply.log, reply.retire) == ("hi\n", False)


# Envelope: id, op, retire, log.


@pytest.mark.parametrize(
    "request_id",
    [
        pytest.param(REQUEST_ID + 1, id="next"),
        pytest.param(0, id="zero"),
        pytest.param(-REQUEST_ID, id="negative"),
        pytest.param(str(REQUEST_ID), id="string"),
        pytest.param(None, id="null"),
        pytest.param(MISSING, id="missing"),
        pytest.param([REQUEST_ID], id="list"),
        pytest.param(float(REQUEST_ID), id="float"),
    ],
)
@pytest.mark.parametrize("make_head", [response_head, error_head], ids=["response", "error"])
def test_reply_to_another_request_is_a_protocol_error(
    request_id: object, make_head: MakeHead
) -> None:
    assert refused(make_head(id=request_id)).type == "protocol_error"


def test_reply_id_true_is_not_request_one() -> None:
    # JSON `true` == 1 in Python; the id is schema-checked like the status (an int, not bool).
    with pytest.raises(WorkerError) as caught:
        check_reply(Frame(response_head(id=True)), 1, HttpRequest, LIMITS, HOST)
    assert (caught.value.status, caught.value.type) == (502, "protocol_error")


@pytest.mark.parametrize(
    "op", [MISSING, None, "loaded", "http", "load", "RESPONSE", "Error", 5, ["response"]]
)
def test_unexpected_op_is_a_protocol_error(op: object) -> None:
    assert refused(response_head(op=op)).type == "protocol_error"


@pytest.mark.parametrize("retire", [None, 1, 0, "true", "false", [], {}])
@pytest.mark.parametrize("make_head", [response_head, error_head], ids=["response", "error"])
def test_retire_that_is_not_a_bool_is_a_protocol_error(retire: object, make_head: MakeHead) -> None:
    assert refused(make_head(retire=retire)).type == "protocol_error"


@pytest.mark.parametrize(("retire", "expected"), [(True, True), (False, False), (MISSING, False)])
def test_retire_is_reported(retire: object, expected: bool) -> None:
    reply = check_reply(Frame(response_head(retire=retire)), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert reply.retire is expected


@pytest.mark.parametrize("log", [None, 5, b"x", ["x"], {"x": 1}, True])
@pytest.mark.parametrize("make_head", [response_head, error_head], ids=["response", "error"])
def test_log_that_is_not_a_string_is_a_protocol_error(log: object, make_head: MakeHead) -> None:
    assert refused(make_head(log=log)).type == "protocol_error"


@pytest.mark.parametrize(
    "log", [pytest.param(MISSING, id="missing"), "", "one line\n", "é" * 100, "x" * 1000]
)
def test_log_within_the_limit_is_kept_verbatim(log: object) -> None:
    limits = LimitsConfig(max_log_bytes=1000)
    reply = check_reply(Frame(response_head(log=log)), REQUEST_ID, HttpRequest, limits, HOST)
    assert reply.log == ("" if log is MISSING else log)


@pytest.mark.parametrize(
    "log",
    [
        pytest.param("x" * 5000, id="ascii"),
        pytest.param("é" * 5000, id="two-byte"),
        pytest.param("€" * 5000, id="three-byte"),
        pytest.param("x" * 999 + "€" * 100, id="cut-inside-a-character"),
        pytest.param("x" * (1024 * 1024), id="megabyte"),
    ],
)
@pytest.mark.parametrize("make_head", [response_head, error_head], ids=["response", "error"])
def test_log_over_the_limit_is_truncated_and_marked(log: str, make_head: MakeHead) -> None:
    limits = LimitsConfig(max_log_bytes=1000)
    reply = check_reply(Frame(make_head(log=log)), REQUEST_ID, HttpRequest, limits, HOST)
    kept, _, marker = reply.log.rpartition("\n")
    assert "truncated" in marker
    assert log.startswith(kept)
    assert 900 < len(kept.encode()) <= 1000
    assert len(reply.log.encode()) < 1200


def test_response_outcome_carries_the_bounded_log() -> None:
    limits = LimitsConfig(max_log_bytes=1000)
    outcome = check(response_head(log="x" * 5000), limits=limits)
    assert outcome.log.startswith("x" * 1000)
    assert len(outcome.log) < 1200


# Status and body.


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param("200", id="string"),
        pytest.param(True, id="bool"),
        pytest.param(200.0, id="float"),
        pytest.param(199, id="199"),
        pytest.param(100, id="100-continue"),
        pytest.param(101, id="101-switching"),
        pytest.param(600, id="600"),
        pytest.param(0, id="zero"),
        pytest.param(-200, id="negative"),
        pytest.param(2**64, id="huge"),
        pytest.param([200], id="list"),
    ],
)
def test_status_outside_200_to_599_is_a_bad_response(status: object) -> None:
    assert refused(response_head(status=status)).type == "bad_response"


@pytest.mark.parametrize("status", [200, 204, 301, 308, 404, 418, 500, 599])
def test_status_from_200_to_599_is_kept(status: int) -> None:
    assert check(response_head(status=status)).status == status


@pytest.mark.parametrize(
    ("max_bytes", "body"),
    [
        pytest.param(10, b"x" * 11, id="one-over"),
        pytest.param(10, b"x" * 10_000, id="far-over"),
        pytest.param(LIMITS.max_response_body_bytes, b"x" * (5 * 1024 * 1024 + 1), id="default"),
    ],
)
def test_body_over_the_limit_is_response_too_large(max_bytes: int, body: bytes) -> None:
    limits = LimitsConfig(max_response_body_bytes=max_bytes)
    error = refused(response_head(), body, limits)
    assert error.type == "response_too_large"


@pytest.mark.parametrize("body", [b"", b"x" * 10, bytes(range(10))])
def test_body_within_the_limit_is_kept_as_bytes(body: bytes) -> None:
    limits = LimitsConfig(max_response_body_bytes=10)
    assert check(response_head(), body, limits).body == body


# Headers.


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param({"content-type": "text/plain"}, id="object"),
        pytest.param("content-type: text/plain", id="string"),
        pytest.param(5, id="number"),
    ],
)
def test_headers_that_are_not_a_list_are_a_protocol_error(headers: object) -> None:
    assert refused(response_head(headers=headers)).type == "protocol_error"


@pytest.mark.parametrize(
    "pair",
    [
        pytest.param([], id="empty"),
        pytest.param(["x-a"], id="one-string"),
        pytest.param(["x-a", "1", "2"], id="three-strings"),
        pytest.param(["x-a", 1], id="int-value"),
        pytest.param([1, "x"], id="int-name"),
        pytest.param(["x-a", None], id="null-value"),
        pytest.param(["x-a", ["1"]], id="list-value"),
        pytest.param([["x-a"], "1"], id="list-name"),
        pytest.param("x-a: 1", id="string"),
        pytest.param({"x-a": "1"}, id="object"),
        pytest.param(None, id="null"),
    ],
)
def test_header_that_is_not_a_pair_of_strings_is_a_protocol_error(pair: object) -> None:
    assert headers_refused([["x-ok", "1"], pair]).type == "protocol_error"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("", id="empty"),
        pytest.param("x a", id="space"),
        pytest.param(" x-a", id="leading-space"),
        pytest.param("x-a ", id="trailing-space"),
        pytest.param("x:a", id="colon"),
        pytest.param("x-a:", id="trailing-colon"),
        pytest.param("x\ta", id="tab"),
        pytest.param("x\ra", id="cr"),
        pytest.param("x\na", id="lf"),
        pytest.param("x\x00a", id="nul"),
        pytest.param("x\x7fa", id="del"),
        pytest.param("(x)", id="parens"),
        pytest.param("x/a", id="slash"),
        pytest.param('x"a', id="quote"),
        pytest.param("x@a", id="at"),
        pytest.param("x,a", id="comma"),
        pytest.param("x;a", id="semicolon"),
        pytest.param("x=a", id="equals"),
        pytest.param("x{a}", id="braces"),
        pytest.param("é", id="latin-1"),
        pytest.param("x-\u00e9", id="non-ascii"),
        pytest.param("x-\u20ac", id="euro"),
        pytest.param("x-\ud800", id="lone-surrogate"),
    ],
)
def test_invalid_header_name_is_a_bad_response(name: str) -> None:
    assert headers_refused([[name, "1"]]).type == "bad_response"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("a\rb", id="cr"),
        pytest.param("a\nb", id="lf"),
        pytest.param("a\r\nb", id="crlf"),
        pytest.param("1\r\nSet-Cookie: evil=1", id="response-splitting"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("\r", id="only-cr"),
        pytest.param("\n", id="only-lf"),
        pytest.param("\x00", id="only-nul"),
        pytest.param("a\r", id="trailing-cr"),
        pytest.param("\na", id="leading-lf"),
        pytest.param(" \r ", id="cr-in-whitespace"),
        pytest.param("a\x01b", id="soh"),
        pytest.param("a\x08b", id="backspace"),
        pytest.param("a\x0bb", id="vertical-tab"),
        pytest.param("a\x0cb", id="form-feed"),
        pytest.param("a\x1bb", id="escape"),
        pytest.param("a\x1fb", id="unit-separator"),
        pytest.param("a\x7fb", id="del"),
        pytest.param("\u20ac", id="not-latin-1"),
        pytest.param("a\ud800", id="lone-surrogate"),
    ],
)
def test_header_value_with_control_characters_is_a_bad_response(value: str) -> None:
    assert headers_refused([["x-a", value]]).type == "bad_response"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("", b"", id="empty"),
        pytest.param("plain", b"plain", id="plain"),
        pytest.param("caf\u00e9", b"caf\xe9", id="obs-text"),
        pytest.param("\x80\xff", b"\x80\xff", id="obs-text-edges"),
        pytest.param("a b", b"a b", id="inner-space"),
        pytest.param("a\tb", b"a\tb", id="inner-tab"),
        pytest.param("  padded \t", b"padded", id="surrounding-whitespace-stripped"),
        pytest.param("\t \t", b"", id="only-whitespace"),
        pytest.param('!"#~', b'!"#~', id="visible-ascii"),
    ],
)
def test_header_value_is_kept_as_latin_1(value: str, expected: bytes) -> None:
    assert checked_headers([["x-a", value]]) == [(b"x-a", expected)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("X-Thing", b"x-thing"),
        ("CONTENT-TYPE", b"content-type"),
        ("x!#$%&'*+-.^_`|~09", b"x!#$%&'*+-.^_`|~09"),
    ],
)
def test_header_name_that_is_a_token_is_kept_lower_cased(name: str, expected: bytes) -> None:
    assert checked_headers([[name, "1"]]) == [(expected, b"1")]


def test_repeated_headers_are_kept_in_order() -> None:
    raw = [["X-A", "1"], ["x-b", "2"], ["x-a", "3"]]
    expected = [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]
    assert checked_headers(raw) == expected


@pytest.mark.parametrize(("count", "ok"), [(0, True), (100, True), (101, False), (1000, False)])
def test_at_most_100_headers(count: int, ok: bool) -> None:
    raw = [[f"x-{i}", "1"] for i in range(count)]
    if ok:
        assert len(checked_headers(raw)) == count
    else:
        assert headers_refused(raw).type == "bad_response"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param([["x-a", "v" * 64 * 1024]], id="one-huge-value"),
        pytest.param([["x-" + "n" * 64 * 1024, "1"]], id="one-huge-name"),
        pytest.param([[f"x-{i}", "v" * 7000] for i in range(10)], id="many-large"),
        # Dropped headers still cost the worker their bytes.
        pytest.param([["content-length", "1" * 64 * 1024]], id="huge-dropped-header"),
    ],
)
def test_headers_over_64_kib_are_a_bad_response(raw: list[list[str]]) -> None:
    assert headers_refused(raw).type == "bad_response"


def test_headers_under_64_kib_are_kept() -> None:
    raw = [[f"x-{i}", "v" * 6000] for i in range(10)]
    assert len(checked_headers(raw)) == 10


@pytest.mark.parametrize(
    "name",
    [
        "content-length",
        "Content-Length",
        "transfer-encoding",
        "TRANSFER-ENCODING",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
    ],
)
def test_framing_headers_are_dropped(name: str) -> None:
    raw = [["x-before", "1"], [name, "5"], ["x-after", "2"]]
    assert checked_headers(raw) == [(b"x-before", b"1"), (b"x-after", b"2")]


def test_reply_headers_go_through_the_header_check() -> None:
    head = response_head(headers=[["Content-Length", "999"], ["X-A", " 1 "]])
    assert check(head).headers == [(b"x-a", b"1")]
    assert refused(response_head(headers=[["x-a", "1\r\nx-b: 2"]])).type == "bad_response"


# Set-Cookie (docs/contract.md §11.4): a cookie for a wider domain would reach every other
# user's vals.


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param("a=b", id="no-domain"),
        pytest.param("a=b; Path=/; HttpOnly; Secure; SameSite=Lax", id="no-domain-attributes"),
        pytest.param("a=b; Domain=alice-hello.web.localhost", id="own-host"),
        pytest.param("a=b; Domain=.alice-hello.web.localhost", id="own-host-leading-dot"),
        pytest.param("a=b; domain=ALICE-HELLO.WEB.LOCALHOST", id="own-host-upper"),
        pytest.param("a=b;Domain=alice-hello.web.localhost;Path=/", id="own-host-no-spaces"),
        pytest.param("Domain=web.localhost", id="cookie-named-domain"),
    ],
)
def test_set_cookie_for_the_vals_own_host_is_kept(cookie: str) -> None:
    kept = checked_headers([["Set-Cookie", cookie]])
    assert kept == [(b"set-cookie", cookie.encode())]


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param("a=b; Domain=web.localhost", id="web-domain"),
        pytest.param("a=b; Domain=.web.localhost", id="web-domain-leading-dot"),
        pytest.param("a=b; Domain=localhost", id="localhost"),
        pytest.param("a=b; Domain=.localhost", id="dot-localhost"),
        pytest.param("a=b; Domain=bob-hello.web.localhost", id="other-users-val"),
        pytest.param("a=b; Domain=alice-other.web.localhost", id="own-users-other-val"),
        pytest.param("a=b; Domain=api.localhost", id="api-host"),
        pytest.param("a=b; DOMAIN=WEB.LOCALHOST", id="upper"),
        pytest.param("a=b;Domain=web.localhost", id="no-space"),
        pytest.param("a=b; Domain = web.localhost ; Path=/", id="spaces-around"),
        pytest.param("a=b; Path=/; Domain=web.localhost", id="domain-not-first"),
        # RFC 6265 §5.3 step 4: the browser uses the LAST Domain attribute.
        pytest.param(
            "a=b; Domain=alice-hello.web.localhost; Domain=web.localhost", id="last-domain-wins"
        ),
        pytest.param(
            "a=b; Domain=alice-hello.web.localhost; domain=.localhost", id="last-domain-wins-2"
        ),
    ],
)
def test_set_cookie_for_a_wider_or_other_domain_is_dropped(cookie: str) -> None:
    raw = [["x-a", "1"], ["Set-Cookie", cookie], ["x-b", "2"]]
    assert checked_headers(raw) == [(b"x-a", b"1"), (b"x-b", b"2")]


def test_only_the_wide_cookie_of_several_is_dropped() -> None:
    raw = [
        ["set-cookie", "own=1; Domain=alice-hello.web.localhost"],
        ["set-cookie", "wide=1; Domain=web.localhost"],
        ["set-cookie", "plain=1"],
    ]
    assert checked_headers(raw) == [
        (b"set-cookie", b"own=1; Domain=alice-hello.web.localhost"),
        (b"set-cookie", b"plain=1"),
    ]


# Error replies: the val failed; the worker says how.


@pytest.mark.parametrize(
    ("head", "expected_type"),
    [
        pytest.param(error_head(), "val_error", id="val-error"),
        pytest.param(
            error_head(type="memory_limit", message="out of memory", traceback=MISSING),
            "memory_limit",
            id="memory-limit",
        ),
        pytest.param(
            error_head(type="response_too_large", message="too big", traceback=MISSING),
            "response_too_large",
            id="response-too-large",
        ),
    ],
)
def test_error_reply_becomes_the_vals_failure(head: dict[str, object], expected_type: str) -> None:
    reply = check_reply(Frame(head), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert isinstance(reply.outcome, WorkerError)
    assert (reply.outcome.status, reply.outcome.type) == (502, expected_type)
    assert reply.outcome.message == head["message"]


def test_val_error_carries_its_traceback() -> None:
    frames = ['  File "<val alice/hello>", line 1, in <module>', "  line 2"]
    reply = check_reply(Frame(error_head(traceback=frames)), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert isinstance(reply.outcome, WorkerError)
    assert reply.outcome.details["traceback"] == frames
    assert reply.outcome.body()["error"] == {
        "type": "val_error",
        "message": "ZeroDivisionError: division by zero",
        "traceback": frames,
    }


def test_error_reply_keeps_log_and_retire() -> None:
    head = error_head(log="printed\n", retire=True)
    reply = check_reply(Frame(head), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert (reply.log, reply.retire) == ("printed\n", True)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"type": "worker_crashed"}, id="type-not-a-val-failure"),
        pytest.param({"type": "internal_error"}, id="type-unknown"),
        pytest.param({"type": "VAL_ERROR"}, id="type-upper"),
        pytest.param({"type": ""}, id="type-empty"),
        pytest.param({"type": None}, id="type-null"),
        pytest.param({"type": MISSING}, id="type-missing"),
        pytest.param({"type": ["val_error"]}, id="type-list"),
        pytest.param({"type": {"val_error": 1}}, id="type-object"),
        pytest.param({"message": MISSING}, id="message-missing"),
        pytest.param({"message": None}, id="message-null"),
        pytest.param({"message": 5}, id="message-number"),
        pytest.param({"message": ["x"]}, id="message-list"),
        pytest.param({"traceback": "line 1"}, id="traceback-string"),
        pytest.param({"traceback": None}, id="traceback-null"),
        pytest.param({"traceback": [1, 2]}, id="traceback-of-ints"),
        pytest.param({"traceback": ["ok", None]}, id="traceback-with-null"),
        pytest.param({"traceback": {"line": 1}}, id="traceback-object"),
    ],
)
def test_malformed_error_reply_is_a_protocol_error(overrides: dict[str, object]) -> None:
    assert refused(error_head(**overrides)).type == "protocol_error"


def test_huge_error_message_and_traceback_are_bounded() -> None:
    head = error_head(message="m" * 1_000_000, traceback=["f" * 10_000] * 10_000)
    reply = check_reply(Frame(head), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert isinstance(reply.outcome, WorkerError)
    assert len(reply.outcome.message) < 10_000
    frames = reply.outcome.details["traceback"]
    assert isinstance(frames, list)
    assert len(frames) < 1000
    assert all(len(f) < 1000 for f in frames)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"message": "bad \ud800 text"}, id="message"),
        pytest.param({"traceback": ["line \udfff"]}, id="traceback"),
    ],
)
def test_error_text_with_lone_surrogates_can_be_sent_as_utf8(
    overrides: dict[str, object],
) -> None:
    # JSON allows "\ud800" escapes; the front end answers with UTF-8 JSON (HTTPResponse.json).
    reply = check_reply(Frame(error_head(**overrides)), REQUEST_ID, HttpRequest, LIMITS, HOST)
    assert isinstance(reply.outcome, WorkerError)
    error = reply.outcome.body()["error"]
    assert isinstance(error, dict)
    for text in (error["message"], *error.get("traceback", [])):
        assert isinstance(text, str)
        text.encode("utf-8")


@pytest.mark.parametrize(
    ("request_op", "reply_op"),
    [(HttpRequest, "result"), (Call, "response"), (HttpRequest, "loaded"), (Call, "loaded")],
)
def test_reply_of_the_wrong_kind_is_a_protocol_error(
    request_op: type[HttpRequest] | type[Call], reply_op: str
) -> None:
    head = {**response_head(), "op": reply_op}
    with pytest.raises(WorkerError) as caught:
        check_reply(Frame(head, b"[1]"), REQUEST_ID, request_op, LIMITS, HOST)
    assert (caught.value.status, caught.value.type) == (502, "protocol_error")
