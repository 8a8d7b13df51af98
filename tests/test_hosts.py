"""Host routing (docs/contract.md §3) as tables: which part of valrun a Host header names."""

from __future__ import annotations

import pytest

from runtime.errors import BadRequestError
from runtime.hosts import ApiHost, Route, UnknownHost, ValHost, route_host, split_host

API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"


def route(header: str | None) -> Route:
    return route_host(header, API_HOST, WEB_DOMAIN)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("api.localhost", ("api.localhost", None)),
        ("api.localhost:8080", ("api.localhost", 8080)),
        ("api.localhost:1", ("api.localhost", 1)),
        ("api.localhost:65535", ("api.localhost", 65535)),
        ("api.localhost.", ("api.localhost", None)),
        ("api.localhost.:8080", ("api.localhost", 8080)),
        ("API.LocalHost", ("api.localhost", None)),
        ("  api.localhost  ", ("api.localhost", None)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]", ("::1", None)),
        ("[::1]:8080", ("::1", 8080)),
        ("[2001:DB8::1]:443", ("2001:db8::1", 443)),
        ("my_user-my_val.web.localhost", ("my_user-my_val.web.localhost", None)),
    ],
)
def test_host_header_splits_into_normalized_name_and_port(
    header: str, expected: tuple[str, int | None]
) -> None:
    assert split_host(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("api.localhost:0", id="port-zero"),
        pytest.param("api.localhost:65536", id="port-too-large"),
        pytest.param("api.localhost:99999999999999999999", id="port-huge"),
        pytest.param("api.localhost:http", id="port-letters"),
        pytest.param("api.localhost:80a", id="port-trailing-letter"),
        pytest.param("api.localhost:-1", id="port-negative"),
        pytest.param("api.localhost:+80", id="port-plus"),
        pytest.param("api.localhost:", id="port-empty"),
        pytest.param("api.localhost:8080:8080", id="two-ports"),
        # Header values are latin-1: these are digits to str.isdigit, not to int().
        pytest.param("api.localhost:\xb2", id="port-superscript-two"),
        pytest.param("api.localhost:\xb9\xb3", id="port-superscript-digits"),
        pytest.param("[::1", id="unclosed-bracket"),
        pytest.param("[::1]8080", id="junk-after-bracket"),
        pytest.param("[::1]:", id="bracket-empty-port"),
        pytest.param("[::1]:0", id="bracket-port-zero"),
        pytest.param("[::1]:65536", id="bracket-port-too-large"),
        pytest.param("[::1]:abc", id="bracket-port-letters"),
        pytest.param("[not-an-ip]", id="bracket-not-ipv6"),
        pytest.param("[127.0.0.1]", id="bracket-ipv4"),
        pytest.param("[]", id="bracket-empty"),
        pytest.param("::1", id="unbracketed-ipv6"),
        pytest.param("api..localhost", id="empty-label"),
        pytest.param(".api.localhost", id="leading-dot"),
        pytest.param("-hello.web.localhost", id="leading-hyphen"),
        pytest.param("api.localhost..", id="two-trailing-dots"),
        pytest.param("api localhost", id="space"),
        pytest.param("user@api.localhost", id="userinfo"),
        pytest.param("api.localhost/path", id="slash"),
        pytest.param("alice-hello.web.localhost\x00", id="nul"),
        pytest.param("ápi.localhost", id="non-ascii"),
        pytest.param("   ", id="only-spaces"),
    ],
)
def test_malformed_host_header_is_bad_host(header: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        split_host(header)
    assert (caught.value.status, caught.value.type) == (400, "bad_host")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("api.localhost", ApiHost(), id="api"),
        pytest.param("api.localhost:8080", ApiHost(), id="api-port"),
        pytest.param("API.LOCALHOST", ApiHost(), id="api-upper"),
        pytest.param("api.localhost.", ApiHost(), id="api-trailing-dot"),
        pytest.param("alice-hello.web.localhost", ValHost("alice", "hello"), id="val"),
        pytest.param("alice-hello.web.localhost:8080", ValHost("alice", "hello"), id="val-port"),
        pytest.param("alice-hello.web.localhost.", ValHost("alice", "hello"), id="val-dot"),
        pytest.param(
            "alice-hello.web.localhost.:8080", ValHost("alice", "hello"), id="val-dot-port"
        ),
        pytest.param("ALICE-Hello.WEB.localhost", ValHost("alice", "hello"), id="val-upper"),
        pytest.param("alice-myEndpoint.web.localhost", ValHost("alice", "myendpoint"), id="camel"),
        pytest.param("my_user-my_val2.web.localhost", ValHost("my_user", "my_val2"), id="under"),
        pytest.param("a-b.web.localhost", ValHost("a", "b"), id="one-letter-names"),
        pytest.param(
            f"{'a' * 39}-{'v' * 48}.web.localhost", ValHost("a" * 39, "v" * 48), id="longest"
        ),
    ],
)
def test_known_hosts_route_to_api_or_val(header: str, expected: Route) -> None:
    assert route(header) == expected


