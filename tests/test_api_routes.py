"""The API host's pure parts (docs/contract.md §4): route matching, Express redirects, ?v=N,
names."""

from __future__ import annotations

from typing import cast

import pytest

from runtime.api import Api
from runtime.api import express_target as express_redirect
from runtime.auth import check_names, parse_version
from runtime.errors import BadRequestError, MethodNotAllowedError, NotFoundError
from runtime.routes import Handler, Match, api_routes
from runtime.routes import match_route as match_routes
from runtime.run_api import RunApi


class Handlers:
    """Stands for Api and RunApi: each handler is a function named as the method."""

    def __getattr__(self, name: str) -> Handler:
        async def handler(*args: object) -> object:
            raise AssertionError("not called")

        handler.__name__ = name
        return handler  # type: ignore[return-value]


ROUTES = api_routes(cast(Api, Handlers()), cast(RunApi, Handlers()))


def match_route(method: str, path: str) -> Match:
    return match_routes(ROUTES, method, path)


def handler_of(method: str, path: str) -> str:
    match = match_route(method, path)
    if match.error is not None:
        raise match.error
    return match.handler.__name__


# match_route


@pytest.mark.parametrize(
    ("method", "path", "handler", "params"),
    [
        ("GET", "/healthz", "healthz", {}),
        ("GET", "/v1/me", "me", {}),
        ("GET", "/v1/vals/alice", "list_vals", {"user": "alice"}),
        ("PUT", "/v1/vals/alice/hello", "put_val", {"user": "alice", "val": "hello"}),
        ("GET", "/v1/vals/alice/hello", "get_val", {"user": "alice", "val": "hello"}),
        ("PATCH", "/v1/vals/alice/hello", "patch_val", {"user": "alice", "val": "hello"}),
        ("DELETE", "/v1/vals/alice/hello", "delete_val", {"user": "alice", "val": "hello"}),
        (
            "GET",
            "/v1/vals/alice/hello/versions",
            "list_versions",
            {"user": "alice", "val": "hello"},
        ),
        ("GET", "/v1/env", "list_env", {}),
        ("PUT", "/v1/env/API_KEY", "put_env", {"key": "API_KEY"}),
        ("DELETE", "/v1/env/API_KEY", "delete_env", {"key": "API_KEY"}),
        ("GET", "/v1/vals/alice/hello/runs", "list_records", {"user": "alice", "val": "hello"}),
        ("GET", "/v1/me/evals", "list_eval_records", {}),
        ("GET", "/v1/run/alice.hello", "run_val", {"target": "alice.hello"}),
        ("POST", "/v1/run/alice.hello", "run_val", {"target": "alice.hello"}),
        ("OPTIONS", "/v1/run/alice.hello", "preflight", {"target": "alice.hello"}),
        ("GET", "/v1/run/alice", "run_val", {"target": "alice"}),  # 400 bad_name, not 404
        ("POST", "/v1/eval", "eval_code", {}),
        ("OPTIONS", "/v1/eval", "preflight", {}),
        ("GET", "/v1/eval/1+1", "eval_code", {"code": "1+1"}),
        ("GET", "/v1/eval/x = 1\nx / 2", "eval_code", {"code": "x = 1\nx / 2"}),
        ("GET", "/v1/eval/", "eval_code", {"code": ""}),  # 400: the code is empty
        ("OPTIONS", "/v1/eval/1", "preflight", {"code": "1"}),
    ],
)
def test_api_route_matches_its_handler_and_params(
    method: str, path: str, handler: str, params: dict[str, str]
) -> None:
    match = match_route(method, path)
    assert (match.handler.__name__, match.params, match.error) == (handler, params, None)


