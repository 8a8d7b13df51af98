"""A throwaway PostgreSQL server for the tests: Debian's postgresql package (installed by
scripts/test, `ensure_postgres` in scripts/_env.sh), a cluster made by initdb in a temporary
directory, listening on 127.0.0.1 on a free port and on a unix socket in that directory.

initdb and the server refuse to run as root, and the tests run as root in CI: then both run
as an unprivileged system user (Debian's `postgres`, or `valrun-pg` made by useradd where
there is none), through setpriv. A non-root runner runs them as itself.

Trust authentication on loopback only: the cluster lives as long as the test session and
holds nothing but test data. fsync is off (a crash of the test machine loses nothing of
value), which makes CREATE DATABASE and commits fast.

conftest.py's `pg_cluster` (one per session) and `pg_url` (a fresh database per test) use
this module.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

SUPERUSER = "postgres"
#: The unprivileged account the server runs as when the tests run as root.
SYSTEM_USERS = ("postgres", "valrun-pg")


class PostgresMissingError(RuntimeError):
    pass


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise PostgresMissingError(
            "PostgreSQL's initdb was not found: run ./scripts/test (it installs Debian's "
            "postgresql package) or apt-get install postgresql"
        )
    return Path(initdb).resolve().parent


def _system_user() -> pwd.struct_passwd:
    for name in SYSTEM_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "valrun-pg"],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam("valrun-pg")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """One running PostgreSQL server; `stop` (or the context manager) ends it and removes
    its directory."""

    root: Path
    port: int
    bin: Path
    _prefix: Sequence[str] = field(default_factory=tuple)
    durable: bool = False
    _running: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._prefix, *args], capture_output=True, text=True, cwd=self.root, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            *("-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust"),
            *("--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"),
        )
        options = " ".join(
            (
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                "" if self.durable else "-c fsync=off -c synchronous_commit=off",
                "-c max_connections=200",
            )
        )
        self._run(
            str(self.bin / "pg_ctl"),
            *("-D", str(self.data_dir), "-o", options, "-l", str(self.root / "server.log")),
            *("-w", "-t", "60", "start"),
        )
        self._running = True

    def stop(self) -> None:
        try:
            if self._running:
                self._running = False
                pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
                pg_ctl = str(self.bin / "pg_ctl")
                self._run(pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
                _wait_gone(pid)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def create_database(self) -> str:
        """A new empty database (a copy of template1); its URL."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by create_database, ending any session still on it."""
        name = url.rpartition("/")[2]
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    """Wait until the server process has exited, and reap it if it is ours: pg_ctl's daemon
    is our child when this process is a subreaper (the pool makes the test process one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return
        if state == "Z":  # exited; its parent (not us) reaps it
            return
        time.sleep(0.02)
    raise RuntimeError(f"PostgreSQL ({pid}) still runs {timeout_s:.0f} s after pg_ctl stop")


def start_cluster(*, durable: bool = False) -> Cluster:
    """Start a new cluster in a new temporary directory (in /tmp, which the unprivileged
    user can reach: pytest's own tmp directories are private to the runner). `durable`
    keeps PostgreSQL's default fsync and synchronous commit (for measurements)."""
    root = Path(tempfile.mkdtemp(prefix="valrun-pg-"))
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        user = _system_user()
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = (
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
        )
    (root / "socket").mkdir()
    if prefix:
        os.chown(root / "socket", user.pw_uid, user.pw_gid)
    for attempt in range(3):
        # The free port may be taken between its probe and the server's bind: try another.
        cluster = Cluster(root, _free_port(), bin_dir(), prefix, durable)
        try:
            cluster.start()
        except RuntimeError:
            if attempt == 2 or "could not bind" not in cluster.log():
                cluster.stop()
                raise
            shutil.rmtree(cluster.data_dir)
            continue
        except BaseException:
            cluster.stop()
            raise
        return cluster
    raise AssertionError("unreachable")


def drop_storage_tenants(store_url: str) -> None:
    """Drop the per-user SQL roles and databases that runtime.pg_storage made for the store at
    `store_url` (each is a copy of a ~7 MiB template: a session's tests would pile them up)."""
    with psycopg.connect(store_url, autocommit=True) as db:
        exists = db.execute("SELECT to_regclass('valrun_sql_tenants') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return
        names = [str(row[0]) for row in db.execute("SELECT name FROM valrun_sql_tenants")]
        for name in names:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
            db.execute(f'DROP ROLE IF EXISTS "{name}"'.encode())
