"""The CLI's commands that go through the API: val, run, eval, env, logs.

Where to connect and what Host to name are decided once, by `api_target`:

    no --server                 connect to server.bind (0.0.0.0 -> 127.0.0.1),
                                Host: api_host:port
    --server http://ADDR:P      connect there, Host: api_host:P (an address or a machine's
    --server http://NAME:P      name routes nothing in valrun: the API host does)
    --server https://NAME       connect there, Host: NAME (over TLS the name is the API
                                host's, as its certificate says; so is an http URL that
                                names the API host itself)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from runtime.config import Config

TOKEN_ENV = "VALRUN_TOKEN"
SERVER_ENV = "VALRUN_SERVER"
#: How long one long poll of `logs --follow` waits on the server (its limit is 30 s).
FOLLOW_WAIT_S = 25


def api_target(config: Config, server: str | None) -> tuple[str, str | None]:
    """(base URL to connect to, Host header to send; None: the URL's own)."""
    api_host = config.server.api_host
    if not server:
        host, _, port = config.server.bind[0].rpartition(":")
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        # *.localhost does not resolve everywhere outside browsers: connect to the bound
        # address and name the API host in the Host header.
        return f"http://{host}:{port}", f"{api_host}:{port}"
    parts = urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(
            f"valrun: --server must be an http(s) URL like http://127.0.0.1:8080, not {server!r}"
        )
    base = f"{parts.scheme}://{parts.netloc}"
    if parts.scheme == "https" or parts.hostname == api_host:
        return base, None
    return base, api_host + (f":{parts.port}" if parts.port else "")


class ApiClient:
    """A small synchronous client for the API (the CLI needs nothing more)."""

    def __init__(self, config: Config, server: str | None, token: str | None) -> None:
        self.base, self.host_header = api_target(config, server or os.environ.get(SERVER_ENV))
        self.token = token or os.environ.get(TOKEN_ENV)

    def require_token(self) -> None:
        if not self.token:
            raise SystemExit(
                f"valrun: this needs an API token: set {TOKEN_ENV} (or pass --token). "
                "`valrun token create USER` on the server's machine makes one."
            )

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
        timeout_s: float = 30,
        *,
        missing_ok: bool = False,
    ) -> object:
        """The answer as JSON; with `missing_ok`, None for a 404."""
        answer = self.fetch(method, path, body, content_type, timeout_s, missing_ok=missing_ok)
        return None if answer is None else json.loads(answer or b"null")

    def fetch(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "text/plain; charset=utf-8",
        timeout_s: float = 30,
        *,
        missing_ok: bool = False,
    ) -> bytes | None:
        """The response body as it is (a blob's value); `call` reads it as JSON."""
        request = urllib.request.Request(self.base + path, data=body, method=method)
        if self.host_header is not None:
            request.add_header("Host", self.host_header)
        if body is not None:
            request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                body_bytes: bytes = response.read()
                return body_bytes
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            raise SystemExit(self._describe(method, path, exc)) from None
        except urllib.error.URLError as exc:
            raise SystemExit(
                f"valrun: cannot reach {self.base}: {exc.reason} (is valrun running there? "
                f"--server or ${SERVER_ENV} names another)"
            ) from None

    def _describe(self, method: str, path: str, exc: urllib.error.HTTPError) -> str:
        text = exc.read().decode("utf-8", errors="replace")
        try:
            error = json.loads(text)["error"]
            detail = f"{error['type']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            detail = text.strip()[:500]
        message = f"valrun: {method} {path.partition('?')[0]} answered {exc.code} {detail}"
        if exc.code == 401 and not self.token:
            message += f"\nvalrun: set {TOKEN_ENV} to your API token (or pass --token)"
        return message


def _user_val(text: str) -> tuple[str, str]:
    user, slash, val = text.partition("/")
    if not slash or not user or not val or "/" in val:
        raise SystemExit(f"valrun: expected USER/VAL, got {text!r}")
    return user, val


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_json(result: object) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False))


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _dict(result: object) -> dict[str, object]:
    return result if isinstance(result, dict) else {}