@pytest.mark.parametrize(
    ("path", "handler"),
    [
        ("/healthz", "healthz"),
        ("/v1/me", "me"),
        ("/v1/vals/alice", "list_vals"),
        ("/v1/vals/alice/hello", "get_val"),
        ("/v1/vals/alice/hello/versions", "list_versions"),
        ("/v1/env", "list_env"),
    ],
)
def test_head_matches_get_routes(path: str, handler: str) -> None:
    assert handler_of("HEAD", path) == handler


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/v1",
        "/v1/",
        "/v1/nope",
        "/v1/me/",
        "/v1/mee",
        "/V1/me",
        "/healthz/",
        "/v1/vals",
        "/v1/vals/",
        "/v1/vals/alice/",
        "/v1/vals/alice/hello/",
        "/v1/vals/alice/hello/version",
        "/v1/vals/alice/hello/versions/",
        "/v1/vals/alice/hello/versions/one",
        "/v1/vals/alice/hello/versions/1/",
        "/v1/vals//hello",
        "/v1/env/",
        "/v1/env/a/b",
        "/v2/me",
        "//v1/me",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_api_path_is_not_found(method: str, path: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        handler_of(method, path)
    assert (caught.value.status, caught.value.type) == (404, "not_found")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
def test_a_single_version_can_only_be_deleted(method: str) -> None:
    with pytest.raises(MethodNotAllowedError) as caught:
        handler_of(method, "/v1/vals/alice/hello/versions/1")
    assert caught.value.headers == (("allow", "DELETE"),)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/v1/me", {"GET", "HEAD"}),
        ("PUT", "/v1/me", {"GET", "HEAD"}),
        ("DELETE", "/healthz", {"GET", "HEAD"}),
        ("POST", "/v1/vals/alice", {"GET", "HEAD"}),
        ("POST", "/v1/vals/alice/hello", {"PUT", "GET", "HEAD", "PATCH", "DELETE"}),
        ("OPTIONS", "/v1/vals/alice/hello", {"PUT", "GET", "HEAD", "PATCH", "DELETE"}),
        ("PUT", "/v1/vals/alice/hello/versions", {"GET", "HEAD"}),
        ("POST", "/v1/env", {"GET", "HEAD"}),
        ("GET", "/v1/env/API_KEY", {"PUT", "DELETE"}),
        ("HEAD", "/v1/env/API_KEY", {"PUT", "DELETE"}),
        ("get", "/v1/me", {"GET", "HEAD"}),
        ("DELETE", "/v1/run/alice.hello", {"GET", "HEAD", "POST", "OPTIONS"}),
        ("PUT", "/v1/eval", {"POST", "OPTIONS"}),
        ("POST", "/v1/eval/1", {"GET", "HEAD", "OPTIONS"}),
        ("POST", "/v1/vals/alice/hello/runs", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_on_api_route_is_405_with_allow(
    method: str, path: str, allowed: set[str]
) -> None:
    with pytest.raises(MethodNotAllowedError) as caught:
        handler_of(method, path)
    assert (caught.value.status, caught.value.type) == (405, "method_not_allowed")
    allow = dict(caught.value.headers)["allow"]
    assert {m.strip() for m in allow.split(",")} == allowed


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "/v1/vals/alice/hello/runs", id="runs"),
        pytest.param("GET", "/v1/run/alice.hello", id="run-get"),
        pytest.param("POST", "/v1/run/alice.hello", id="run-post"),
        pytest.param("GET", "/v1/eval/1%2B1", id="eval-get"),
        pytest.param("POST", "/v1/eval", id="eval-post"),
    ],
)
def test_every_spec_api_route_is_routed(method: str, path: str) -> None:
    # docs/contract.md §4.2 (Run), §4.3 (Eval) and §4.4 (runs) name these on the API host.
    assert handler_of(method, path) in ("list_records", "run_val", "eval_code")


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/v1/run/alice.hello", "run"),
        ("/v1/run/alice", "run"),
        ("/v1/eval", "eval"),
        ("/v1/eval/1+1", "eval"),
        ("/v1/eval/", "eval"),
        ("/v1/me", "api"),
        ("/v1/vals/alice/hello", "api"),
        ("/v1/vals/alice/hello/runs", "api"),
        ("/v1/env/KEY", "api"),
        ("/v1/run", "api"),
        ("/v1/runs/alice.hello", "api"),
        ("/v1/evaluate", "api"),
        ("/healthz", "api"),
    ],
)
def test_run_and_eval_paths_are_told_from_management_ones(path: str, kind: str) -> None:
    # run and eval answers get CORS (docs/contract.md §6); management (api) answers do not.
    assert match_route("GET", path).label == kind


