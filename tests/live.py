"""valrun as its users run it: `python -m runtime.cli serve` in a subprocess of its own, so a
test can send it signals, kill it, and look at the processes it leaves."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from runtime.store import Store

SERVING_RE = re.compile(r"valrun is serving on http://127\.0\.0\.1:(\d+)")


@dataclass
class LiveValrun:
    process: trio.Process
    port: int
    token: str
    stderr: list[str] = field(default_factory=list)
    #: The store: an SQLite file's path, or a PostgreSQL URL.
    store: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api_headers(self) -> dict[str, str]:
        return {"host": f"api.localhost:{self.port}", "authorization": f"Bearer {self.token}"}

    def web_headers(self, val: str) -> dict[str, str]:
        return {"host": f"alice-{val}.web.localhost:{self.port}"}

    def fork_server_pid(self) -> int:
        """Of the front end's children, the one in its network namespace (it also adopts the
        workers of a fork server that died; those have a namespace of their own)."""
        net = os.readlink(f"/proc/{self.process.pid}/ns/net")
        (pid,) = [p for p in children(self.process.pid) if _net(p) == net]
        return pid

    def worker_pids(self) -> list[int]:
        return children(self.fork_server_pid())


def write_config(
    tmp_path: Path, extra: str = "", *, processes: int = 1, store: str = "", server: str = ""
) -> Path:
    """`processes`: 1 unless a test is about several (one front end, whose children these
    tests inspect, is what most of them mean). `store`: one shared with other nodes, an
    SQLite file's path or a postgresql:// URL (else a file in `tmp_path`); `server`: more
    lines of [server]."""
    config = tmp_path / "valrun.toml"
    url = (
        store
        if store.startswith("postgresql://")
        else f"sqlite:///{store or tmp_path / 'valrun.db'}"
    )
    # One shared fork server: these tests kill, stop and limit *the* fork server by its pid
    # (per-user fork servers are tested in tests/test_attacks_tenants.py).
    config.write_text(
        f'[store]\nurl = "{url}"\n'
        f"[server]\nshutdown_timeout_s = 10.0\nprocesses = {processes}\n{server}\n"
        "[sandbox]\nfork_server_per_user = false\n" + extra
    )
    return config


def cli_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "--config", str(config), *args]


async def start_live(
    nursery: trio.Nursery,
    tmp_path: Path,
    extra_config: str = "",
    *,
    tmpdir: Path | None = None,
    processes: int = 1,
    bind: str = "127.0.0.1:0",
    store: str = "",
    server: str = "",
) -> LiveValrun:
    """`tmpdir`: the front end's temporary folder (TMPDIR), where its workers' directory goes.
    With `processes` > 1 the process is the supervisor and its children the front ends.
    `store` and `server`: as `write_config` has them."""
    config = write_config(tmp_path, extra_config, processes=processes, store=store, server=server)
    location = store or str(tmp_path / "valrun.db")
    db = Store(location)
    exists = db.user_exists("alice")
    token = db.create_token("alice") if exists else db.create_user("alice")
    db.close()
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir is not None else {})}
    process = await trio.lowlevel.open_process(
        cli_command(config, "serve", "--bind", bind),
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    assert process.stderr is not None
    lines: list[str] = []
    port: trio.Event = trio.Event()
    found: list[int] = []

    async def read_stderr() -> None:
        assert process.stderr is not None
        pending = b""
        try:
            async for chunk in process.stderr:
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for line in complete:
                    text = line.decode(errors="replace")
                    lines.append(text)
                    if (match := SERVING_RE.search(text)) and not found:
                        found.append(int(match.group(1)))
                        port.set()
        finally:  # the test is over (or failed): no valrun of its outlives it
            port.set()  # exited before serving: the caller sees no port
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                # Reaped and its pipe closed here, not by the garbage collector in some later
                # test (as a ResourceWarning that fails that test).
                await process.wait()
                await process.stderr.aclose()

    nursery.start_soon(read_stderr)
    with trio.fail_after(30):
        await port.wait()
    assert found, "valrun did not start:\n" + "\n".join(lines)
    return LiveValrun(process, found[0], token, lines, location)


async def put_val(client: httpx.AsyncClient, live: LiveValrun, name: str, code: str) -> None:
    response = await client.put(
        f"{live.base_url}/v1/vals/alice/{name}", headers=live.api_headers(), content=code
    )
    assert response.status_code in (200, 201), response.text


def children(pid: int) -> list[int]:
    """The children of every thread of `pid` (proc(5): /proc/PID/task/TID/children)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: children, theirs, and so on."""
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


def _net(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped) is not alive."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or the read
        return False
    return state != "Z"


def sleeping(pid: int) -> bool:
    """In the val's `time.sleep`: the kernel function it waits in (proc(5): wchan)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


PIDS_CGROUPS = Path("/sys/fs/cgroup/pids")


@contextlib.contextmanager
def pids_cgroup(pid: int) -> Iterator[Path]:
    """`pid` in a new pids cgroup of its own (cgroup v1 here), moved back afterwards."""
    group = PIDS_CGROUPS / f"valrun-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        yield group
    finally:
        # It and the workers it forked meanwhile; a worker forked during the move (or a
        # zombie not yet reaped) needs another round.
        for _round in range(200):
            members = (group / "cgroup.procs").read_text().split()
            if not members:
                break
            for member in members:
                with contextlib.suppress(OSError):
                    (PIDS_CGROUPS / "cgroup.procs").write_text(member)
            time.sleep(0.01)
        group.rmdir()


@contextlib.contextmanager
def tmpfs(root: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `root / "mnt"` (root only), unmounted afterwards."""
    mount = root / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount], check=True)


def fill(disk: Path) -> Path:
    """Write to `disk` until it is full; the file that filled it."""
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    return filler
