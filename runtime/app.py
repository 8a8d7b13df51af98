"""The ASGI app: the one place where a request is routed and where errors become responses.

Read top-down: `__call__` -> `respond` routes by Host -> a val (`serve_val`, through
`runtime.invoke.Invoker` and the pool) or an API route (`runtime.routes`, matched once) ->
CORS finalization for web hosts and Run/Eval -> send.
"""

from __future__ import annotations

import logging

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from runtime.abandon import Abandonment
from runtime.accesslog import access_line, access_logger, log_access
from runtime.api import Api
from runtime.auth import parse_version
from runtime.bounds import check_request_fields
from runtime.config import Config, ServerConfig
from runtime.cors import finalize_cors
from runtime.errors import BadRequestError, HTTPError, NotFoundError, StoreError, http_error
from runtime.forwarded import client_address, parse_networks
from runtime.headers import check_request_headers
from runtime.hosts import ApiHost, Route, UnknownHost, ValHost, route_host
from runtime.http import (
    HTTPRequest,
    HTTPResponse,
    RouteLabel,
    answer_lifespan,
    read_body,
    send_response,
)
from runtime.invoke import Invoker, val_spec
from runtime.logsafe import printable
from runtime.metrics import Metrics
from runtime.pool import Pool
from runtime.records import Recorder, loggable_path
from runtime.reply import ValResponse
from runtime.routes import api_routes, match_route
from runtime.run_api import RunApi
from runtime.storage_api import StorageApi
from runtime.store import AsyncStore
from runtime.target import decoded_path, origin_form
from sandbox.messages import HttpRequest

logger = logging.getLogger(__name__)


class App:
    def __init__(
        self,
        config: Config,
        store: AsyncStore,
        pool: Pool,
        recorder: Recorder,
        metrics: Metrics,
        storage: StorageApi,
    ) -> None:
        self.config = config
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.invoker = Invoker(config, pool, recorder)
        self.api = Api(config, store, pool, recorder, metrics, storage.usage)
        self.routes = api_routes(self.api, RunApi(config, store, self.invoker), storage)
        self.proxies = parse_networks(config.server.trusted_proxies)
        #: Stops the work of requests whose clients leave; its `serve` runs beside the app.
        self.abandonment = Abandonment()

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
        self.metrics.observe(response.label, response.status, elapsed)
        if not access_logger.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        address = client_address(
            client[0] if client else None,
            scope["headers"],
            self.proxies,
            self.config.server.forwarded_header,
        )
        log_access(
            access_line(
                address,
                method,
                host,
                loggable_path(scope["path"]),
                response.status,
                elapsed,
                len(response.body),
            ),
        )

    async def respond(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, host: str | None
    ) -> HTTPResponse:
        server = self.config.server
        label: RouteLabel = "unknown"  # errors on web and unknown hosts get CORS too
        try:
            scope = served_target(scope, host)
            if is_health_probe(scope["method"], scope["path"], host, server):
                route: Route = ApiHost()
                host = server.api_host  # whatever the probe sent (an address, nothing)
            else:
                route = route_host(host, server.api_host, server.web_domain)
            check_request_headers(
                scope["method"],
                scope.get("raw_path") or scope["path"].encode(),
                scope["query_string"],
                scope["headers"],
                self.config.limits,
            )
            if isinstance(route, ValHost):
                label = "web"
            elif isinstance(route, UnknownHost):
                raise NotFoundError(
                    f"no valrun service at {route.host!r}: vals live at "
                    f"USER-VAL.{server.web_domain}, the API at {server.api_host}",
                    "unknown_host",
                )
            else:
                match = match_route(self.routes, scope["method"], scope["path"])
                label = match.label
            body = await read_body(
                scope,
                receive,
                self.config.limits.max_request_body_bytes,
                self.config.server.body_timeout_s,
            )
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
            # An invocation whose client leaves is stopped (runtime.abandon); management
            # calls are short and run to the end.
            if isinstance(route, ValHost):
                check_request_fields(request, self.config.limits)
                response = await self.abandonment.unless_abandoned(
                    receive, lambda: self.serve_val(route, request)
                )
            elif label in ("run", "eval"):
                response = await self.abandonment.unless_abandoned(
                    receive, lambda: match.handler(request, match.params)
                )
            else:
                response = await match.handler(request, match.params)
        except HTTPError as exc:
            response = HTTPResponse.from_error(exc, cors=label != "api")
        except StoreError as exc:
            response = HTTPResponse.from_error(http_error(exc), cors=label != "api")
        except Exception:
            # A bug in valrun, not the client's or the val's fault: log it, answer JSON.
            logger.exception(
                "unhandled error on %s %s", printable(scope["method"]), printable(scope["path"])
            )
            error = HTTPError("valrun failed on this request; its log has the details")
            response = HTTPResponse.from_error(error, cors=label != "api")
        response.label = label
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
        invocation = HttpRequest(
            id=0,  # the pool numbers each invocation it sends
            method=request.method,
            url=f"{self.config.server.public_scheme}://{request.host}{_with_query(request)}",
            path=request.raw_path,
            query=request.query_string,
            headers=tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers),
            body=request.body,
        )
        response = await self.invoker.invoke(
            spec, invocation, source="web", expect=ValResponse, origin=request
        )
        return HTTPResponse(response.status, response.headers, response.body, cors=True)


def served_target(scope: HTTPScope, host: str | None) -> HTTPScope:
    """`scope` with an absolute-form target made its origin form (runtime.target): 400 when
    it names another authority than `Host`."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    path = origin_form(raw_path, host, scope["scheme"])
    if path is raw_path:
        return scope
    served = scope.copy()
    served["raw_path"], served["path"] = path, decoded_path(path)
    return served


def is_health_probe(method: str, path: str, host: str | None, server: ServerConfig) -> bool:
    """`GET /healthz` on any host but a val's: load balancers probe by IP address, or with
    no Host at all. A val's own host keeps every path, /healthz included."""
    if path != "/healthz" or method not in ("GET", "HEAD"):
        return False
    try:
        return not isinstance(route_host(host, server.api_host, server.web_domain), ValHost)
    except BadRequestError:
        return True


def web_version(query_string: str) -> int | None:
    """`?v=N` pins a version on a web host too; the val still sees its whole query."""
    try:
        return parse_version(query_string)
    except BadRequestError:
        # The query is the val's: a `v` that is no version number is its own business.
        return None


def _with_query(request: HTTPRequest) -> str:
    return request.raw_path + (f"?{request.query_string}" if request.query_string else "")


def _host_header(scope: HTTPScope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"host":
            return value.decode("latin-1")
    return None
