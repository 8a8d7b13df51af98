"""A real HTTP server on 127.0.0.1:0 for vals to fetch from: the outside world, on loopback.

Each path is one behaviour a remote site can have (echo, slow, endless, oversized,
redirecting); `serve_remote` reports the base URL once the socket is listening.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope


async def _respond(
    send: ASGISendCallable, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


Arrived = Callable[[str], None]


def _ignore(path: str) -> None:
    pass


async def app(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable, arrived: Arrived = _ignore
) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert scope["type"] == "http"
    body = b""
    while True:
        message: Any = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            break
    path: str = scope["path"]
    arrived(path)
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    text = [(b"content-type", b"text/plain")]
    if path == "/echo":
        seen = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "body": body.decode("utf-8", "replace"),
            "client_port": (scope.get("client") or ("", None))[1],
        }
        await _respond(
            send, 200, json.dumps(seen).encode(), [(b"content-type", b"application/json")]
        )
    elif path == "/slow":
        await trio.sleep(float(query.get("s", "1")))
        await _respond(send, 200, b"slow answer", text)
    elif path == "/forever":
        await send({"type": "http.response.start", "status": 200, "headers": text})
        while True:
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            await trio.sleep(0.01)
    elif path == "/big":
        size = int(query["n"])
        if query.get("chunked"):
            await send({"type": "http.response.start", "status": 200, "headers": text})
            for _ in range(size // 65536 + 1):
                await send({"type": "http.response.body", "body": b"y" * 65536, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await _respond(send, 200, b"y" * size, text)
    elif path == "/redirect":
        status = int(query.get("status", "302"))
        await _respond(send, status, b"", [(b"location", query["to"].encode())])
    elif path == "/loop":
        await _respond(send, 302, b"", [(b"location", b"/loop")])
    else:
        await _respond(send, 404, b"no such path", text)


async def serve_remote(
    *,
    tls: tuple[str, str] | None = None,
    arrived: Arrived = _ignore,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on 127.0.0.1 until cancelled; report `http://127.0.0.1:PORT` (https with
    `tls`, the paths of a certificate chain and its key). `arrived` is called with the path of
    each request as it arrives."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    if tls is not None:
        config.certfile, config.keyfile = tls
    config.accesslog = None
    config.graceful_timeout = 0
    async with trio.open_nursery() as nursery:
        bound = functools.partial(app, arrived=arrived)
        urls: list[str] = await nursery.start(functools.partial(serve, bound, config))
        task_status.started(urls[0])