# express_redirect


@pytest.mark.parametrize(
    ("raw_path", "query", "scheme", "port", "target"),
    [
        pytest.param(
            "/v1/express/alice.hello",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/",
            id="v1",
        ),
        pytest.param(
            "/express/@alice.hello",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/",
            id="at",
        ),
        pytest.param(
            "/v1/express/alice.hello",
            "",
            "http",
            8080,
            "http://alice-hello.web.localhost:8080/",
            id="port-kept",
        ),
        pytest.param(
            "/v1/express/alice.hello",
            "",
            "https",
            443,
            "https://alice-hello.web.localhost:443/",
            id="https",
        ),
        pytest.param(
            "/v1/express/alice.hello/",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/",
            id="trailing-slash",
        ),
        pytest.param(
            "/v1/express/alice.hello/a/b",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/a/b",
            id="rest-kept",
        ),
        pytest.param(
            "/express/@alice.hello/a/b.json",
            "",
            "http",
            8080,
            "http://alice-hello.web.localhost:8080/a/b.json",
            id="at-rest-port",
        ),
        pytest.param(
            "/v1/express/alice.hello/a%20b/c%2Fd",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/a%20b/c%2Fd",
            id="rest-stays-encoded",
        ),
        pytest.param(
            "/v1/express/alice.hello/a//b",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/a//b",
            id="inner-double-slash",
        ),
        pytest.param(
            "/v1/express/alice.hello",
            "x=1&y=%20",
            "http",
            None,
            "http://alice-hello.web.localhost/?x=1&y=%20",
            id="query-kept",
        ),
        pytest.param(
            "/express/@alice.hello/p",
            "name=bob",
            "http",
            8080,
            "http://alice-hello.web.localhost:8080/p?name=bob",
            id="all-kept",
        ),
        pytest.param(
            "/v1/express/ALICE.hello",
            "",
            "http",
            None,
            "http://alice-hello.web.localhost/",
            id="upper-user-lowered",
        ),
        pytest.param(
            "/v1/express/alice.myEndpoint",
            "",
            "http",
            None,
            "http://alice-myendpoint.web.localhost/",
            id="camel-val-host-lowered",
        ),
        pytest.param(
            "/v1/express/my_user.my_val2",
            "",
            "http",
            None,
            "http://my_user-my_val2.web.localhost/",
            id="underscores",
        ),
    ],
)
def test_express_path_redirects_to_the_vals_host(
    raw_path: str, query: str, scheme: str, port: int | None, target: str
) -> None:
    assert express_redirect(raw_path, query, scheme, "web.localhost", port) == target