@pytest.mark.parametrize(
    ("header", "expected_host"),
    [
        pytest.param("[::1]:8080", "::1", id="ipv6-literal"),
        pytest.param("[::1]", "::1", id="ipv6-no-port"),
        pytest.param("127.0.0.1:8080", "127.0.0.1", id="ipv4-literal"),
        pytest.param("localhost", "localhost", id="localhost"),
        pytest.param("web.localhost", "web.localhost", id="bare-web-domain"),
        pytest.param("web.localhost:8080", "web.localhost", id="bare-web-domain-port"),
        pytest.param("evilweb.localhost", "evilweb.localhost", id="merely-ends-with-domain"),
        pytest.param(
            "alice-hello.evilweb.localhost", "alice-hello.evilweb.localhost", id="lookalike-domain"
        ),
        pytest.param(
            "alice-hello.web.localhost.evil.com",
            "alice-hello.web.localhost.evil.com",
            id="web-domain-as-prefix",
        ),
        pytest.param("alice-helloweb.localhost", "alice-helloweb.localhost", id="no-dot-before"),
        pytest.param(
            "x.alice-hello.web.localhost", "x.alice-hello.web.localhost", id="nested-label"
        ),
        pytest.param("alice.hello.web.localhost", "alice.hello.web.localhost", id="dot-not-hyphen"),
        pytest.param("x.api.localhost", "x.api.localhost", id="child-of-api-host"),
        pytest.param("alicehello.web.localhost", "alicehello.web.localhost", id="no-hyphen"),
        # Neither names may hold a hyphen, so at the last hyphen the user is invalid.
        pytest.param("alice-bob-hello.web.localhost", "alice-bob-hello.web.localhost", id="2-hyph"),
        pytest.param("alice-.web.localhost", "alice-.web.localhost", id="empty-val"),
        pytest.param("1alice-hello.web.localhost", "1alice-hello.web.localhost", id="user-digit"),
        pytest.param("_alice-hello.web.localhost", "_alice-hello.web.localhost", id="user-under"),
        pytest.param("alice-1hello.web.localhost", "alice-1hello.web.localhost", id="val-digit"),
        pytest.param("alice-_hello.web.localhost", "alice-_hello.web.localhost", id="val-under"),
        pytest.param(
            f"{'a' * 40}-hello.web.localhost", f"{'a' * 40}-hello.web.localhost", id="user-long"
        ),
        pytest.param(
            f"alice-{'v' * 49}.web.localhost", f"alice-{'v' * 49}.web.localhost", id="val-long"
        ),
    ],
)
def test_other_hosts_are_unknown_not_errors(header: str, expected_host: str) -> None:
    assert route(header) == UnknownHost(expected_host)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("  ", id="blank"),
        pytest.param("[::1", id="malformed-bracket"),
        pytest.param("[::1]x", id="junk-after-bracket"),
        pytest.param("api.localhost:0", id="port-zero"),
        pytest.param("alice-hello.web.localhost:65536", id="val-port-too-large"),
        pytest.param("alice-hello.web.localhost:abc", id="val-port-letters"),
        pytest.param("api.localhost:\xb2", id="port-superscript"),
    ],
)
def test_missing_or_malformed_host_is_bad_request(header: str | None) -> None:
    with pytest.raises(BadRequestError) as caught:
        route(header)
    assert (caught.value.status, caught.value.type) == (400, "bad_host")


@pytest.mark.parametrize(
    ("header", "api_host", "web_domain", "expected"),
    [
        ("api.example.com", "api.example.com", "example-vals.net", ApiHost()),
        (
            "alice-hello.example-vals.net",
            "api.example.com",
            "example-vals.net",
            ValHost("alice", "hello"),
        ),
        (
            "alice-hello.web.localhost",
            "api.example.com",
            "example-vals.net",
            UnknownHost("alice-hello.web.localhost"),
        ),
        ("api.localhost", "api.example.com", "example-vals.net", UnknownHost("api.localhost")),
    ],
)
def test_routing_follows_the_configured_hosts(
    header: str, api_host: str, web_domain: str, expected: Route
) -> None:
    assert route_host(header, api_host, web_domain) == expected
