"""The baseline for scripts/bench: a bare hypercorn-trio ASGI app that answers what the hello
val answers, with the hypercorn settings valrun uses (runtime.server.hypercorn_config).

    python scripts/hello_app.py --bind 127.0.0.1:8099 [--front-door | --workers N]

`--front-door` serves it through valrun's accept path (runtime.frontdoor: connections counted
and capped, cleartext HTTP/2 refused) instead of hypercorn's own `serve`, to measure what that
path costs (scripts/frontdoor_bench).

With `--workers N` (N > 1) hypercorn's own worker model serves it: N processes, each binding
the port with SO_REUSEPORT (scripts/bench_processes' baseline for valrun's processes).
"""

from __future__ import annotations

import argparse
import json
import signal
from collections.abc import Sequence

import trio
from hypercorn.config import Config
from hypercorn.run import run as run_workers
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from runtime.config import ServerConfig
from runtime.frontdoor import ConnectionCaps, serve_app
from runtime.http import answer_lifespan

BODY = json.dumps({"greeting": "hi world"}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def hello(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
    elif scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY, "more_body": False})


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8099", metavar="HOST:PORT")
    parser.add_argument("--front-door", action="store_true", help="valrun's accept path")
    parser.add_argument("--workers", type=int, default=1, metavar="N")
    args = parser.parse_args(argv)
    config = Config()
    config.bind = [args.bind]
    config.accesslog = None
    config.include_server_header = False
    if args.workers > 1:
        config.workers = args.workers
        config.worker_class = "trio"
        config.application_path = "hello_app:hello"
        run_workers(config)
        return

    async def run() -> None:
        if args.front_door:
            caps = ConnectionCaps.from_config(ServerConfig())
            await serve_app(hello, config, caps, h2c=False, shutdown_trigger=_wait_for_signal)
        else:
            await serve(hello, config, shutdown_trigger=_wait_for_signal)

    trio.run(run)


if __name__ == "__main__":
    main()
