"""The `valrun` command: serve, admin tasks on the store (user, token, backup, restore,
rotate-key, config), and commands over the API (val, run, eval, env, logs: runtime.client).

The config is `--config FILE`, else $VALRUN_CONFIG, else ./valrun.toml when there is one,
else the defaults. Options work before and after the verb (`valrun --token T val put ...`
and `valrun val put --token T ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import trio

from runtime import backup, client, dblock, pgdb, storecopy
from runtime.accesslog import configure_logging
from runtime.config import (
    SECRET_KEY_ENV,
    Config,
    check_secret_key,
    load_config,
    resolve_store_path,
    with_bind,
    with_secret_key_from_env,
)
from runtime.demo import seed_demo
from runtime.errors import StartupError, ValrunError
from runtime.pgdb import redact
from runtime.processes import bind_sockets, preflight, serve_processes_until_signalled
from runtime.sealing import Sealer
from runtime.server import serve_until_signalled
from runtime.startup import explain, store_problem
from runtime.store import Store

DESCRIPTION = """\
Run small pieces of Python (vals) as HTTP endpoints and JSON functions.

serve, user, token, backup, restore, rotate-key and config work on this machine's store and
config; val, run, eval, env and logs go through a running valrun's API.

The config is --config FILE, else $VALRUN_CONFIG, else ./valrun.toml when there is one, else
the defaults. Options work before and after the verb: `valrun --token T val put ...` and
`valrun val put --token T ...` are the same.
"""
CONFIG_ENV = "VALRUN_CONFIG"
NEW_SECRET_KEY_ENV = "VALRUN_NEW_SECRET_KEY"

logger = logging.getLogger("valrun")


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    if args.bind:
        config = with_bind(config, tuple(args.bind))
    # Open (and migrate) the store once before serving: a schema too new or a wrong secret
    # key is refused here, in one line, before anything listens.
    with closing(open_store(config)) as store:
        token = seed_demo(store) if args.demo else None
    if token is not None:
        port = config.server.bind[0].rpartition(":")[2]
        print(f"demo vals: http://demo-hello.{config.server.web_domain}:{port}/?name=you")
        print(f"demo token (for the API at http://{config.server.api_host}:{port}/): {token}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            processes = config.server.processes
            if processes == 1:
                urls = await nursery.start(serve_until_signalled, config)
                logger.info("valrun is serving on %s", ", ".join(urls))
                return
            await trio.to_thread.run_sync(preflight, config)
            sockets = bind_sockets(config)
            urls = await nursery.start(serve_processes_until_signalled, config, sockets)
            logger.info("valrun is serving on %s (%d processes)", ", ".join(urls), processes)

    try:
        # The supervisor holds the shared lock too: no restore while it may start a child.
        with (
            dblock.hold(config.store.sqlite_path, exclusive=False, what="serve")
            if config.server.processes > 1 and not config.store.postgres
            else contextlib.nullcontext()
        ):
            trio.run(main)
    except Exception as exc:
        # What the operator must fix is one line; anything else is a bug, and its traceback
        # is what a bug report needs.
        message = explain(exc, config)
        if message is None or args.debug:
            raise
        raise StartupError(message) from None
    return 0


def open_store(config: Config) -> Store:
    return Store(config.store.location, secret_key=config.store.secret_key)


def cmd_user_create(config: Config, args: argparse.Namespace) -> int:
    with closing(open_store(config)) as store:
        token = store.create_user(args.name)
    print(f"created user {args.name}; its token (shown only once):")
    print(token)
    return 0


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    with closing(open_store(config)) as store:
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
    settings = asdict(config)
    if config.store.secret_key:  # never printed: say only that it is set
        settings["store"]["secret_key"] = "(set)"
    settings["store"]["url"] = redact(config.store.url)  # a PostgreSQL URL's password
    found = {
        "config_file": str(args.config_file) if args.config_file else None,
        "database": redact(config.store.location),
    }
    print(json.dumps({**found, **settings}, indent=2))
    return 0


def refuse_postgres(config: Config, verb: str) -> None:
    if config.store.postgres:
        raise SystemExit(
            f"valrun: {verb} copies SQLite files; a PostgreSQL store is backed up and restored "
            "with PostgreSQL's own tools: pg_dump -Fc, pg_restore (docs/store.md)"
        )


def cmd_backup(config: Config, args: argparse.Namespace) -> int:
    refuse_postgres(config, "backup")
    version = backup.backup(config.store.sqlite_path, args.file)
    print(f"backed up {config.store.sqlite_path} (schema {version}) to {Path(args.file).resolve()}")
    return 0


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    refuse_postgres(config, "restore")
    with dblock.hold(config.store.sqlite_path, exclusive=True, what="restore"):
        saved = backup.restore(config.store.sqlite_path, args.file)
        if saved is not None:
            print(f"the database it replaced is kept at {saved}")
        with closing(open_store(config)):  # migrates a backup made by an older valrun
            pass
    print(f"restored {config.store.sqlite_path} from {args.file}")
    return 0


def cmd_rotate_key(config: Config, args: argparse.Namespace) -> int:
    new_key = check_secret_key(os.environ.get(NEW_SECRET_KEY_ENV, ""), f"${NEW_SECRET_KEY_ENV}")
    if not new_key and not args.decrypt:
        raise SystemExit(
            f"valrun: put the new key in ${NEW_SECRET_KEY_ENV} (the current one stays in "
            f"[store] secret_key or ${SECRET_KEY_ENV}); --decrypt stores the values plain"
        )
    new = Sealer(new_key) if new_key else None
    lock = (
        pgdb.hold_exclusive(config.store.location, "rotate-key")
        if config.store.postgres
        else dblock.hold(config.store.sqlite_path, exclusive=True, what="rotate-key")
    )
    with lock, closing(open_store(config)) as store:
        changed = store.reseal(new)
    print(f"{changed} env values re-stored {'with the new key' if new else 'as plain text'}.")
    if new:
        print(f"Now set [store] secret_key (or ${SECRET_KEY_ENV}) to the new key and restart.")
    else:
        print(f"Now remove [store] secret_key (and ${SECRET_KEY_ENV}) and restart.")
    return 0


def cmd_store_copy(config: Config, args: argparse.Namespace) -> int:
    if config.store.postgres:
        raise SystemExit("valrun: store copy copies an SQLite store; [store] url is PostgreSQL")
    counts = storecopy.copy_store(config.store.sqlite_path, args.to, config.store.secret_key)
    copied = ", ".join(f"{n} {table}" for table, n in counts.items())
    print(f"copied {config.store.sqlite_path} to {redact(args.to)}: {copied}")
    print("Now set [store] url to that URL and start valrun (blob and SQL storage stay here).")
    return 0


def _options(*, api: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its verb. SUPPRESS: an option given
    before the verb is not reset by the subcommand's parser when it is not repeated there."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"valrun.toml to use (default: ${CONFIG_ENV}, else ./valrun.toml if present)",
    )
    if api:
        options.add_argument(
            "--server",
            default=argparse.SUPPRESS,
            help=f"URL of a running valrun (default: ${client.SERVER_ENV}, else server.bind)",
        )
        options.add_argument(
            "--token",
            default=argparse.SUPPRESS,
            help=f"API token (default: ${client.TOKEN_ENV})",
        )
    return options


def build_parser() -> argparse.ArgumentParser:
    store_options, api_options = [_options(api=False)], [_options(api=True)]
    parser = argparse.ArgumentParser(
        prog="valrun",
        description=DESCRIPTION,
        parents=api_options,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=store_options, help="run the service")
    serve.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on (repeatable; overrides server.bind)",
    )
    serve.add_argument(
        "--demo", action="store_true", help="seed a demo user and vals; print its token"
    )
    serve.set_defaults(func=cmd_serve)

    user = commands.add_parser("user", parents=store_options, help="users (on the store)")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    create = user_commands.add_parser(
        "create", parents=store_options, help="create a user; prints its token last"
    )
    create.add_argument("name")
    create.set_defaults(func=cmd_user_create)

    token = commands.add_parser("token", parents=store_options, help="API tokens (on the store)")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_create = token_commands.add_parser(
        "create", parents=store_options, help="a new token; printed last, once"
    )
    token_create.add_argument("name")
    token_list = token_commands.add_parser(
        "list", parents=store_options, help="a user's tokens (ids, never tokens)"
    )
    token_list.add_argument("name")
    token_revoke = token_commands.add_parser(
        "revoke", parents=store_options, help="revoke a token by its id"
    )
    token_revoke.add_argument("id", type=int)
    for sub in (token_create, token_list, token_revoke):
        sub.set_defaults(func=cmd_token)

    config = commands.add_parser("config", parents=store_options, help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser(
        "check", parents=store_options, help="validate and print the effective config"
    )
    check.set_defaults(func=cmd_config_check)

    backup_cmd = commands.add_parser(
        "backup", parents=store_options, help="copy the live database to FILE (consistent)"
    )
    backup_cmd.add_argument("file")
    backup_cmd.set_defaults(func=cmd_backup)
    restore = commands.add_parser(
        "restore", parents=store_options, help="replace the database with a backup (stopped)"
    )
    restore.add_argument("file")
    restore.set_defaults(func=cmd_restore)
    rotate = commands.add_parser(
        "rotate-key",
        parents=store_options,
        help=f"re-seal env values with ${NEW_SECRET_KEY_ENV} (service stopped)",
    )
    rotate.add_argument(
        "--decrypt", action="store_true", help="store the env values plain (no new key)"
    )
    rotate.set_defaults(func=cmd_rotate_key)
    store = commands.add_parser("store", parents=store_options, help="the store itself")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    copy = store_commands.add_parser(
        "copy",
        parents=store_options,
        help="copy this SQLite store into an empty PostgreSQL database (service stopped)",
    )
    copy.add_argument("--to", required=True, metavar="URL", help="postgresql://...")
    copy.set_defaults(func=cmd_store_copy)

    val = commands.add_parser("val", parents=api_options, help="vals, through the API")
    val_commands = val.add_subparsers(dest="val_command", required=True)
    put = val_commands.add_parser(
        "put", parents=api_options, help="save a new version from FILE (- for stdin)"
    )
    put.add_argument("target", metavar="USER/VAL")
    put.add_argument("file")
    put.add_argument("--privacy", choices=("public", "unlisted", "private"))
    get = val_commands.add_parser(
        "get", parents=api_options, help="print a val's code (--json for metadata)"
    )
    get.add_argument("target", metavar="USER/VAL")
    get.add_argument("--v", type=int, help="a pinned version")
    get.add_argument("--json", action="store_true")
    listing = val_commands.add_parser("list", parents=api_options, help="a user's vals, a table")
    listing.add_argument("user")
    listing.add_argument("--json", action="store_true", help="JSON, for scripts")
    versions = val_commands.add_parser("versions", parents=api_options, help="a val's versions")
    versions.add_argument("target", metavar="USER/VAL")
    versions.add_argument("--json", action="store_true", help="JSON, for scripts")
    rollback = val_commands.add_parser(
        "rollback", parents=api_options, help="save version N's code as a new version"
    )
    rollback.add_argument("target", metavar="USER/VAL")
    rollback.add_argument("version", type=int, metavar="N")
    privacy = val_commands.add_parser("privacy", parents=api_options, help="change privacy")
    privacy.add_argument("target", metavar="USER/VAL")
    privacy.add_argument("privacy", choices=("public", "unlisted", "private"))
    remove = val_commands.add_parser(
        "rm", aliases=["delete"], parents=api_options, help="delete a val, versions, records"
    )
    remove.add_argument("target", metavar="USER/VAL")
    for sub in (put, get, listing, versions, rollback, privacy, remove):
        sub.set_defaults(func=client.cmd_val)
    remove.set_defaults(val_command="rm")
    schedule = val_commands.add_parser(
        "schedule",
        parents=api_options,
        help="run a val on a cron schedule, every N seconds, or --off",
    )
    schedule.add_argument("target", metavar="USER/VAL")
    schedule.add_argument("cron", nargs="?", help='five-field cron, such as "*/5 * * * *"')
    schedule.add_argument("--tz", help="the cron expression's time zone (default UTC)")
    schedule.add_argument("--every", type=int, metavar="SECONDS", help="every N seconds")
    schedule.add_argument("--off", action="store_true", help="remove the schedule")
    schedule.set_defaults(func=client.cmd_val_schedule)
    show = val_commands.add_parser(
        "show", parents=api_options, help="a val's metadata and schedule"
    )
    show.add_argument("target", metavar="USER/VAL")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=client.cmd_val_show)

    arg_help = "JSON if it parses as JSON, else a string"
    run = commands.add_parser("run", parents=api_options, help="call a val through the Run API")
    run.add_argument("target", metavar="USER.VAL")
    run.add_argument("args", nargs="*", metavar="ARG", help=arg_help)
    run.add_argument("--v", type=int, help="a pinned version")
    run.set_defaults(func=client.cmd_run)

    evaluate = commands.add_parser("eval", parents=api_options, help="evaluate code (Eval API)")
    evaluate.add_argument("code")
    evaluate.add_argument(
        "args", nargs="*", metavar="ARG", help=f"{arg_help}; given: a callable value is called"
    )
    evaluate.set_defaults(func=client.cmd_eval)

    env = commands.add_parser("env", parents=api_options, help="your env (values never shown)")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    env_set = env_commands.add_parser("set", parents=api_options, help="set KEY (VALUE or stdin)")
    env_set.add_argument("key")
    env_set.add_argument("value", nargs="?", help="default: read from stdin")
    env_unset = env_commands.add_parser("unset", parents=api_options, help="delete KEY")
    env_unset.add_argument("key")
    env_list = env_commands.add_parser("list", parents=api_options, help="list the keys")
    for sub in (env_set, env_unset, env_list):
        sub.set_defaults(func=client.cmd_env)

    logs = commands.add_parser(
        "logs", parents=api_options, help="a val's invocation records (without one: your evals)"
    )
    logs.add_argument("target", metavar="USER/VAL", nargs="?")
    logs.add_argument("--limit", type=int, default=20, help="how many past records first")
    logs.add_argument("--json", action="store_true")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="then print new records as they happen"
    )
    logs.set_defaults(func=client.cmd_logs)

    blob = commands.add_parser("blob", parents=api_options, help="your blob storage")
    blob_commands = blob.add_subparsers(dest="blob_command", required=True)
    blob_ls = blob_commands.add_parser("ls", parents=api_options, help="keys, sizes, update times")
    blob_ls.add_argument("prefix", nargs="?", default="")
    blob_get = blob_commands.add_parser("get", parents=api_options, help="write a value to stdout")
    blob_get.add_argument("key")
    blob_put = blob_commands.add_parser(
        "put", parents=api_options, help="set KEY from FILE (- stdin)"
    )
    blob_put.add_argument("key")
    blob_put.add_argument("file")
    blob_rm = blob_commands.add_parser("rm", parents=api_options, help="delete KEY")
    blob_rm.add_argument("key")
    for sub in (blob_ls, blob_get, blob_put, blob_rm):
        sub.set_defaults(func=client.cmd_blob)

    sql = commands.add_parser("sql", parents=api_options, help="run one statement on your database")
    sql.add_argument("sql")
    sql.add_argument("args", nargs="*", metavar="ARG", help=arg_help)
    sql.add_argument("--json", action="store_true")
    sql.set_defaults(func=client.cmd_sql)
    return parser


def find_config(explicit: str | None) -> Path | None:
    """--config, else $VALRUN_CONFIG, else ./valrun.toml when it exists."""
    named = explicit or os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    here = Path("valrun.toml")
    return here if here.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("config", "server", "token"):
        setattr(args, name, getattr(args, name, None))
    configure_logging()
    try:
        path = find_config(args.config)
        args.config_file = path.resolve() if path else None
        config = load_config(path) if path else resolve_store_path(Config(), Path.cwd())
        config = with_secret_key_from_env(config)
        return int(args.func(config, args))
    except StartupError as exc:
        print(f"valrun: {exc}", file=sys.stderr)
        return 1
    except ValrunError as exc:
        print(f"valrun: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `valrun ... | head`: the reader has all it wanted. Exit as a process killed by
        # SIGPIPE would, without a traceback (and without Python's own complaint at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except sqlite3.Error as exc:  # the admin commands open the store directly
        if args.debug:
            raise
        db = config.store.sqlite_path
        print(f"valrun: cannot use the database {db}: {store_problem(db, exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