def _list(value: object) -> list[dict[str, object]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def cmd_val(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    command = args.val_command
    if command == "list":
        vals = _list(_dict(client.call("GET", f"/v1/vals/{quote(args.user)}")).get("vals"))
        if args.json:
            _print_json(vals)
        else:
            rows = [
                [str(v["name"]), f"v{v['version']}", str(v["privacy"]), str(v["url"])] for v in vals
            ]
            print_table(rows, ["NAME", "VERSION", "PRIVACY", "URL"])
        return 0
    user, val = _user_val(args.target)
    path = f"/v1/vals/{quote(user)}/{quote(val)}"
    if command == "get":
        result = client.call("GET", path + (f"?v={args.v}" if args.v else ""))
        if args.json:
            _print_json(result)
        else:
            print(_dict(result).get("code", ""), end="")
        return 0
    if command == "versions":
        versions = _list(_dict(client.call("GET", path + "/versions")).get("versions"))
        if args.json:
            _print_json(versions)
        else:
            rows = [[f"v{v['version']}", _when(float(str(v["created_at"])))] for v in versions]
            print_table(rows, ["VERSION", "CREATED"])
        return 0
    client.require_token()
    if command == "put":
        code = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        payload = {"code": code, **({"privacy": args.privacy} if args.privacy else {})}
        saved = _dict(client.call("PUT", path, json.dumps(payload).encode(), "application/json"))
        print(
            f"saved {user}/{val} v{saved.get('version')} ({saved.get('privacy')}): "
            f"{saved.get('url')}"
        )
    elif command == "rollback":
        # A new version with the old one's code: history stays immutable and complete.
        old = _dict(client.call("GET", f"{path}?v={args.version}"))
        again = json.dumps({"code": old.get("code")}).encode()
        saved = _dict(client.call("PUT", path, again, "application/json"))
        print(f"{user}/{val} v{saved.get('version')} now runs the code of v{args.version}")
    elif command == "privacy":
        change = json.dumps({"privacy": args.privacy}).encode()
        changed = _dict(client.call("PATCH", path, change, "application/json"))
        print(f"{user}/{val} is now {changed.get('privacy')}")
    else:  # rm
        client.call("DELETE", path)
        print(f"deleted {user}/{val}, its versions and its records")
    return 0


def _json_arg(text: str) -> object:
    """A command-line arg: JSON when it is JSON (`1`, `true`, `[1]`, `"1"`), else a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    user, dot, val = args.target.partition(".")
    if not dot or not user or not val:
        raise SystemExit(f"valrun: expected USER.VAL, got {args.target!r}")
    path = f"/v1/run/{quote(user)}.{quote(val)}" + (f"?v={args.v}" if args.v else "")
    body = json.dumps([_json_arg(a) for a in args.args]).encode()
    _print_json(client.call("POST", path, body, "application/json"))
    return 0


def cmd_eval(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    payload: dict[str, object] = {"code": args.code}
    if args.args:
        payload["args"] = [_json_arg(a) for a in args.args]
    _print_json(client.call("POST", "/v1/eval", json.dumps(payload).encode(), "application/json"))
    return 0


def cmd_env(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    if args.env_command == "list":
        keys = _dict(client.call("GET", "/v1/env")).get("keys", [])
        print("\n".join(str(key) for key in keys) if isinstance(keys, list) else "")
        return 0
    path = f"/v1/env/{quote(args.key, safe='')}"
    if args.env_command == "unset":
        client.call("DELETE", path)
        return 0
    # From stdin unless given: a secret on the command line ends up in the shell's history.
    value = sys.stdin.read().removesuffix("\n") if args.value is None else args.value
    client.call("PUT", path, value.encode())
    return 0


def print_run(run: dict[str, object]) -> None:
    version = f"v{run['version']}" if run.get("version") is not None else "-"
    what = f"{run.get('method') or '-'} {run.get('path') or '-'}"
    print(
        f"{_when(float(str(run['time'])))} {run['source']!s:4} {version:>4} {what} "
        f"{run['status']} {float(str(run['duration_ms'])):.1f}ms"
    )
    error = run.get("error")
    if isinstance(error, dict):
        print(f"  error {error.get('type')}: {error.get('message')}")
        for step in error.get("traceback") or []:
            print(f"    {step}")
    fetches = run.get("fetches")
    for entry in fetches if isinstance(fetches, list) else []:
        if isinstance(entry, dict):
            print(f"  {fetch_line(entry)}")
    for line in str(run.get("log", "")).splitlines():
        print(f"  | {line}")
    sys.stdout.flush()


def fetch_line(entry: dict[str, object]) -> str:
    """One fetch of a record, as `valrun logs` prints it."""
    url = f"{entry.get('scheme')}://{entry.get('host')}{entry.get('path')}"
    outcome = entry.get("status") if "status" in entry else f"error: {entry.get('error')}"
    size, ms = entry.get("bytes", 0), entry.get("ms")
    return f"fetch {entry.get('method')} {url} -> {outcome} ({size} B, {ms} ms)"


def cmd_logs(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    if args.target is None:
        path = "/v1/me/evals"
    else:
        user, val = _user_val(args.target)
        path = f"/v1/vals/{quote(user)}/{quote(val)}/runs"
    runs = _list(_dict(client.call("GET", f"{path}?limit={args.limit}")).get("runs"))
    if args.json and not args.follow:
        _print_json(runs)  # newest first, as the API answers
        return 0
    runs.reverse()  # oldest first, as a log reads

    def show(run: dict[str, object]) -> None:
        if args.json:  # one record per line while following
            print(json.dumps(run, ensure_ascii=False), flush=True)
        else:
            print_run(run)

    for run in runs:
        show(run)
    if not args.follow:
        return 0
    after = max((int(str(run["id"])) for run in runs), default=0)
    try:
        while True:
            # Long polling: the server answers as soon as there is a newer record, or after
            # `wait` seconds with none; each answer's last id is the next cursor.
            query = f"?after={after}&wait={FOLLOW_WAIT_S}&limit=1000"
            found = _dict(client.call("GET", path + query, timeout_s=FOLLOW_WAIT_S + 30))
            for run in _list(found.get("runs")):
                show(run)
                after = max(after, int(str(run["id"])))
    except KeyboardInterrupt:
        return 0


def cmd_blob(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    if args.blob_command == "ls":
        after: str | None = ""
        while after is not None:  # every page
            query = urlencode({"prefix": args.prefix, "after": after})
            page = client.call("GET", f"/v1/blob?{query}")
            if not isinstance(page, dict):
                break
            for entry in page.get("blobs", []):
                print(f"{entry['size']:>10}  {_when(entry['updated_at'])}  {entry['key']}")
            after = page.get("next")
        return 0
    path = f"/v1/blob/{quote(args.key, safe='')}"
    if args.blob_command == "get":
        sys.stdout.buffer.write(client.fetch("GET", path) or b"")
    elif args.blob_command == "put":
        value = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        _print_json(client.call("PUT", path, value, "application/octet-stream"))
    else:
        _print_json(client.call("DELETE", path))
    return 0


def cmd_sql(config: Config, args: argparse.Namespace) -> int:
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    payload = {"sql": args.sql, "args": [_json_arg(a) for a in args.args]}
    result = client.call(
        "POST", "/v1/sqlite/execute", json.dumps(payload).encode(), "application/json"
    )
    if args.json or not isinstance(result, dict):
        _print_json(result)
        return 0
    if result["columns"]:
        print("\t".join(result["columns"]))
        for row in result["rows"]:
            print("\t".join(v if isinstance(v, str) else json.dumps(v) for v in row))
    else:
        print(f"{result['rows_affected']} rows affected")
    return 0


def cmd_val_schedule(config: Config, args: argparse.Namespace) -> int:
    """`val schedule USER/VAL CRON [--tz TZ]`, `--every SECONDS`, or `--off`."""
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    user, val = _user_val(args.target)
    path = f"/v1/vals/{user}/{val}/schedule"
    given = [args.cron is not None, args.every is not None, args.off]
    if sum(given) != 1 or (args.tz and args.cron is None):
        raise SystemExit("valrun: give one of CRON (with --tz TZ), --every SECONDS, --off")
    if args.off:
        _print_json(client.call("DELETE", path))
        return 0
    payload: dict[str, object] = (
        {"cron": args.cron, **({"tz": args.tz} if args.tz else {})}
        if args.cron is not None
        else {"every_s": args.every}
    )
    _print_json(client.call("PUT", path, json.dumps(payload).encode(), "application/json"))
    return 0


def cmd_val_show(config: Config, args: argparse.Namespace) -> int:
    """A val's metadata and its schedule (or none)."""
    client = ApiClient(config, args.server, args.token)
    client.require_token()
    user, val = _user_val(args.target)
    meta = client.call("GET", f"/v1/vals/{user}/{val}")
    schedule = client.call("GET", f"/v1/vals/{user}/{val}/schedule", missing_ok=True)
    if not isinstance(meta, dict):
        raise SystemExit("valrun: the server answered something that is not a val")
    meta.pop("code", None)
    if args.json:
        _print_json({**meta, "schedule": schedule})
        return 0
    print(f"{meta['user']}/{meta['name']}  v{meta['version']}  {meta['privacy']}  {meta['url']}")
    if not isinstance(schedule, dict):
        print("schedule: none")
        return 0
    zone = f" ({schedule['tz']})" if "tz" in schedule else ""
    last = schedule["last_run_at"]
    print(f"schedule: {schedule['schedule']}{zone}")
    print(f"  next run {_when(schedule['next_run_at'])}")
    print(f"  last run {_when(last) if last is not None else 'never'}")
    return 0
