"""Why valrun could not start, in one line.

Starting can fail for reasons that are the operator's to fix, not bugs: the port is taken,
the bind address does not resolve, the database cannot be opened or written, a required
sandbox layer is missing. Each is reported as one line (no traceback unless `--debug`) and a
non-zero exit, like a config error.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
from pathlib import Path

import trio

from runtime.config import Config
from runtime.errors import ConfigError, StartupError, StoreError
from runtime.store import Store

BIND_ERRORS = {
    errno.EADDRINUSE: "the address is already in use (another valrun, or another server?)",
    errno.EADDRNOTAVAIL: "that address is not one of this machine's",
    errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
}


def open_store(path: str, secret_key: str = "") -> Store:
    """The store, proven writable (one small committed write), or a StartupError."""
    try:
        store = Store(path, secret_key=secret_key)
    except sqlite3.Error as exc:
        raise StartupError(f"cannot use the database {path}: {store_problem(path, exc)}") from exc
    except StoreError as exc:  # PostgreSQL's (runtime.pgdb): the message names the server
        raise StartupError(f"cannot use the store: {exc}") from exc
    try:
        store.check_writable()
    except StoreError as exc:
        store.close()
        raise StartupError(f"cannot write to the store: {exc}") from exc
    except sqlite3.Error as exc:
        store.close()
        raise StartupError(
            f"cannot write to the database {path}: {store_problem(path, exc)}"
        ) from exc
    return store


def store_problem(path: str, exc: sqlite3.Error) -> str:
    """What is wrong with the database file, in words an operator can act on."""
    file = Path(path)
    if file.is_dir():
        return "it is a directory; store.url must name a file"
    if not file.parent.is_dir():
        return f"its directory {file.parent} does not exist"
    if "not a database" in str(exc):
        return "the file is not an SQLite database"
    try:
        if os.statvfs(file.parent).f_flag & os.ST_RDONLY:
            return f"it is on a read-only file system ({exc})"
    except OSError:
        pass
    if "readonly" in str(exc):
        return f"the file or its directory is read-only ({exc})"
    if "full" in str(exc):
        return f"the disk is full ({exc})"
    return str(exc)


def explain(exc: BaseException, config: Config) -> str | None:
    """One line for an error that kept valrun from starting; None for anything else."""
    leaf = lone_error(exc)
    binds = ", ".join(config.server.bind)
    if isinstance(leaf, ConfigError | StartupError):
        return str(leaf)
    if isinstance(leaf, socket.gaierror):
        return f"cannot listen on {binds}: the host name does not resolve ({leaf.strerror})"
    if isinstance(leaf, OSError) and leaf.errno in BIND_ERRORS:
        return f"cannot listen on {binds}: {BIND_ERRORS[leaf.errno]}"
    if isinstance(leaf, OSError) and leaf.errno == errno.ENOSPC:
        return f"cannot start: the disk is full ({leaf})"
    if isinstance(leaf, sqlite3.Error):
        path = config.store.sqlite_path
        return f"cannot use the database {path}: {store_problem(path, leaf)}"
    return None


def lone_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (trio's nurseries wrap each error)."""
    while isinstance(exc, BaseExceptionGroup):
        errors = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) != 1:
            break
        exc = errors[0]
    return exc
