"""The front end's own request and response values, and the ASGI edge that reads and writes them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope

from runtime import strictjson
from runtime.errors import (
    BadRequestError,
    ClientGoneError,
    HTTPError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from runtime.hosts import split_host

Headers = list[tuple[bytes, bytes]]
#: What answers a request: a val's web host, the Run API, the Eval API, the management API,
#: or nobody (a host valrun does not serve). The /metrics label; all but `api` get CORS.
RouteLabel = Literal["web", "run", "eval", "api", "unknown"]
JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)


@dataclass(frozen=True, slots=True)
class HTTPRequest:
    method: str
    scheme: str
    host: str  # the Host header as sent
    path: str  # percent-decoded, for API routing
    raw_path: str  # as sent, for vals and redirects
    query_string: str
    headers: Headers
    body: bytes = b""

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        values = [v.decode("latin-1") for k, v in self.headers if k.lower() == key]
        return ", ".join(values) if values else None

    @property
    def port(self) -> int | None:
        return split_host(self.host)[1]

    def json(self) -> Any:
        try:
            return strictjson.loads(self.body)
        except ValueError as exc:
            raise BadRequestError(
                f"the request body is not valid JSON: {exc}", "bad_json"
            ) from None


@dataclass(slots=True)
class HTTPResponse:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    #: Whether the CORS finalizer applies (web hosts, Run and Eval).
    cors: bool = False
    #: What answered, for /metrics.
    label: RouteLabel = "unknown"

    @classmethod
    def json(cls, obj: object, status: int = 200, *, cors: bool = False) -> HTTPResponse:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, list(JSON_HEADERS), body, cors)

    @classmethod
    def from_error(cls, error: HTTPError, *, cors: bool) -> HTTPResponse:
        response = cls.json(error.body(), error.status, cors=cors)
        response.headers += [(k.encode(), v.encode()) for k, v in error.headers]
        return response


async def answer_lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Complete ASGI startup and shutdown: hypercorn's trio worker fails to start otherwise."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(
    scope: HTTPScope, receive: ASGIReceiveCallable, max_bytes: int, timeout_s: float = math.inf
) -> bytes:
    """The whole request body, refused with 413 as soon as it is known to be over the limit,
    and with 408 (closing the connection) when it has not all arrived within `timeout_s`: a
    client trickling a body would otherwise hold its connection for ever."""
    declares_body = False
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"content-length":
            declares_body = True
            if value.isdigit() and int(value) > max_bytes:
                raise _too_large(max_bytes)
        elif name == b"transfer-encoding":
            declares_body = True
    if not declares_body and scope["http_version"] in ("1.0", "1.1"):
        # RFC 9112 §6.3: in HTTP/1.x, no Content-Length and no Transfer-Encoding is a
        # request without a body; hypercorn has queued its (empty) end with the head, so
        # there is nothing to wait for and nothing to time. (HTTP/2 frames a body without
        # either header: it keeps the deadline.)
        return await _read_all(receive, max_bytes)
    with trio.move_on_after(timeout_s):
        return await _read_all(receive, max_bytes)
    raise RequestTimeoutError(
        f"the request body did not arrive within {timeout_s:g} s (server.body_timeout_s)",
        headers=(("connection", "close"),),
    )


async def _read_all(receive: ASGIReceiveCallable, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            # Hypercorn does not cancel the app when a client goes; a half-sent body must
            # not reach a val as if it were whole.
            raise ClientGoneError("the client disconnected before its request was complete")
        chunk = message["body"]
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"the request body is over the {max_bytes}-byte limit")


# RFC 9110 §8.6, §15.3.5, §15.4.5: these carry no content, and a Content-Length on them
# could be read by a proxy as the length of the next response's bytes.
NO_CONTENT_STATUSES = frozenset({204, 205, 304})


async def send_response(send: ASGISendCallable, response: HTTPResponse, method: str) -> None:
    headers = list(response.headers)
    if response.status not in NO_CONTENT_STATUSES:
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    no_body = method == "HEAD" or response.status in NO_CONTENT_STATUSES
    body = b"" if no_body else response.body
    await send({"type": "http.response.body", "body": body, "more_body": False})
