"""The management API (docs/contract.md §4.4), legacy Express redirects (§4.1) and health.

Handlers are methods of `Api`; `runtime.routes` maps paths to them. Who may do what is
decided with `runtime.auth`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from urllib.parse import quote

from runtime import schedule_api
from runtime.auth import (
    authenticate,
    check_names,
    may_read,
    optional_user,
    owner_only,
    parse_limit,
    parse_version,
)
from runtime.config import Config
from runtime.errors import BadRequestError, ForbiddenError, NotFoundError, PayloadTooLargeError
from runtime.follow import Followers, parse_follow
from runtime.frontdoor import ConnectionCaps
from runtime.health import Health
from runtime.hosts import val_host
from runtime.http import HTTPRequest, HTTPResponse
from runtime.metrics import Metrics
from runtime.pool import Pool
from runtime.records import Recorder
from runtime.routes import EXPRESS
from runtime.savecheck import SaveChecks
from runtime.store import AsyncStore, Store, ValVersion

# The Prometheus text exposition format.
PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_ENV_VALUE_BYTES = 64 * 1024


def express_target(
    raw_path: str, query_string: str, scheme: str, web_domain: str, port: int | None
) -> str | None:
    """The 308 target for a legacy Express path, or None if `raw_path` is not one."""
    found = re.fullmatch(EXPRESS, raw_path)
    if not found:
        return None
    user, val = found["user"].lower(), found["val"]
    check_names(user, val)
    netloc = val_host(user, val, web_domain) + (f":{port}" if port else "")
    rest = found["rest"] or "/"
    return f"{scheme}://{netloc}{rest}" + (f"?{query_string}" if query_string else "")


def val_summary(val: ValVersion, url: str) -> dict[str, object]:
    return {
        "user": val.owner,
        "name": val.name,
        "version": val.version,
        "privacy": val.privacy,
        "url": url,
        "created_at": val.created_at,
    }


class Api:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        pool: Pool,
        recorder: Recorder,
        metrics: Metrics,
        usage: Callable[[str], Awaitable[dict[str, object]]] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.recorder = recorder
        self.metrics = metrics
        self.followers = Followers(recorder)
        self.save_checks = SaveChecks(config, pool, store)
        #: A user's storage use, for /v1/me (runtime.storage_api).
        self.usage = usage
        self.health = Health(pool, recorder, store)
        #: Open client connections, counted at accept (runtime.frontdoor).
        self.connections = ConnectionCaps.from_config(config.server)

    def url_for(self, request: HTTPRequest, val: ValVersion) -> str:
        port = request.port
        netloc = val_host(val.owner, val.name, self.config.server.web_domain)
        return f"{self.config.server.public_scheme}://{netloc}" + (f":{port}/" if port else "/")

    async def readable_val(self, request: HTTPRequest, params: dict[str, str]) -> ValVersion:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        caller = await optional_user(self.store, request)
        version = parse_version(request.query_string)
        val = await self.store.call(Store.get_val, owner, name, version)
        if val is None or not may_read(val, caller):
            raise NotFoundError(
                f"no val {owner}/{name}" + (f" version {version}" if version else "")
            )
        return val

    # Handlers, in the order of runtime.routes.

    async def express_redirect(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        server = self.config.server
        target = express_target(
            request.raw_path,
            request.query_string,
            server.public_scheme,
            server.web_domain,
            request.port,
        )
        if target is None:  # the route matched the decoded path; the raw one is not a val's
            raise NotFoundError(f"no API route {request.path}")
        # 308 keeps the method and the body, unlike 301/302 (RFC 9110 §15.4.9).
        return HTTPResponse(308, [(b"location", target.encode())], cors=True)

    async def healthz(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        isolation: dict[str, object] = {
            "restricted_python": {"active": True, "detail": "RestrictedPython policy, guards"},
            "facade_imports": {"active": True, "detail": "imports are vetted facades only"},
            **self.pool.isolation,
        }
        problems = await self.health.problems()
        status = "draining" if self.health.draining else "degraded" if problems else "ok"
        return HTTPResponse.json(
            {
                "status": status,
                **({"problems": problems} if problems else {}),
                "isolation": isolation,
                "workers": self.pool.gauges(),
                "log_followers": self.followers.waiting,
                "connections": self.connections.gauges(),
                # Which front-end process answered: with server.processes > 1 each has its own
                # pool, so these figures are that process's (docs/deploy.md §3).
                "process": os.getpid(),
            },
            200 if status == "ok" else 503,
        )

    async def serve_metrics(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        text = self.metrics.render(self.pool.stats, self.pool.gauges())
        return HTTPResponse(200, [(b"content-type", PROMETHEUS_TYPE)], text.encode())

    async def me(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        body: dict[str, object] = {"username": user.name, "quotas": asdict(self.config.quotas)}
        if self.usage is not None:
            body["storage"] = await self.usage(user.name)
        return HTTPResponse.json(body)

    async def list_vals(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner = params["user"]
        check_names(owner)
        user = await optional_user(self.store, request)
        if not await self.store.call(Store.user_exists, owner):
            raise NotFoundError(f"no user {owner}")
        privacies = (
            ("public", "unlisted", "private") if user and user.name == owner else ("public",)
        )
        vals = await self.store.call(Store.list_vals, owner, privacies)
        return HTTPResponse.json({"vals": [val_summary(v, self.url_for(request, v)) for v in vals]})

    async def put_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await owner_only(self.store, request, owner)
        code, privacy = self._val_body(request)
        # A new val over the quota is refused before a worker spends time on its code.
        await self.store.call(Store.check_new_val, owner, name, self.config.quotas)
        await self.save_checks.check(owner, name, code)  # 400 bad_code: it could not load
        val, created = await self.store.call(
            Store.put_val, owner, name, code, privacy, self.config.quotas
        )
        # The previous version's workers finish what they are doing, then go; so do those
        # of the vals that import it.
        self.pool.val_changed(val.val_id)
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
        await owner_only(self.store, request, owner)
        body = request.json()
        if not isinstance(body, dict) or set(body) != {"privacy"}:
            raise BadRequestError('send {"privacy": "public" | "unlisted" | "private"}')
        # One transaction: a DELETE racing this PATCH makes it a 404, never a half answer.
        val = await self.store.call(Store.set_privacy, owner, name, str(body["privacy"]))
        if val is None:
            raise NotFoundError(f"no val {owner}/{name}")
        self.pool.val_changed(val.val_id)  # its importers may no longer import it
        return HTTPResponse.json(val_summary(val, self.url_for(request, val)))

    async def delete_val(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await owner_only(self.store, request, owner)
        val_id = await self.store.call(Store.delete_val, owner, name)
        if val_id is None:
            raise NotFoundError(f"no val {owner}/{name}")
        self.pool.val_changed(val_id)
        return HTTPResponse.json({"deleted": f"{owner}/{name}"})

    async def delete_version(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        """Retire one old version (one that printed a secret, say); not the latest."""
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        await owner_only(self.store, request, owner)
        version = int(params["version"])  # the route matched digits only
        if not 0 < version < 2**31:
            raise NotFoundError(f"{owner}/{name} has no version {params['version']}")
        await self.recorder.flush()  # its records go too, those still queued included
        val_id = await self.store.call(Store.delete_version, owner, name, version)
        self.pool.val_changed(val_id)  # its warm workers go; the latest's start again on demand
        return HTTPResponse.json({"deleted": f"{owner}/{name}", "version": version})

    async def list_versions(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        latest = await self.readable_val(request, params)
        # Numbers and times only: a listing never reads every version's code.
        versions = await self.store.call(Store.version_list, latest.owner, latest.name)
        return HTTPResponse.json(
            {"versions": [{"version": n, "created_at": at} for n, at in versions]}
        )

    async def list_records(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        owner, name = params["user"], params["val"]
        check_names(owner, name)
        caller = await authenticate(self.store, request)
        limit = parse_limit(request.query_string)
        val = await self.store.call(Store.get_val, owner, name, None)
        if val is None or not may_read(val, caller):
            raise NotFoundError(f"no val {owner}/{name}")
        if caller.name != owner:
            raise ForbiddenError(f"only {owner} may read the invocation records of {owner}/{name}")
        follow = parse_follow(request.query_string)
        runs = await self.followers.fetch(
            caller.name,
            ("val", val.val_id),
            follow,
            lambda: self.store.call(Store.records, val, limit, follow.after),
        )
        return HTTPResponse.json({"runs": [run.to_json() for run in runs]})

    # Schedules: handled in runtime.schedule_api.

    async def get_schedule(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        return await schedule_api.get_schedule(self, request, params)

    async def put_schedule(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        return await schedule_api.put_schedule(self, request, params)

    async def delete_schedule(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        return await schedule_api.delete_schedule(self, request, params)

    async def list_eval_records(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        caller = await authenticate(self.store, request)
        limit = parse_limit(request.query_string)
        follow = parse_follow(request.query_string)
        runs = await self.followers.fetch(
            caller.name,
            ("evals", caller.name),
            follow,
            lambda: self.store.call(Store.eval_records, caller.name, limit, follow.after),
        )
        return HTTPResponse.json({"runs": [run.to_json() for run in runs]})

    async def list_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        keys = await self.store.call(Store.env_keys, user.name)
        return HTTPResponse.json({"keys": keys})  # never the values: not even read

    async def put_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        key = _env_key(params["key"])
        if len(request.body) > MAX_ENV_VALUE_BYTES:
            raise PayloadTooLargeError(f"env values are limited to {MAX_ENV_VALUE_BYTES} bytes")
        try:
            value = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequestError("env values must be UTF-8 text") from None
        await self.store.call(
            Store.set_env, user.name, key, value, self.config.quotas, self.config.limits
        )
        # The next invocation of any of this user's vals sees the new env: the env is part
        # of a warm worker's identity, and the old workers (holding the old value) go now.
        self.pool.retire_user(user.name)
        return HTTPResponse.json({"key": key})

    async def delete_env(self, request: HTTPRequest, params: dict[str, str]) -> HTTPResponse:
        user = await authenticate(self.store, request)
        key = _env_key(params["key"])
        if not await self.store.call(Store.delete_env, user.name, key):
            raise NotFoundError(f"no env key {key}")
        self.pool.retire_user(user.name)
        return HTTPResponse.json({"deleted": key})


def _env_key(key: str) -> str:
    if not ENV_KEY_RE.fullmatch(key):
        raise BadRequestError(
            f"{quote(key)!r} is not a valid env key: letters, digits and _, "
            "not starting with a digit",
            "bad_name",
        )
    return key
