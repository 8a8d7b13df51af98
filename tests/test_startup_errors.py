"""Startup errors through the real CLI: one line on stderr, a non-zero exit, no traceback
unless --debug. Each case is something an operator gets wrong, or a machine in a bad state."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from runtime.config import check_bind
from runtime.errors import ConfigError
from runtime.store import Store
from tests.live import fill, tmpfs

NOBODY = 65534


@dataclass(frozen=True)
class Case:
    #: Sets the case up in a directory; returns the [store] url's path and extra TOML.
    setup: Callable[[Path, contextlib.ExitStack], tuple[Path, str]]
    expected: str
    bind: str = "127.0.0.1:0"
    as_nobody: bool = False


def database(name: str, content: bytes | None = None) -> Callable[..., tuple[Path, str]]:
    def setup(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
        path = root / name
        if content is not None:
            path.write_bytes(content)
        return path, ""

    return setup


def a_directory(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
    (root / "valrun.db").mkdir()
    return root / "valrun.db", ""


def read_only_file(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
    path = root / "valrun.db"
    Store(path).close()  # a good store, owned by root, that nobody may only read
    path.chmod(0o644)
    return path, ""


def read_only_file_system(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
    mount = stack.enter_context(tmpfs(root, "4m"))
    Store(mount / "valrun.db").close()
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
    return mount / "valrun.db", ""


def full_disk(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
    mount = stack.enter_context(tmpfs(root, "1m"))
    fill(mount)
    return mount / "valrun.db", ""


def port_in_use(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
    holder = stack.enter_context(socket.socket())
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    return root / "valrun.db", f'[server]\nbind = ["127.0.0.1:{port}"]\n'


def bind(address: str) -> Callable[..., tuple[Path, str]]:
    def setup(root: Path, stack: contextlib.ExitStack) -> tuple[Path, str]:
        return root / "valrun.db", f'[server]\nbind = ["{address}"]\n'

    return setup


CASES = {
    "port_in_use": Case(port_in_use, "the address is already in use", bind=""),
    "bind_without_port": Case(bind("127.0.0.1"), "is not an address to listen on", bind=""),
    "bind_bad_port": Case(bind("127.0.0.1:http"), "is not an address to listen on", bind=""),
    "bind_port_too_big": Case(bind("127.0.0.1:70000"), "is not an address to listen on", bind=""),
    "bind_unresolvable": Case(
        bind("no-such-host.invalid:8080"), "the host name does not resolve", bind=""
    ),
    "database_directory_missing": Case(
        database("no/such/dir/valrun.db"), "No such file or directory"
    ),
    "database_is_a_directory": Case(a_directory, "it is a directory"),
    "database_not_sqlite": Case(
        database("valrun.db", b"not a database, just text\n" * 100), "not an SQLite database"
    ),
    "database_read_only": Case(read_only_file, "read-only", as_nobody=True),
    "database_on_read_only_file_system": Case(read_only_file_system, "read-only file system"),
    "disk_full": Case(full_disk, "the disk is full"),
    # Run as nobody, valrun cannot drop to another user (nor, here, probe the rest).
    "isolation_layer_missing": Case(
        database("valrun.db"), "required sandbox layer(s) unavailable", as_nobody=True
    ),
}


async def run_cli(root: Path, case: Case, *flags: str) -> subprocess.CompletedProcess[bytes]:
    with contextlib.ExitStack() as stack:
        db_path, extra = case.setup(root, stack)
        config = root / "valrun.toml"
        config.write_text(f'[store]\nurl = "sqlite:///{db_path}"\n{extra}')
        command = [sys.executable, "-m", "runtime.cli", *flags, "--config", str(config), "serve"]
        if case.bind:
            command += ["--bind", case.bind]
        if case.as_nobody:  # util-linux's setpriv: Python's own `user=` cannot reach /root
            command = [
                *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
                *command,
            ]
        with trio.fail_after(60):
            return await trio.run_process(
                command,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                cwd=root,
            )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # Reachable by nobody, for the cases run as nobody.
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path(os.sep):
            break
        directory.chmod(directory.stat().st_mode | 0o711)
    tmp_path.chmod(0o777)
    return tmp_path


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs and runs as another user")
@pytest.mark.parametrize("name", list(CASES))
async def test_startup_error_is_one_line_and_a_nonzero_exit(name: str, root: Path) -> None:
    case = CASES[name]
    result = await run_cli(root, case)
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("valrun: ")]
    assert len(errors) == 1, stderr
    assert case.expected in errors[0], stderr
    assert stderr.splitlines()[-1] == errors[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as another user")
async def test_debug_shows_the_traceback(root: Path) -> None:
    result = await run_cli(root, CASES["database_is_a_directory"], "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr.decode()


@pytest.mark.parametrize(
    "address",
    [
        *("127.0.0.1:0", "0.0.0.0:80", "[::1]:8080", "[::]:80", "localhost:8080"),
        *("unix:/run/v.sock", "fd://3"),
    ],
)
def test_bind_addresses_that_can_be_listened_on(address: str) -> None:
    check_bind(address)


@pytest.mark.parametrize(
    "address",
    [
        *("127.0.0.1", "localhost", "::1:80", "[::1]", "[]:80", "host:", ":80", "h:65536"),
        *("h:-1", "h:http", "unix:", "fd://", "fd://x", ""),
    ],
)
def test_bind_addresses_without_a_usable_port_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="not an address to listen on"):
        check_bind(address)
