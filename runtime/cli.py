"""The `valrun` command: serve, admin tasks on the store, and val commands over the API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

import trio

from runtime.config import Config, load_config, with_bind
from runtime.demo import seed_demo
from runtime.errors import ConfigError, HTTPError, StartupError
from runtime.server import serve_until_signalled
from runtime.startup import explain, store_problem
from runtime.store import Store

logger = logging.getLogger("valrun")


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    if args.bind:
        config = with_bind(config, tuple(args.bind))
    if args.demo:
        with closing(Store(config.store.sqlite_path)) as store:
            token = seed_demo(store)
        port = config.server.bind[0].rpartition(":")[2]
        print(f"demo vals: http://demo-hello.{config.server.web_domain}:{port}/?name=you")
        print(f"demo token (for the API at http://{config.server.api_host}:{port}/): {token}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve_until_signalled, config)
            logger.info("valrun is serving on %s", ", ".join(urls))

    try:
        trio.run(main)
    except Exception as exc:
        # What the operator must fix is one line; anything else is a bug, and its traceback
        # is what a bug report needs.
        message = explain(exc, config)
        if message is None or args.debug:
            raise
        raise StartupError(message) from None
    return 0


def cmd_user_create(config: Config, args: argparse.Namespace) -> int:
    with closing(Store(config.store.sqlite_path)) as store:
        token = store.create_user(args.name)
    print(f"created user {args.name}; its token (shown only once):")
    print(token)
    return 0


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    with closing(Store(config.store.sqlite_path)) as store:
        if args.token_command == "create":
            token = store.create_token(args.name)
            print(f"a new token for {args.name} (shown only once):")
            print(token)
        elif args.token_command == "list":
            for info in store.tokens(args.name):
                state = "active" if info.revoked_at is None else f"revoked {_when(info.revoked_at)}"
                print(f"{info.id}\tcreated {_when(info.created_at)}\t{state}")
        else:
            store.revoke_token(args.id)
            print(f"revoked token {args.id}")
    return 0


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def cmd_config_check(config: Config, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    print(json.dumps(asdict(config), indent=2))
    return 0


class ApiClient:
    """A small synchronous client for the management API (the CLI needs nothing more)."""

    def __init__(self, config: Config, server: str | None, token: str | None) -> None:
        bind = config.server.bind[0]
        host, _, port = bind.rpartition(":")
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        self.base = (server or f"http://{host}:{port}").rstrip("/")
        # Without --server: connect to the bound address and name the API host in the Host
        # header (*.localhost does not resolve everywhere outside browsers). With --server,
        # its own host name is the right one.
        self.host_header = None if server else f"{config.server.api_host}:{port}"
        self.token = token or os.environ.get("VALRUN_TOKEN")

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> object:
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if self.host_header is not None:
            request.add_header("Host", self.host_header)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")
            raise SystemExit(f"valrun: {method} {path} answered {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"valrun: cannot reach {self.base}: {exc.reason}") from None


def _user_val(text: str) -> tuple[str, str]:
    user, slash, val = text.partition("/")
    if not slash or not user or not val:
        raise SystemExit(f"valrun: expected USER/VAL, got {text!r}")
    return user, val


def cmd_val(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    if args.val_command == "list":
        result = client.call("GET", f"/v1/vals/{args.user}")
    else:
        user, val = _user_val(args.target)
        path = f"/v1/vals/{user}/{val}"
        if args.val_command == "put":
            code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            payload = {"code": code, **({"privacy": args.privacy} if args.privacy else {})}
            result = client.call("PUT", path, json.dumps(payload).encode(), "application/json")
        elif args.val_command == "get":
            result = client.call("GET", path + (f"?v={args.v}" if args.v else ""))
            if isinstance(result, dict) and not args.json:
                print(result.get("code", ""), end="")
                return 0
        else:
            result = client.call("DELETE", path)
    print(json.dumps(result, indent=2))
    return 0


def _json_arg(text: str) -> object:
    """A command-line arg: JSON when it is JSON (`1`, `true`, `[1]`, `"1"`), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print_json(result: object) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False))


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    user, dot, val = args.target.partition(".")
    if not dot or not user or not val:
        raise SystemExit(f"valrun: expected USER.VAL, got {args.target!r}")
    path = f"/v1/run/{user}.{val}" + (f"?v={args.v}" if args.v else "")
    body = json.dumps([_json_arg(a) for a in args.args]).encode()
    _print_json(client.call("POST", path, body, "application/json"))
    return 0


