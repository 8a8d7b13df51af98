"""The ASGI app: the one place where a request is routed and where errors become responses.

Read top-down: `__call__` -> `respond` routes by Host -> the API (`runtime.api`) or a val
(`serve_val`, via `runtime.run_api.Runner` and the pool) -> CORS finalization for web hosts
and Run/Eval -> send.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from runtime.api import Api, parse_version, path_kind
from runtime.config import Config
from runtime.cors import finalize_cors
from runtime.errors import BadRequestError, HTTPError, NotFoundError
from runtime.headers import check_request_headers
from runtime.hosts import Route, UnknownHost, ValHost, route_host
from runtime.http import (
    HTTPRequest,
    HTTPResponse,
    answer_lifespan,
    read_body,
    send_response,
)
from runtime.metrics import Metrics
from runtime.pool import Pool
from runtime.records import Recorder
from runtime.reply import ValResponse
from runtime.run_api import RunApi, Runner, val_spec
from runtime.store import AsyncStore

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("valrun.access")


class App:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        pool: Pool,
        recorder: Recorder,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.runner = Runner(config, pool, recorder)
        run_api = RunApi(config, store, self.runner)
        self.api = Api(config, store, pool, run_api, recorder, metrics)

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "http":
            await self.serve_http(scope, receive, send)
        else:  # websockets: not part of valrun (yet); refuse the handshake
            await send({"type": "websocket.close", "code": 1003, "reason": ""})

    async def serve_http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        started = trio.current_time()
        method = scope["method"]
        host = _host_header(scope)
        response = await self.respond(scope, receive, host)
        if response.cors:
            response.headers = finalize_cors(method, list(scope["headers"]), response.headers)
        await send_response(send, response, method)
        elapsed = trio.current_time() - started
        self.metrics.observe(response.kind, response.status, elapsed)
        access_logger.info(
            "%s %s %s %d %.1fms %dB",
            method,
            host or "-",
            loggable_path(scope["path"]),
            response.status,
            elapsed * 1000,
            len(response.body),
        )

    async def respond(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, host: str | None
    ) -> HTTPResponse:
        server = self.config.server
        kind = "unknown"  # the front end's errors on web and unknown hosts get CORS too
        try:
            route = route_host(host, server.api_host, server.web_domain)
            kind = request_kind(route, scope["path"])
            check_request_headers(
                scope["method"],
                scope.get("raw_path") or scope["path"].encode(),
                scope["query_string"],
                scope["headers"],
                self.config.limits,
            )
            if isinstance(route, UnknownHost):
                raise NotFoundError(
                    f"no valrun service at {route.host!r}: vals live at "
                    f"USER-VAL.{server.web_domain}, the API at {server.api_host}",
                    "unknown_host",
                )
            body = await read_body(scope, receive, self.config.limits.max_request_body_bytes)
            request = HTTPRequest(
                method=scope["method"],
                scheme=scope["scheme"],
                host=host or "",
                path=scope["path"],
                raw_path=(scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
                query_string=scope["query_string"].decode("latin-1"),
                headers=list(scope["headers"]),
                body=body,
            )
            if isinstance(route, ValHost):
                response = await self.serve_val(route, request)
            else:
                response = await self.api.handle(request)
        except HTTPError as exc:
            response = HTTPResponse.from_error(exc, cors=kind != "api")
        except Exception:
            # A bug in valrun, not the client's or the val's fault: log it, answer JSON.
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            error = HTTPError("valrun failed on this request; its log has the details")
            response = HTTPResponse.from_error(error, cors=kind != "api")
        response.kind = kind
        return response

    async def serve_val(self, route: ValHost, request: HTTPRequest) -> HTTPResponse:
        # Privacy does not apply here: a private val's code is private, its endpoint is not.
        version = web_version(request.query_string)
        resolved = await self.store.resolve(route.user, route.val, version)
        if resolved is None:
            raise NotFoundError(
                f"no val {route.user}/{route.val}" + (f" version {version}" if version else ""),
                "unknown_val",
            )
        spec = val_spec(*resolved, self.config.server.web_domain)
        head: dict[str, object] = {
            "op": "http",
            "method": request.method,
            "url": f"{self.config.server.public_scheme}://{request.host}{_with_query(request)}",
            "path": request.raw_path,
            "query": request.query_string,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
        }
        response = await self.runner.invoke(
            spec, head, request.body, source="web", expect=ValResponse
        )
        return HTTPResponse(response.status, response.headers, response.body, cors=True)


def request_kind(route: Route, path: str) -> str:
    """What answers: web (a val's host), run, eval, api, or unknown. The /metrics label,
    and CORS: everything but `api` gets it."""
    if isinstance(route, ValHost):
        return "web"
    if isinstance(route, UnknownHost):
        return "unknown"
    return path_kind(path)


def web_version(query_string: str) -> int | None:
    """`?v=N` pins a version on a web host too; the val still sees its whole query."""
    try:
        return parse_version(query_string)
    except BadRequestError:
        # The query is the val's: a `v` that is no version number is its own business.
        return None


def loggable_path(path: str) -> str:
    """The path for the access log: Eval's code is its request's payload, and payloads are
    not logged (it may hold a secret, and it may be 64 KiB long)."""
    return "/v1/eval/…" if path.startswith("/v1/eval/") else path


def _with_query(request: HTTPRequest) -> str:
    return request.raw_path + (f"?{request.query_string}" if request.query_string else "")


def _host_header(scope: HTTPScope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"host":
            return value.decode("latin-1")
    return None
