"""The API host's routes: a table of (method, path pattern, handler, label), matched once.

`match_route` is pure: it answers the handler and its path parameters, or a handler that
raises 404 or 405. The label says what answers: `run` and `eval` serve browsers on other
origins (docs/contract.md §6), so their answers, errors included, get the CORS defaults; `api`
(management) answers get none. The label is also the `route` label of /metrics.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.errors import HTTPError, MethodNotAllowedError, NotFoundError
from runtime.http import HTTPRequest, HTTPResponse, RouteLabel

if TYPE_CHECKING:
    from runtime.api import Api
    from runtime.run_api import RunApi
    from runtime.storage_api import StorageApi

Handler = Callable[[HTTPRequest, dict[str, str]], Awaitable[HTTPResponse]]
ANY_METHOD = "*"

_USER = r"(?P<user>[^/]+)"
_VAL = r"(?P<val>[^/]+)"
_VERSION = r"(?P<version>[0-9]{1,10})"
_RUN = r"/v1/run/(?P<target>[^/]+)"
# Eval's code is the rest of the path, slashes and newlines included (`1/2`, `x = 1\nx`).
_EVAL = r"/v1/eval/(?P<code>(?s:.*))"
# The legacy Express paths (docs/contract.md §4.1), any method. The val stops at the first `/`.
EXPRESS = r"/(?:v1/express/|express/@)(?P<user>[^/.]+)\.(?P<val>[^/]+)(?P<rest>/.*)?"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    label: RouteLabel


@dataclass(frozen=True, slots=True)
class Match:
    handler: Handler
    params: dict[str, str]
    label: RouteLabel
    #: Why no route takes the request (404, 405); `handler` raises it.
    error: HTTPError | None = None


def api_routes(api: Api, run_api: RunApi, storage: StorageApi | None = None) -> tuple[Route, ...]:
    table: tuple[tuple[str, str, Handler, RouteLabel], ...] = (
        (ANY_METHOD, EXPRESS, api.express_redirect, "api"),
        ("GET", r"/healthz", api.healthz, "api"),
        ("GET", r"/metrics", api.serve_metrics, "api"),
        ("GET", r"/v1/me", api.me, "api"),
        ("GET", rf"/v1/vals/{_USER}", api.list_vals, "api"),
        ("PUT", rf"/v1/vals/{_USER}/{_VAL}", api.put_val, "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}", api.get_val, "api"),
        ("PATCH", rf"/v1/vals/{_USER}/{_VAL}", api.patch_val, "api"),
        ("DELETE", rf"/v1/vals/{_USER}/{_VAL}", api.delete_val, "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}/versions", api.list_versions, "api"),
        ("DELETE", rf"/v1/vals/{_USER}/{_VAL}/versions/{_VERSION}", api.delete_version, "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}/runs", api.list_records, "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}/schedule", api.get_schedule, "api"),
        ("PUT", rf"/v1/vals/{_USER}/{_VAL}/schedule", api.put_schedule, "api"),
        ("DELETE", rf"/v1/vals/{_USER}/{_VAL}/schedule", api.delete_schedule, "api"),
        ("GET", r"/v1/me/evals", api.list_eval_records, "api"),
        ("GET", r"/v1/env", api.list_env, "api"),
        ("PUT", r"/v1/env/(?P<key>[^/]+)", api.put_env, "api"),
        ("DELETE", r"/v1/env/(?P<key>[^/]+)", api.delete_env, "api"),
        ("GET", _RUN, run_api.run_val, "run"),
        ("POST", _RUN, run_api.run_val, "run"),
        ("OPTIONS", _RUN, run_api.preflight, "run"),
        ("POST", r"/v1/eval", run_api.eval_code, "eval"),
        ("OPTIONS", r"/v1/eval", run_api.preflight, "eval"),
        ("GET", _EVAL, run_api.eval_code, "eval"),
        ("OPTIONS", _EVAL, run_api.preflight, "eval"),
    )
    if storage is not None:
        # A key is the rest of the path, slashes included (`users/1`).
        table += (
            ("GET", r"/v1/blob", storage.list_blobs, "api"),
            ("GET", r"/v1/blob/(?P<key>(?s:.+))", storage.get_blob, "api"),
            ("PUT", r"/v1/blob/(?P<key>(?s:.+))", storage.put_blob, "api"),
            ("DELETE", r"/v1/blob/(?P<key>(?s:.+))", storage.delete_blob, "api"),
            ("POST", r"/v1/sqlite/execute", storage.execute, "api"),
            ("POST", r"/v1/sqlite/batch", storage.batch, "api"),
        )
    return tuple(
        Route(method, re.compile(pattern), handler, label)
        for method, pattern, handler, label in table
    )


def match_route(routes: tuple[Route, ...], method: str, path: str) -> Match:
    allowed: list[str] = []
    label: RouteLabel = "api"
    for route in routes:
        found = route.pattern.fullmatch(path)
        if not found:
            continue
        if route.method in (method, ANY_METHOD) or (method == "HEAD" and route.method == "GET"):
            return Match(route.handler, found.groupdict(), route.label)
        if not allowed:
            label = route.label  # a 405 on /v1/run is still the Run API's answer
        allowed.append(route.method)
        if route.method == "GET":
            allowed.append("HEAD")
    error: HTTPError = NotFoundError(f"no API route {path}")
    if allowed:
        error = MethodNotAllowedError(
            f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            headers=(("allow", ", ".join(allowed)),),
        )
    return Match(_refuse(error), {}, label, error)


def _refuse(error: HTTPError) -> Handler:
    async def refuse(request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        raise error

    return refuse