def cmd_eval(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    payload: dict[str, object] = {"code": args.code}
    if args.args:
        payload["args"] = [_json_arg(a) for a in args.args]
    body = json.dumps(payload).encode()
    _print_json(client.call("POST", "/v1/eval", body, "application/json"))
    return 0


def cmd_env(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    if args.env_command == "list":
        result = client.call("GET", "/v1/env")
        keys = result.get("keys", []) if isinstance(result, dict) else []
        print("\n".join(str(key) for key in keys))
        return 0
    path = f"/v1/env/{quote(args.key, safe='')}"
    if args.env_command == "unset":
        client.call("DELETE", path)
        return 0
    # From stdin unless given: a secret on the command line ends up in the shell's history.
    value = sys.stdin.read().removesuffix("\n") if args.value is None else args.value
    client.call("PUT", path, value.encode())
    return 0


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    if args.target is None:
        path = "/v1/me/evals"
    else:
        user, val = _user_val(args.target)
        path = f"/v1/vals/{user}/{val}/runs"
    result = client.call("GET", f"{path}?limit={args.limit}")
    runs = result.get("runs", []) if isinstance(result, dict) else []
    if args.json:
        _print_json(runs)
        return 0
    for run in reversed(runs):  # oldest first, as a log reads
        version = f"v{run['version']}" if run["version"] is not None else "-"
        print(
            f"{_when(run['time'])} {run['source']:4} {version:>4} {run['status']} "
            f"{run['duration_ms']:.1f}ms"
        )
        if run["error"]:
            print(f"  error {run['error']['type']}: {run['error']['message']}")
        for line in run["log"].splitlines():
            print(f"  | {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valrun", description=__doc__)
    parser.add_argument("--config", help="path to valrun.toml (default: built-in defaults)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on (repeatable; overrides server.bind)",
    )
    serve.add_argument("--demo", action="store_true", help="seed a demo user and vals")
    serve.set_defaults(func=cmd_serve)

    user = commands.add_parser("user", help="users (directly on the store)")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    create = user_commands.add_parser("create", help="create a user; prints its token last")
    create.add_argument("name")
    create.set_defaults(func=cmd_user_create)

    token = commands.add_parser("token", help="API tokens (directly on the store)")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_create = token_commands.add_parser("create", help="a new token; printed last, once")
    token_create.add_argument("name")
    token_list = token_commands.add_parser("list", help="a user's tokens (ids, never tokens)")
    token_list.add_argument("name")
    token_revoke = token_commands.add_parser("revoke", help="revoke a token by its id")
    token_revoke.add_argument("id", type=int)
    for sub in (token_create, token_list, token_revoke):
        sub.set_defaults(func=cmd_token)

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate and print the effective config")
    check.set_defaults(func=cmd_config_check)

    val = commands.add_parser("val", help="vals, through the management API")
    val.add_argument("--server", help="base URL of a running valrun (default: from server.bind)")
    val.add_argument("--token", help="API token (default: $VALRUN_TOKEN)")
    val_commands = val.add_subparsers(dest="val_command", required=True)
    put = val_commands.add_parser("put", help="save a new version from FILE (- for stdin)")
    put.add_argument("target", metavar="USER/VAL")
    put.add_argument("file")
    put.add_argument("--privacy", choices=("public", "unlisted", "private"))
    get = val_commands.add_parser("get", help="print a val's code (--json for metadata)")
    get.add_argument("target", metavar="USER/VAL")
    get.add_argument("--v", type=int, help="a pinned version")
    get.add_argument("--json", action="store_true")
    listing = val_commands.add_parser("list", help="list a user's vals")
    listing.add_argument("user")
    delete = val_commands.add_parser("delete", help="delete a val and all its versions")
    delete.add_argument("target", metavar="USER/VAL")
    for sub in (put, get, listing, delete):
        sub.set_defaults(func=cmd_val)

    # Commands over the API take the same --server and --token as `val`.
    api = argparse.ArgumentParser(add_help=False)
    api.add_argument("--server", help="base URL of a running valrun (default: from server.bind)")
    api.add_argument("--token", help="API token (default: $VALRUN_TOKEN)")
    arg_help = "JSON if it parses as JSON, else a string"

    run = commands.add_parser("run", parents=[api], help="call a val through the Run API")
    run.add_argument("target", metavar="USER.VAL")
    run.add_argument("args", nargs="*", metavar="ARG", help=arg_help)
    run.add_argument("--v", type=int, help="a pinned version")
    run.set_defaults(func=cmd_run)

    evaluate = commands.add_parser("eval", parents=[api], help="evaluate code (Eval API)")
    evaluate.add_argument("code")
    evaluate.add_argument(
        "args", nargs="*", metavar="ARG", help=f"{arg_help}; given: a callable value is called"
    )
    evaluate.set_defaults(func=cmd_eval)

    env = commands.add_parser("env", help="your env (values are never shown)")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    env_set = env_commands.add_parser("set", parents=[api], help="set KEY (VALUE or stdin)")
    env_set.add_argument("key")
    env_set.add_argument("value", nargs="?", help="default: read from stdin")
    env_unset = env_commands.add_parser("unset", parents=[api], help="delete KEY")
    env_unset.add_argument("key")
    env_list = env_commands.add_parser("list", parents=[api], help="list the keys")
    for sub in (env_set, env_unset, env_list):
        sub.set_defaults(func=cmd_env)

    logs = commands.add_parser(
        "logs", parents=[api], help="invocation records of a val (or, without one, your evals)"
    )
    logs.add_argument("target", metavar="USER/VAL", nargs="?")
    logs.add_argument("--limit", type=int, default=20)
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(func=cmd_logs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        return int(args.func(config, args))
    except (ConfigError, HTTPError) as exc:
        print(f"valrun: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"valrun: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # the admin commands open the store directly
        if args.debug:
            raise
        path = config.store.sqlite_path
        print(
            f"valrun: cannot use the database {path}: {store_problem(path, exc)}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