def test_express_redirect_uses_the_configured_web_domain() -> None:
    target = express_redirect("/v1/express/alice.hello/x", "", "https", "example-vals.net", None)
    assert target == "https://alice-hello.example-vals.net/x"


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/express/1alice.hello",
        "/v1/express/al-ice.hello",
        "/v1/express/_alice.hello",
        f"/v1/express/{'a' * 40}.hello",
        "/v1/express/alice.1hello",
        "/v1/express/alice.hel-lo",
        "/v1/express/alice.hel.lo",
        "/v1/express/alice.hello.json",
        "/v1/express/alice.%68ello",
        f"/v1/express/alice.{'v' * 49}",
        "/express/@1alice.hello",
        "/express/@alice.hel-lo/x",
    ],
)
def test_express_path_with_a_bad_name_is_bad_name(raw_path: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        express_redirect(raw_path, "", "http", "web.localhost", None)
    assert (caught.value.status, caught.value.type) == (400, "bad_name")


@pytest.mark.parametrize(
    "raw_path",
    [
        "/",
        "/v1/me",
        "/v1/vals/alice/hello",
        "/v1/run/alice.hello",
        "/v1/express",
        "/v1/express/",
        "/v1/express/alice",
        "/v1/express/.hello",
        "/v1/express/alice.",
        "/v1/expressx/alice.hello",
        "/express/alice.hello",
        "/express/@",
        "/x/v1/express/alice.hello",
        "v1/express/alice.hello",
    ],
)
def test_non_express_path_is_not_redirected(raw_path: str) -> None:
    assert express_redirect(raw_path, "x=1", "http", "web.localhost", 8080) is None


# parse_version


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("v=3", 3),
        ("v=1", 1),
        ("v=10", 10),
        ("v=007", 7),
        ("args=%5B%5D&v=2", 2),
        ("v=2&v=5", 2),
        ("", None),
        ("x=1", None),
        ("args=%5B1%5D", None),
        ("vv=3", None),
    ],
)
def test_version_pin_is_parsed(query: str, expected: int | None) -> None:
    assert parse_version(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        "v=0",
        "v=00",
        "v=x",
        "v=-1",
        "v=1.5",
        "v=%2B1",
        "v=1e3",
        "v=%201",
        "v=latest",
        "v=0x10",
        # str.isdigit() is true for these, int() is not (or not as a version).
        "v=%C2%B2",  # superscript two
        "v=%E2%91%A0",  # circled digit one
        # SQLite integers stop at 2**63 - 1; a bigger pin must be bad input, not a crash.
        "v=99999999999999999999999999",
    ],
)
def test_bad_version_pin_is_bad_request(query: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        parse_version(query)
    assert (caught.value.status, caught.value.type) == (400, "bad_version")


# check_names


@pytest.mark.parametrize(
    ("user", "val"),
    [
        ("alice", "hello"),
        ("alice", None),
        ("a", "B"),
        ("a1_", "x_1"),
        ("a" * 39, "v" * 48),
        ("alice", "myEndpoint"),
    ],
)
def test_valid_names_pass(user: str, val: str | None) -> None:
    check_names(user, val)


@pytest.mark.parametrize(
    ("user", "val"),
    [
        pytest.param("", "hello", id="user-empty"),
        pytest.param("Alice", "hello", id="user-upper"),
        pytest.param("1alice", "hello", id="user-digit-first"),
        pytest.param("_alice", "hello", id="user-underscore-first"),
        pytest.param("al-ice", "hello", id="user-hyphen"),
        pytest.param("al.ice", "hello", id="user-dot"),
        pytest.param("alice\n", "hello", id="user-trailing-newline"),
        pytest.param("ålice", "hello", id="user-non-ascii"),
        pytest.param("a" * 40, "hello", id="user-too-long"),
        pytest.param("alice", "", id="val-empty"),
        pytest.param("alice", "1hello", id="val-digit-first"),
        pytest.param("alice", "_hello", id="val-underscore-first"),
        pytest.param("alice", "hel-lo", id="val-hyphen"),
        pytest.param("alice", "hel.lo", id="val-dot"),
        pytest.param("alice", "hello\n", id="val-trailing-newline"),
        pytest.param("alice", "héllo", id="val-non-ascii"),
        pytest.param("alice", "v" * 49, id="val-too-long"),
        pytest.param("Alice", None, id="user-only-invalid"),
    ],
)
def test_invalid_names_are_bad_name(user: str, val: str | None) -> None:
    with pytest.raises(BadRequestError) as caught:
        check_names(user, val)
    assert (caught.value.status, caught.value.type) == (400, "bad_name")
