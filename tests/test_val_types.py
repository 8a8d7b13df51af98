"""`Request`, `Response` and `to_response` (sandbox/http.py), as docs/contract.md §2 describes
them."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

import pytest

from sandbox.http import (
    Headers,
    Query,
    Request,
    Response,
    dumps_json,
    to_response,
)

TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"


def make_request(
    *,
    method: str = "GET",
    url: str = "http://alice-hello.web.localhost/p/q?a=1",
    path: str = "/p/q",
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Request:
    return Request(method, url, path, query, headers or [], body)


def content_types(response: Response) -> list[str]:
    return [v for k, v in response.header_pairs() if k.lower() == "content-type"]


# Request


def test_request_exposes_method_url_path_and_body() -> None:
    url = "http://alice-hello.web.localhost:8080/a%20b/c?x=1&y=2#frag"
    req = make_request(method="POST", url=url, path="/a%20b/c", query="x=1&y=2", body=b"\x00b")
    assert (req.method, req.url, req.path, req.body) == ("POST", url, "/a%20b/c", b"\x00b")


@pytest.mark.parametrize(
    ("query", "name", "first", "every"),
    [
        pytest.param("a=1&a=2&b=3", "a", "1", ["1", "2"], id="first_of_repeated"),
        pytest.param("a=1&b=3", "b", "3", ["3"], id="single"),
        pytest.param("a=&b=3", "a", "", [""], id="blank_value_kept"),
        pytest.param("flag&b=3", "flag", "", [""], id="bare_name"),
        pytest.param("q=a+b%21%E2%82%AC", "q", "a b!€", ["a b!€"], id="percent_and_plus_decoded"),
        pytest.param("a=1", "A", None, [], id="names_are_case_sensitive"),
        pytest.param("", "a", None, [], id="empty_query"),
    ],
)
def test_query_get_gives_the_first_value_and_getall_every_value(
    query: str, name: str, first: str | None, every: list[str]
) -> None:
    req = make_request(query=query)
    assert req.query.get(name) == first
    assert req.query.getall(name) == every


def test_query_get_returns_the_default_when_absent() -> None:
    assert make_request(query="a=1").query.get("name", "world") == "world"
    with pytest.raises(KeyError):
        make_request(query="a=1").query["name"]


HEADERS = [
    ("Content-Type", "application/json"),
    ("X-Multi", "one"),
    ("x-multi", "two"),
    ("ACCEPT", "*/*"),
]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        pytest.param("content-type", "application/json", id="lower"),
        pytest.param("CONTENT-TYPE", "application/json", id="upper"),
        pytest.param("Accept", "*/*", id="stored_upper"),
        pytest.param("X-MULTI", "one, two", id="repeated_values_joined"),
        pytest.param("missing", None, id="absent"),
    ],
)
def test_headers_get_is_case_insensitive_and_joins_repeats(name: str, value: str | None) -> None:
    assert make_request(headers=HEADERS).headers.get(name) == value


def test_headers_getall_membership_and_default() -> None:
    headers = make_request(headers=HEADERS).headers
    assert headers.getall("x-MULTI") == ["one", "two"]
    assert "x-multi" in headers
    assert "X-Other" not in headers
    assert headers.get("x-other", "dflt") == "dflt"
    assert headers["ACCEPT"] == "*/*"


def test_mappings_list_count_and_iterate_each_name_once() -> None:
    query = make_request(query="a=1&b=2&a=3").query
    assert query.keys() == ["a", "b"]
    assert list(query) == ["a", "b"]
    assert len(query) == 2
    assert query.items() == [("a", "1"), ("b", "2"), ("a", "3")]
    headers = Headers([("X-A", "1"), ("x-a", "2")])
    assert headers.keys() == ["x-a"]
    assert len(headers) == 1


@pytest.mark.parametrize("mapping", [Query([("a", "1")]), Headers([("a", "1")])])
def test_mappings_cannot_lose_their_items(mapping: Query | Headers) -> None:
    with pytest.raises(AttributeError, match="read-only"):
        del mapping._items
    assert mapping.getall("a") == ["1"]


def test_reprs_name_the_request_and_response_but_show_no_body() -> None:
    request = make_request(method="POST", body=b"secret")
    assert repr(request) == "<Request POST http://alice-hello.web.localhost/p/q?a=1>"
    assert repr(Response("secret")) == "<Response 200, 6 bytes>"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        pytest.param(b"", "", id="empty"),
        pytest.param("héllo €".encode(), "héllo €", id="utf8"),
        pytest.param(b"a\xffb", "a\ufffdb", id="invalid_utf8_replaced"),
    ],
)
def test_request_text_decodes_utf8(body: bytes, text: str) -> None:
    assert make_request(body=body).text() == text


def test_request_json_parses_the_body() -> None:
    assert make_request(body=b'{"a": [1, "\xc3\xa9"]}').json() == {"a": [1, "é"]}
    with pytest.raises(json.JSONDecodeError):
        make_request(body=b"not json").json()


def test_request_form_parses_urlencoded_fields() -> None:
    form = make_request(body=b"name=J%C3%B6rg+X&tag=a&tag=b&empty=").form()
    assert form.get("name") == "Jörg X"
    assert form.getall("tag") == ["a", "b"]
    assert form.get("empty") == ""
    assert form.get("missing") is None


def _set_attribute(m: Query | Headers) -> None:
    m.extra = "x"


def _replace_items(m: Query | Headers) -> None:
    setattr(m, "_items", ())  # noqa: B010


def _set_item(m: Query | Headers) -> None:
    m["a"] = "2"  # type: ignore[index]


def _delete_item(m: Query | Headers) -> None:
    del m["a"]  # type: ignore[union-attr]


def _delete_items(m: Query | Headers) -> None:
    delattr(m, "_items")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_set_attribute, id="set_attribute"),
        pytest.param(_replace_items, id="replace_items"),
        pytest.param(_set_item, id="set_item"),
        pytest.param(_delete_item, id="delete_item"),
        pytest.param(_delete_items, id="delete_items"),
    ],
)
@pytest.mark.parametrize("kind", ["query", "headers"])
def test_query_and_headers_are_read_only(
    kind: str, mutate: Callable[[Query | Headers], None]
) -> None:
    req = make_request(query="a=1", headers=[("a", "1")])
    mapping: Query | Headers = req.query if kind == "query" else req.headers
    with pytest.raises((AttributeError, TypeError)):
        mutate(mapping)
    assert mapping.getall("a") == ["1"]


@pytest.mark.parametrize("attribute", ["method", "url", "path", "query", "headers", "body"])
def test_request_attributes_are_read_only(attribute: str) -> None:
    req = make_request()
    with pytest.raises(AttributeError):
        setattr(req, attribute, "changed")


# Response


@pytest.mark.parametrize(
    ("kwargs", "body", "content_type"),
    [
        pytest.param({"body": "héllo"}, "héllo".encode(), [TEXT], id="str_gets_text_plain"),
        pytest.param({"body": b"\x00\x01"}, b"\x00\x01", [], id="bytes_gets_no_type"),
        pytest.param({"body": bytearray(b"ba")}, b"ba", [], id="bytearray_is_bytes"),
        pytest.param(
            {"body": "<p>", "headers": {"Content-Type": "text/html"}},
            b"<p>",
            ["text/html"],
            id="custom_type_kept_for_str",
        ),
        pytest.param(
            {"body": b"{}", "headers": [("content-type", "application/json")]},
            b"{}",
            ["application/json"],
            id="custom_type_kept_for_bytes",
        ),
    ],
)
def test_response_body_and_content_type(
    kwargs: dict[str, object], body: bytes, content_type: list[str]
) -> None:
    response = Response(**kwargs)  # type: ignore[arg-type]
    assert response.body == body
    assert type(response.body) is bytes
    assert content_types(response) == content_type
    assert response.status == 200


def test_response_defaults() -> None:
    response = Response()
    assert (response.status, response.body) == (200, b"")


def test_response_headers_from_a_mapping() -> None:
    response = Response("x", headers={"X-A": "1", "X-Count": 3})  # type: ignore[arg-type]
    assert ["X-A", "1"] in response.header_pairs()
    assert ["X-Count", "3"] in response.header_pairs()
    assert response.headers.get("x-a") == "1"


def test_response_headers_from_pairs_keep_repeated_set_cookie_in_order() -> None:
    pairs = [("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2"), ("X-A", "y")]
    response = Response("x", 201, pairs)
    assert [p for p in response.header_pairs() if p[0] == "Set-Cookie"] == [
        ["Set-Cookie", "a=1; Path=/"],
        ["Set-Cookie", "b=2"],
    ]
    assert response.headers.getall("set-cookie") == ["a=1; Path=/", "b=2"]
    assert response.status == 201


@pytest.mark.parametrize(
    "status", [200, 201, 204, 301, 399, 404, 500, 599], ids=lambda s: f"status_{s}"
)
def test_response_accepts_statuses_200_to_599(status: int) -> None:
    assert Response("", status).status == status


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(199, id="below_200"),
        pytest.param(100, id="informational"),
        pytest.param(600, id="above_599"),
        pytest.param(-200, id="negative"),
    ],
)
def test_response_refuses_statuses_out_of_range(status: int) -> None:
    with pytest.raises(ValueError, match="status must be an int from 200 to 599"):
        Response("", status)


@pytest.mark.parametrize("status", [204, 205, 304])
def test_response_refuses_a_body_on_a_status_that_has_none(status: int) -> None:
    # The front end would still send a Content-Length; a proxy trusting it on a 204 would
    # take the next response's first bytes as this body.
    assert Response("", status).body == b""
    with pytest.raises(ValueError, match="cannot have a body"):
        Response("x", status)
    with pytest.raises(ValueError, match="cannot have a body"):
        Response.json({}, status)


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(True, id="bool"),
        pytest.param("200", id="str"),
        pytest.param(200.0, id="float"),
        pytest.param(None, id="none"),
    ],
)
def test_response_refuses_statuses_that_are_not_ints(status: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        Response("", status)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(None, id="none"),
        pytest.param(1, id="int"),
        pytest.param({"a": 1}, id="dict"),
        pytest.param(["a"], id="list"),
        pytest.param(memoryview(b"x"), id="memoryview"),
    ],
)
def test_response_refuses_bodies_that_are_not_str_or_bytes(body: object) -> None:
    with pytest.raises(TypeError):
        Response(body)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([("only-name",)], id="one_element_pair"),
        pytest.param([("a", "b", "c")], id="three_element_pair"),
        pytest.param(["ab"], id="two_char_string_not_a_pair"),
        pytest.param([(1, "x")], id="int_name"),
        pytest.param({"x": None}, id="none_value"),
        pytest.param({"x": b"bytes"}, id="bytes_value"),
    ],
)
def test_response_refuses_malformed_headers(headers: object) -> None:
    with pytest.raises(TypeError):
        Response("x", 200, headers)  # type: ignore[arg-type]


def test_response_json() -> None:
    response = Response.json({"greeting": "hi é", "n": [1, None]}, 201, {"X-A": "1"})
    assert response.status == 201
    assert json.loads(response.body) == {"greeting": "hi é", "n": [1, None]}
    assert content_types(response) == ["application/json"]
    assert response.headers.get("x-a") == "1"


def test_response_json_keeps_a_custom_content_type() -> None:
    response = Response.json([1], headers=[("Content-Type", "application/problem+json")])
    assert content_types(response) == ["application/problem+json"]


def test_response_json_refuses_what_json_cannot_encode() -> None:
    with pytest.raises((TypeError, ValueError)):
        Response.json({"s": {1, 2}})


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_response_redirect(status: int) -> None:
    response = Response.redirect("https://example.com/x?y=1", status)
    assert response.status == status
    assert response.headers.get("location") == "https://example.com/x?y=1"
    assert response.body == b""


def test_response_redirect_defaults_to_302() -> None:
    assert Response.redirect("/elsewhere").status == 302


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(200, id="ok"),
        pytest.param(300, id="multiple_choices"),
        pytest.param(304, id="not_modified"),
        pytest.param(404, id="not_found"),
        pytest.param(True, id="bool"),
        pytest.param("302", id="str"),
    ],
)
def test_response_redirect_refuses_non_redirect_statuses(status: int) -> None:
    with pytest.raises((TypeError, ValueError)):
        Response.redirect("/x", status)


# to_response


def test_to_response_passes_a_response_through() -> None:
    response = Response("x", 418)
    assert to_response(response) is response


@pytest.mark.parametrize(
    ("value", "body", "content_type"),
    [
        pytest.param("<h1>hé</h1>", "<h1>hé</h1>".encode(), HTML, id="str_is_html"),
        pytest.param("", b"", HTML, id="empty_str_is_html"),
        pytest.param(b"\x00\xff", b"\x00\xff", "application/octet-stream", id="bytes"),
        pytest.param(bytearray(b"ab"), b"ab", "application/octet-stream", id="bytearray"),
        pytest.param({"a": [1, "é"]}, None, "application/json", id="dict_is_json"),
        pytest.param([1, {"b": None}], None, "application/json", id="list_is_json"),
        pytest.param({}, None, "application/json", id="empty_dict_is_json"),
    ],
)
def test_to_response_converts_plain_values(
    value: object, body: bytes | None, content_type: str
) -> None:
    response = to_response(value)
    assert response.status == 200
    assert content_types(response) == [content_type]
    if body is None:
        assert json.loads(response.body) == value
    else:
        assert response.body == body


def _generator() -> Iterator[int]:
    yield 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        pytest.param(42, "int", id="int"),
        pytest.param(None, "NoneType", id="none"),
        pytest.param({1, 2}, "set", id="set"),
        pytest.param(_generator(), "generator", id="generator"),
        pytest.param((1, 2), "tuple", id="tuple"),
        pytest.param(1.5, "float", id="float"),
        pytest.param(True, "bool", id="bool"),
    ],
)
def test_to_response_refuses_other_values_naming_their_type(value: object, type_name: str) -> None:
    with pytest.raises(TypeError, match=rf"\b{type_name}\b"):
        to_response(value)


# dumps_json


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="infinity"),
        pytest.param({"x": [-math.inf]}, id="nested_minus_infinity"),
    ],
)
def test_dumps_json_refuses_values_json_has_no_spelling_for(value: object) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps_json(value)


def test_dumps_json_is_compact_utf8() -> None:
    assert dumps_json({"a": ["é", 1]}) == '{"a":["é",1]}'


# What vals may not bend


@pytest.mark.parametrize("cls", [Request, Response, Headers, Query])
def test_val_facing_classes_refuse_subclasses(cls: type) -> None:
    # The worker reads a Response's status, body and header_pairs() after the val returned,
    # outside its error handling: a val's override must not be what it reads.
    with pytest.raises(TypeError, match="cannot be subclassed"):
        type("Sneaky", (cls,), {})


class _LyingStr(str):
    def lower(self) -> str:
        return "x-not-content-type"

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"forged"


def test_response_copies_str_subclasses_to_plain_str() -> None:
    response = Response(_LyingStr("body"), 200, [(_LyingStr("Content-Type"), _LyingStr("a/b"))])
    assert response.body == b"body"
    assert response.header_pairs() == [["Content-Type", "a/b"]]
    assert all(type(part) is str for pair in response.header_pairs() for part in pair)
    assert to_response(_LyingStr("<p>")).body == b"<p>"
