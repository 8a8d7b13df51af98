"""CORS finalization (docs/contract.md §6) as tables."""

from __future__ import annotations

import pytest

from runtime.cors import finalize_cors

Headers = list[tuple[bytes, bytes]]

ALLOW_ORIGIN = (b"access-control-allow-origin", b"*")
ALLOW_METHODS = (b"access-control-allow-methods", b"GET,HEAD,PUT,PATCH,POST,DELETE")
CONTENT_TYPE = (b"content-type", b"text/plain")
REQUEST_METHOD = (b"access-control-request-method", b"PUT")


@pytest.mark.parametrize(
    ("method", "request_headers", "response_headers"),
    [
        pytest.param("GET", [], [], id="get-no-headers"),
        pytest.param("GET", [], [CONTENT_TYPE], id="get-content-type"),
        pytest.param("POST", [(b"origin", b"https://x.example")], [CONTENT_TYPE], id="post"),
        pytest.param("HEAD", [], [CONTENT_TYPE], id="head"),
        pytest.param("DELETE", [], [(b"x-access-control-note", b"1")], id="x-prefixed-header"),
        pytest.param("GET", [], [(b"access-control", b"1")], id="no-trailing-hyphen"),
        pytest.param("GET", [], [(b"vary", b"Origin")], id="vary"),
    ],
)
def test_response_without_cors_headers_gets_defaults(
    method: str, request_headers: Headers, response_headers: Headers
) -> None:
    result = finalize_cors(method, request_headers, list(response_headers))
    assert result == [*response_headers, ALLOW_ORIGIN, ALLOW_METHODS]


@pytest.mark.parametrize(
    "val_header",
    [
        pytest.param((b"access-control-allow-origin", b"https://x.example"), id="acao"),
        pytest.param((b"Access-Control-Allow-Origin", b"https://x.example"), id="acao-mixed"),
        pytest.param((b"ACCESS-CONTROL-ALLOW-ORIGIN", b"*"), id="acao-upper"),
        pytest.param((b"access-control-allow-origin", b""), id="empty-acao-opt-out"),
        pytest.param((b"access-control-allow-credentials", b"true"), id="credentials"),
        pytest.param((b"access-control-max-age", b"600"), id="max-age"),
        pytest.param((b"Access-Control-Expose-Headers", b"x-a"), id="expose"),
        pytest.param((b"access-control-whatever", b"x"), id="unknown-ac-header"),
    ],
)
@pytest.mark.parametrize(
    ("method", "request_headers"),
    [
        pytest.param("GET", [], id="get"),
        pytest.param(
            "OPTIONS",
            [REQUEST_METHOD, (b"access-control-request-headers", b"x-a")],
            id="preflight",
        ),
    ],
)
def test_val_that_sets_any_cors_header_gets_nothing_added(
    val_header: tuple[bytes, bytes], method: str, request_headers: Headers
) -> None:
    response_headers = [CONTENT_TYPE, val_header]
    result = finalize_cors(method, request_headers, list(response_headers))
    assert result == response_headers


@pytest.mark.parametrize(
    ("request_headers", "mirrored"),
    [
        pytest.param(
            [REQUEST_METHOD, (b"access-control-request-headers", b"x-a, content-type")],
            b"x-a, content-type",
            id="mirrors",
        ),
        pytest.param(
            [(b"Access-Control-Request-Method", b"PUT"), (b"Access-Control-Request-Headers", b"x")],
            b"x",
            id="request-header-names-any-case",
        ),
        pytest.param(
            [
                REQUEST_METHOD,
                (b"access-control-request-headers", b"x-a"),
                (b"access-control-request-headers", b"x-b"),
            ],
            b"x-a, x-b",
            id="repeated-values-joined",
        ),
        pytest.param(
            [(b"access-control-request-headers", b"x-a"), REQUEST_METHOD],
            b"x-a",
            id="order-does-not-matter",
        ),
    ],
)
def test_preflight_mirrors_requested_headers(request_headers: Headers, mirrored: bytes) -> None:
    result = finalize_cors("OPTIONS", request_headers, [])
    assert result == [
        ALLOW_ORIGIN,
        ALLOW_METHODS,
        (b"access-control-allow-headers", mirrored),
    ]


@pytest.mark.parametrize(
    ("method", "request_headers"),
    [
        pytest.param("OPTIONS", [REQUEST_METHOD], id="preflight-without-request-headers"),
        pytest.param(
            "OPTIONS",
            [(b"access-control-request-headers", b"x-a")],
            id="options-without-request-method-is-not-preflight",
        ),
        pytest.param("OPTIONS", [], id="plain-options"),
        pytest.param(
            "GET",
            [REQUEST_METHOD, (b"access-control-request-headers", b"x-a")],
            id="get-with-request-headers",
        ),
        pytest.param(
            "POST",
            [REQUEST_METHOD, (b"access-control-request-headers", b"x-a")],
            id="post-with-request-headers",
        ),
    ],
)
def test_non_preflight_or_headerless_preflight_gets_no_allow_headers(
    method: str, request_headers: Headers
) -> None:
    assert finalize_cors(method, request_headers, []) == [ALLOW_ORIGIN, ALLOW_METHODS]


def test_finalize_leaves_the_callers_list_unchanged() -> None:
    response_headers = [CONTENT_TYPE]
    finalize_cors("GET", [], response_headers)
    assert response_headers == [CONTENT_TYPE]
