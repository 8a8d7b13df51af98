"""The API host: Run (SPEC §4.2), Eval (§4.3), management (§4.4), legacy Express redirects
(§4.1), health.

Routes are a table of (method, path pattern, handler name); `match_route` is pure and
answers 404 or 405 itself. Handlers are methods of `Api` (management) and of
`runtime.run_api.RunApi` (Run and Eval, which invoke vals).

Who may do what, by privacy (SPEC §1). A private val is invisible to everyone but its owner:
404, never 403, so its existence is not revealed.

                     public        unlisted      private
    run (Run API)    anyone        anyone        owner (others 404)
    read code        anyone        anyone        owner (others 404)
    listed           to anyone     to owner      to owner
    write            owner (another user 403, no token 401)
    read records     owner (another user 403; for a private val 404; no token 401)
    web endpoint     anyone        anyone        anyone (the code is private, not the endpoint)
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

from runtime.config import Config
from runtime.errors import (
    BadRequestError,
    ForbiddenError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from runtime.health import Health
from runtime.hosts import USER_RE, VAL_RE, val_host
from runtime.http import HTTPRequest, HTTPResponse
from runtime.metrics import Metrics
from runtime.pool import Pool
from runtime.records import Recorder
from runtime.store import AsyncStore, Store, User, ValVersion

if TYPE_CHECKING:  # run_api imports this module
    from runtime.run_api import RunApi

# The Prometheus text exposition format.
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENV_VALUE_BYTES = 64 * 1024
DEFAULT_RUNS_LIMIT = 100
MAX_RUNS_LIMIT = 1000

_USER = r"(?P<user>[^/]+)"
_VAL = r"(?P<val>[^/]+)"
_RUN = r"/v1/run/(?P<target>[^/]+)"
# Eval's code is the rest of the path, slashes and newlines included (`1/2`, `x = 1\nx`).
_EVAL = r"/v1/eval/(?P<code>(?s:.*))"
# The kind: `run` and `eval` answer browsers on other origins (SPEC §5): their answers,
# errors included, get the CORS defaults, their preflights an answer, and RunApi handles
# them. It is also the `kind` label of /metrics.
ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = tuple(
    (method, re.compile(pattern), handler, kind)
    for method, pattern, handler, kind in (
        ("GET", r"/healthz", "healthz", "api"),
        ("GET", r"/metrics", "serve_metrics", "api"),
        ("GET", r"/v1/me", "me", "api"),
        ("GET", rf"/v1/vals/{_USER}", "list_vals", "api"),
        ("PUT", rf"/v1/vals/{_USER}/{_VAL}", "put_val", "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}", "get_val", "api"),
        ("PATCH", rf"/v1/vals/{_USER}/{_VAL}", "patch_val", "api"),
        ("DELETE", rf"/v1/vals/{_USER}/{_VAL}", "delete_val", "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}/versions", "list_versions", "api"),
        ("GET", rf"/v1/vals/{_USER}/{_VAL}/runs", "list_runs", "api"),
        ("GET", r"/v1/me/evals", "list_evals", "api"),
        ("GET", r"/v1/env", "list_env", "api"),
        ("PUT", r"/v1/env/(?P<key>[^/]+)", "put_env", "api"),
        ("DELETE", r"/v1/env/(?P<key>[^/]+)", "delete_env", "api"),
        ("GET", _RUN, "run_val", "run"),
        ("POST", _RUN, "run_val", "run"),
        ("OPTIONS", _RUN, "preflight", "run"),
        ("POST", r"/v1/eval", "eval_code", "eval"),
        ("OPTIONS", r"/v1/eval", "preflight", "eval"),
        ("GET", _EVAL, "eval_code", "eval"),
        ("OPTIONS", _EVAL, "preflight", "eval"),
    )
)
# SPEC §4.1: the legacy Express paths, any method. The val part stops at the first `/`.
EXPRESS_RE = re.compile(r"/(?:v1/express/|express/@)(?P<user>[^/.]+)\.(?P<val>[^/]+)(?P<rest>/.*)?")


@dataclass(frozen=True, slots=True)
class Match:
    handler: str
    params: dict[str, str]
    kind: str


def match_route(method: str, path: str) -> Match:
    allowed = []
    for route_method, pattern, handler, kind in ROUTES:
        found = pattern.fullmatch(path)
        if found:
            if route_method == method or (method == "HEAD" and route_method == "GET"):
                return Match(handler, found.groupdict(), kind)
            allowed.append(route_method)
            if route_method == "GET":
                allowed.append("HEAD")
    if allowed:
        raise MethodNotAllowedError(
            f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            headers=(("allow", ", ".join(allowed)),),
        )
    raise NotFoundError(f"no API route {path}")


def path_kind(path: str) -> str:
    """The kind of an API path, whatever the method: run, eval, or api."""
    for _, pattern, _, kind in ROUTES:
        if kind != "api" and pattern.fullmatch(path):
            return kind
    return "api"


def express_redirect(
    raw_path: str, query_string: str, scheme: str, web_domain: str, port: int | None
) -> str | None:
    """The 308 target for a legacy Express path, or None if `raw_path` is not one."""
    found = EXPRESS_RE.fullmatch(raw_path)
    if not found:
        return None
    user, val = found["user"].lower(), found["val"]
    check_names(user, val)
    netloc = val_host(user, val, web_domain) + (f":{port}" if port else "")
    rest = found["rest"] or "/"
    return f"{scheme}://{netloc}{rest}" + (f"?{query_string}" if query_string else "")


def check_names(user: str, val: str | None = None) -> None:
    if not USER_RE.fullmatch(user):
        raise BadRequestError(
            f"{user!r} is not a valid username: lower-case letters, digits and _, "
            "starting with a letter, at most 39 characters",
            "bad_name",
        )
    if val is not None and not VAL_RE.fullmatch(val):
        raise BadRequestError(
            f"{val!r} is not a valid val name: letters, digits and _, starting with a letter, "
            "at most 48 characters",
            "bad_name",
        )


def may_read(val: ValVersion, caller: User | None) -> bool:
    """Whether `caller` may run the val through the API and read its code and versions."""
    return val.privacy != "private" or (caller is not None and caller.name == val.owner)


def query_int(query_string: str, key: str, high: int) -> int | None:
    """`?key=N` with 1 <= N <= high; None when absent; ValueError when anything else.
    `isascii` first: str.isdigit accepts '²', which int() refuses."""
    values = parse_qs(query_string).get(key)
    if not values:
        return None
    text = values[0]
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= high):
        raise ValueError(text)
    return int(text)


def parse_limit(query_string: str) -> int:
    try:
        limit = query_int(query_string, "limit", MAX_RUNS_LIMIT)
    except ValueError:
        raise BadRequestError(f"limit must be a number from 1 to {MAX_RUNS_LIMIT}") from None
    return DEFAULT_RUNS_LIMIT if limit is None else limit


def val_summary(val: ValVersion, url: str) -> dict[str, object]:
    return {
        "user": val.owner,
        "name": val.name,
        "version": val.version,
        "privacy": val.privacy,
        "url": url,
        "created_at": val.created_at,
    }


Handler = Callable[[HTTPRequest, dict[str, str]], Awaitable[HTTPResponse]]


async def authenticate(store: AsyncStore, request: HTTPRequest) -> User:
    """The token's user; 401 without a valid token."""
    header = request.header("authorization")
    if header is None:
        raise UnauthorizedError("this needs a token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    user = None
    if scheme.lower() == "bearer" and token.strip():
        user = await store.run(Store.user_for_token, token.strip())
    if user is None:
        raise UnauthorizedError("the token is not valid (revoked, mistyped or expired)")
    return user


async def optional_user(store: AsyncStore, request: HTTPRequest) -> User | None:
    """The token's user, None without a token; a token that is sent must be valid (401)."""
    if request.header("authorization") is None:
        return None
    return await authenticate(store, request)


class Api:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        pool: Pool,
        run_api: RunApi,
        recorder: Recorder,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.run_api = run_api
        self.recorder = recorder
        self.metrics = metrics
        self.health = Health(pool, recorder, store)

    async def handle(self, request: HTTPRequest) -> HTTPResponse:
        server = self.config.server
        target = express_redirect(
            request.raw_path,
            request.query_string,
            server.public_scheme,
            server.web_domain,
            request.port,
        )
        if target is not None:
            # 308 keeps the method and the body, unlike 301/302 (RFC 9110 §15.4.9).
            return HTTPResponse(308, [(b"location", target.encode())], cors=True)
        match = match_route(request.method, request.path)
        owner = self.run_api if match.kind != "api" else self
        handler: Handler = getattr(owner, match.handler)
        return await handler(request, match.params)

    def url_for(self, request: HTTPRequest, val: ValVersion) -> str:
        port = request.port
        netloc = val_host(val.owner, val.name, self.config.server.web_domain)
        return f"{self.config.server.public_scheme}://{netloc}" + (f":{port}/" if port else "/")

    async def authenticate(self, request: HTTPRequest) -> User:
        return await authenticate(self.store, request)

    async def optional_user(self, request: HTTPRequest) -> User | None:
        return await optional_user(self.store, request)

    async def owner_only(self, request: HTTPRequest, owner: str) -> User:
        user = await self.authenticate(request)
        if user.name != owner:
            raise ForbiddenError(f"only {owner} may change {owner}'s vals")
        return user

    async def readable_val(self, request: HTTPRequest, params: dict[str, str]) -> ValVersion:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        caller = await self.optional_user(request)
        version = parse_version(request.query_string)
        val = await self.store.run(Store.get_val, owner, name, version)
        if val is None or not may_read(val, caller):
            raise NotFoundError(
                f"no val {owner}/{name}" + (f" version {version}" if version else "")
            )
        return val

    # Handlers, in ROUTES order.

    async def healthz(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        isolation: dict[str, object] = {
            "restricted_python": {"active": True, "detail": "RestrictedPython policy, guards"},
            "facade_imports": {"active": True, "detail": "imports are vetted facades only"},
            **self.pool.isolation,
        }
        problems = await self.health.problems()
        return HTTPResponse.json(
            {
                "status": "degraded" if problems else "ok",
                **({"problems": problems} if problems else {}),
                "isolation": isolation,
                "workers": self.pool.gauges(),
            },
            503 if problems else 200,
        )

    async def serve_metrics(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        text = self.metrics.render(self.pool.stats, self.pool.gauges())
        return HTTPResponse(200, [(b"content-type", PROMETHEUS_TYPE)], text.encode())

    async def me(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await self.authenticate(request)
        return HTTPResponse.json({"username": user.name})

    async def list_vals(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner = params["user"]
        check_names(owner)
        user = await self.optional_user(request)
        if not await self.store.run(Store.user_exists, owner):
            raise NotFoundError(f"no user {owner}")
        privacies = (
            ("public", "unlisted", "private") if user and user.name == owner else ("public",)
        )
        vals = await self.store.run(Store.list_vals, owner, privacies)
        return HTTPResponse.json({"vals": [val_summary(v, self.url_for(request, v)) for v in vals]})

    async def put_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await self.owner_only(request, owner)
        code, privacy = self._val_body(request)
        val, created = await self.store.run(Store.put_val, owner, name, code, privacy)
        # The previous version's workers finish what they are doing, then go.
        self.pool.retire(val.val_id)
        return HTTPResponse.json(
            val_summary(val, self.url_for(request, val)), 201 if created else 200
        )

    def _val_body(self, request: HTTPRequest) -> tuple[str, str | None]:
        limit = self.config.limits.max_source_bytes
        if len(request.body) > limit:
            raise PayloadTooLargeError(f"the val's source is over the {limit}-byte limit")
        privacy = None
        if (request.header("content-type") or "").startswith("application/json"):
            body = request.json()
            if not isinstance(body, dict) or not isinstance(body.get("code"), str):
                raise BadRequestError(
                    'send {"code": "...", "privacy": "..."} or the source as text'
                )
            unknown = set(body) - {"code", "privacy"}
            if unknown:
                raise BadRequestError(f"unknown field(s): {', '.join(sorted(unknown))}")
            code, privacy = body["code"], body.get("privacy")
            if privacy is not None and not isinstance(privacy, str):
                raise BadRequestError("privacy must be a string", "bad_privacy")
        else:
            try:
                code = request.body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError("the val's source is not valid UTF-8") from None
        if not code.strip():
            raise BadRequestError("the val's source is empty")
        return code, privacy

    async def get_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        val = await self.readable_val(request, params)
        return HTTPResponse.json({**val_summary(val, self.url_for(request, val)), "code": val.code})

    async def patch_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await self.owner_only(request, owner)
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"privacy"}:
            raise BadRequestError('send {"privacy": "public" | "unlisted" | "private"}')
        # One transaction: a DELETE racing this PATCH makes it a 404, never a half answer.
        val = await self.store.run(Store.set_privacy, owner, name, str(body["privacy"]))
        if val is None:
            raise NotFoundError(f"no val {owner}/{name}")
        return HTTPResponse.json(val_summary(val, self.url_for(request, val)))

    async def delete_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await self.owner_only(request, owner)
        val_id = await self.store.run(Store.delete_val, owner, name)
        if val_id is None:
            raise NotFoundError(f"no val {owner}/{name}")
        self.pool.retire(val_id)
        return HTTPResponse.json({"deleted": f"{owner}/{name}"})

    async def list_versions(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        latest = await self.readable_val(request, params)
        versions = await self.store.run(Store.versions, latest.owner, latest.name)
        return HTTPResponse.json(
            {"versions": [{"version": v.version, "created_at": v.created_at} for v in versions]}
        )

    async def list_runs(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        caller = await self.authenticate(request)
        limit = parse_limit(request.query_string)
        val = await self.store.run(Store.get_val, owner, name, None)
        if val is None or not may_read(val, caller):
            raise NotFoundError(f"no val {owner}/{name}")
        if caller.name != owner:
            raise ForbiddenError(f"only {owner} may read the invocation records of {owner}/{name}")
        await self.recorder.flush()  # what was invoked before this request is in the answer
        runs = await self.store.run(Store.runs, val, limit)
        return HTTPResponse.json({"runs": [run.to_json() for run in runs]})

    async def list_evals(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        caller = await self.authenticate(request)
        limit = parse_limit(request.query_string)
        await self.recorder.flush()
        runs = await self.store.run(Store.eval_runs, caller.name, limit)
        return HTTPResponse.json({"runs": [run.to_json() for run in runs]})

    async def list_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await self.authenticate(request)
        env = await self.store.run(Store.env, user.name)
        return HTTPResponse.json({"keys": sorted(env)})  # never the values

    async def put_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await self.authenticate(request)
        key = _env_key(params["key"])
        if len(request.body) > MAX_ENV_VALUE_BYTES:
            raise PayloadTooLargeError(f"env values are limited to {MAX_ENV_VALUE_BYTES} bytes")
        try:
            value = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("env values must be UTF-8 text") from None
        await self.store.run(Store.set_env, user.name, key, value)
        # The next invocation of any of this user's vals sees the new env: the env is part
        # of a warm worker's identity, and the old workers (holding the old value) go now.
        self.pool.retire_owner(user.name)
        return HTTPResponse.json({"key": key})

    async def delete_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await self.authenticate(request)
        key = _env_key(params["key"])
        if not await self.store.run(Store.delete_env, user.name, key):
            raise NotFoundError(f"no env key {key}")
        self.pool.retire_owner(user.name)
        return HTTPResponse.json({"deleted": key})


def _env_key(key: str) -> str:
    if not ENV_KEY_RE.fullmatch(key):
        raise BadRequestError(
            f"{quote(key)!r} is not a valid env key: letters, digits and _, "
            "not starting with a digit",
            "bad_name",
        )
    return key


def parse_version(query_string: str) -> int | None:
    """`?v=N` pins a version; absent means the latest."""
    try:
        return query_int(query_string, "v", 2**31 - 1)
    except ValueError as exc:
        raise BadRequestError(
            f"v must be a version number (1, 2, ...), not {exc.args[0]!r}", "bad_version"
        ) from None
