"""Fault injection against a real valrun: what each fault costs, and whether it recovers.

    scripts/faults                      # every fault, about two minutes; root needed for most
    scripts/faults --only fork_server_kills,double_sigterm --json out.json

Each fault runs against a valrun of its own (`python -m runtime.cli serve` on a free loopback
port, its store and temporary folder in a fresh directory) under background traffic: warm
requests to a val, saves of new versions, env sets. For each fault it reports:

- failed: background requests that failed while the fault was in force (and after it);
- recovery_s: from the moment the cause is gone to the first cold start that works again;
- left_behind: fork servers and workers seen during the run still alive 1 s after the end;
- lost: saves and env sets that were acknowledged (2xx) but are not in the store afterwards.

The goal: only the requests the fault touched fail, recovery under 1 s, nothing left, nothing
lost. Faults that need root (a pids cgroup, a tmpfs, prlimit on another process) are skipped
with a note when not run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import trio

from tests.live import alive, children, pids_cgroup  # scripts/faults puts the repo on the path

REPO = Path(__file__).resolve().parent.parent
HELLO = "def hello(req):\n    return 'hi'\n"
SLOW = "import time\ndef slow(req):\n    time.sleep(20)\n    return 'done'\n"


@dataclass
class Result:
    fault: str
    failed: int = 0
    requests: int = 0
    recovery_s: float | None = None
    left_behind: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class Valrun:
    """One valrun under test, restartable on the same port and store."""

    root: Path
    port: int
    extra_config: str = ""
    db_dir: Path | None = None  # where the store lives (default: root)
    process: subprocess.Popen[bytes] | None = None
    token: str = ""
    #: Another user's token for env sets: they retire that user's warm workers, so they
    #: are not alice's, whose vals the warm traffic calls.
    env_token: str = ""
    seen: set[int] = field(default_factory=set)  # fork servers and workers ever seen

    @property
    def db(self) -> Path:
        return (self.db_dir or self.root) / "valrun.db"

    @property
    def tmpdir(self) -> Path:
        return self.root / "tmp"

    def api(self, token: str | None = None) -> dict[str, str]:
        bearer = token or self.token
        return {"host": f"api.localhost:{self.port}", "authorization": f"Bearer {bearer}"}

    def web(self, val: str) -> dict[str, str]:
        return {"host": f"alice-{val}.web.localhost:{self.port}"}

    def start(self) -> None:
        self.tmpdir.mkdir(exist_ok=True)
        config = self.root / "valrun.toml"
        config.write_text(
            f'[store]\nurl = "sqlite:///{self.db}"\n'
            # One front end and one shared fork server: the faults kill "the" front end and
            # "the" fork server (the defaults are a process per core and one per user).
            f'[server]\nbind = ["127.0.0.1:{self.port}"]\nprocesses = 1\n'
            "[sandbox]\nfork_server_per_user = false\n" + self.extra_config
        )
        if not self.token:
            command = [*self._cli(config), "user", "create", "alice"]
            made = subprocess.run(command, capture_output=True, text=True, check=True)
            self.token = made.stdout.split()[-1]
            command = [*self._cli(config), "user", "create", "bob"]
            made = subprocess.run(command, capture_output=True, text=True, check=True)
            self.env_token = made.stdout.split()[-1]
        self.process = subprocess.Popen(
            [*self._cli(config), "serve"],
            stderr=subprocess.DEVNULL,
            cwd=self.root,
            env={**os.environ, "TMPDIR": str(self.tmpdir)},
        )

    def _cli(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "runtime.cli", "--config", str(config)]

    async def ready(self, client: httpx.AsyncClient) -> None:
        with trio.fail_after(30):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    await client.get("/healthz", headers=self.api())
                    return
                await trio.sleep(0.02)

    def fork_servers(self) -> list[int]:
        """The front end's fork server: of its children, the one in its network namespace
        (the front end also adopts the workers of a fork server that died, and those have
        a namespace of their own)."""
        if not self.process:
            return []
        front_end_net = os.readlink(f"/proc/{self.process.pid}/ns/net")
        found = []
        for pid in children(self.process.pid):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/net") == front_end_net:
                    found.append(pid)
        return found

    def note_processes(self) -> None:
        if self.process:
            for child in children(self.process.pid):  # fork servers and adopted workers
                self.seen.add(child)
                self.seen.update(children(child))

    def left_behind(self) -> int:
        return sum(alive(pid) for pid in self.seen)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Traffic:
    """Background requests: warm GETs, saves and env sets; counts failures, keeps acks."""

    def __init__(self, valrun: Valrun, client: httpx.AsyncClient) -> None:
        self.valrun = valrun
        self.client = client
        self.requests = 0
        self.failed = 0
        self.failed_by_kind: Counter[str] = Counter()
        self.saves: dict[str, int] = {}  # val -> newest acknowledged version
        self.env: set[str] = set()
        self._n = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            for lane in range(4):
                nursery.start_soon(self._lane, lane)

    async def _lane(self, lane: int) -> None:
        while True:
            self._n += 1
            n = self._n
            kind = ("warm", "warm", "save", "env")[n % 4]
            self.requests += 1
            try:
                if kind == "warm":
                    response = await self.client.get("/", headers=self.valrun.web("hello"))
                elif kind == "save":
                    val = f"s{lane}"
                    response = await self.client.put(
                        f"/v1/vals/alice/{val}", headers=self.valrun.api(), content=HELLO
                    )
                    if response.status_code in (200, 201):
                        self.saves[val] = response.json()["version"]
                else:
                    key = f"K{n}"
                    response = await self.client.put(
                        f"/v1/env/{key}",
                        headers=self.valrun.api(self.valrun.env_token),
                        content="v",
                    )
                    if response.status_code == 200:
                        self.env.add(key)
                ok = response.status_code < 400
                why = str(response.status_code)
            except httpx.HTTPError as exc:
                ok, why = False, type(exc).__name__
            if not ok:
                self.failed += 1
                self.failed_by_kind[f"{kind} {why}"] += 1
                await trio.sleep(0.02)  # a refused request is not a busy loop

    def lost(self) -> int:
        with contextlib.closing(sqlite3.connect(self.valrun.db)) as db:
            versions: dict[str, int] = dict(
                db.execute(
                    "SELECT vals.name, max(version) FROM versions JOIN vals ON vals.id = val_id "
                    "GROUP BY vals.id"
                ).fetchall()
            )
            keys = {str(row[0]) for row in db.execute("SELECT key FROM env")}
        lost = sum(versions.get(val, 0) < version for val, version in self.saves.items())
        return lost + len(self.env - keys)


async def cold_start(valrun: Valrun, client: httpx.AsyncClient, n: int) -> str:
    """Save a new val and call it: "200", another status, or the transport error."""
    val = f"cold{n}"
    code = f"def {val}(req):\n    return 'hi'\n"
    try:
        saved = await client.put(f"/v1/vals/alice/{val}", headers=valrun.api(), content=code)
        if saved.status_code not in (200, 201):
            return f"save {saved.status_code}"
        return str((await client.get("/", headers=valrun.web(val))).status_code)
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def cold_start_works(valrun: Valrun, client: httpx.AsyncClient, n: int) -> bool:
    return await cold_start(valrun, client, n) == "200"


async def cold_starts(valrun: Valrun, client: httpx.AsyncClient, first: int, count: int) -> str:
    """`count` cold starts in a row, as a note: how each was answered."""
    answers = Counter([await cold_start(valrun, client, first + n) for n in range(count)])
    return "cold starts during the fault: " + ", ".join(f"{a} x{n}" for a, n in answers.items())


async def recovery(valrun: Valrun, client: httpx.AsyncClient) -> float:
    started = time.monotonic()
    n = 0
    with trio.fail_after(60):
        while not await cold_start_works(valrun, client, 10_000 + n):
            n += 1
            await trio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(
    fault: str, extra_config: str = "", db_dir: Path | None = None, *, traffic: bool = True
) -> AsyncIterator[tuple[Valrun, Traffic]]:
    with tempfile.TemporaryDirectory(prefix=f"valrun-faults-{fault}-") as root:
        valrun = Valrun(Path(root), free_port(), extra_config, db_dir)
        valrun.start()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{valrun.port}", timeout=30
        ) as client:
            await valrun.ready(client)
            await client.put("/v1/vals/alice/hello", headers=valrun.api(), content=HELLO)
            await client.get("/", headers=valrun.web("hello"))  # warm before any fault
            background = Traffic(valrun, client)
            try:
                async with trio.open_nursery() as nursery:
                    if traffic:
                        await nursery.start(background.run)
                    nursery.start_soon(_watch_processes, valrun)
                    yield valrun, background
                    nursery.cancel_scope.cancel()
            finally:
                if valrun.process and valrun.process.poll() is None:
                    valrun.process.terminate()
                    await trio.to_thread.run_sync(valrun.process.wait)


async def _watch_processes(valrun: Valrun) -> None:
    while True:
        valrun.note_processes()
        await trio.sleep(0.05)


async def finish(result: Result, valrun: Valrun, traffic: Traffic) -> Result:
    result.failed, result.requests = traffic.failed, traffic.requests
    if traffic.failed:
        by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(traffic.failed_by_kind.items()))
        result.notes.append(f"failed: {by_kind}")
    if valrun.process and valrun.process.poll() is None:
        valrun.process.terminate()
        await trio.to_thread.run_sync(valrun.process.wait)
    await trio.sleep(1)
    result.left_behind = valrun.left_behind()
    result.lost = traffic.lost()
    leftover_dirs = list(valrun.tmpdir.glob("valrun-workers-*"))
    if leftover_dirs:
        result.notes.append(f"{len(leftover_dirs)} workers' directories left")
    return result


# --- the faults ------------------------------------------------------------------------------


async def fork_server_kills() -> Result:
    """20 kill -9 of the fork server, 0.25 s apart."""
    result = Result("fork_server_kills")
    async with running(result.fault) as (valrun, traffic):
        for _ in range(20):
            for pid in valrun.fork_servers():
                os.kill(pid, signal.SIGKILL)
            await trio.sleep(0.25)
        result.recovery_s = await recovery(valrun, traffic.client)
        return await finish(result, valrun, traffic)


async def fork_server_stopped() -> Result:
    """SIGSTOP the fork server: it neither answers nor dies."""
    result = Result("fork_server_stopped")
    config = "[pool]\nload_timeout_s = 3.0\nprewarm_workers = 1\n"
    async with running(result.fault, config) as (valrun, traffic):
        (stopped,) = valrun.fork_servers()
        os.kill(stopped, signal.SIGSTOP)
        # The cause stays: valrun must route around it (replace it) by itself. Three cold
        # starts: past the one prewarmed worker, two need the fork server.
        started = time.monotonic()
        for _ in range(3):
            await recovery(valrun, traffic.client)
        result.recovery_s = time.monotonic() - started
        result.notes.append(f"stopped fork server alive afterwards: {alive(stopped)}")
        return await finish(result, valrun, traffic)


async def front_end_kills() -> Result:
    """10 kill -9 of the front end under saves, each followed by a restart."""
    result = Result("front_end_kills")
    async with running(result.fault) as (valrun, traffic):
        integrity_failures = 0
        for _ in range(10):
            await trio.sleep(0.5)
            assert valrun.process is not None
            valrun.process.kill()
            await trio.to_thread.run_sync(valrun.process.wait)
            with contextlib.closing(sqlite3.connect(valrun.db)) as db:
                integrity_failures += db.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
            valrun.start()
            await valrun.ready(traffic.client)
        result.recovery_s = await recovery(valrun, traffic.client)
        result.notes.append(f"integrity_check failures: {integrity_failures}")
        return await finish(result, valrun, traffic)


async def descriptors_exhausted() -> Result:
    """The front end's descriptor limit lowered to what it has open, then restored."""
    result = Result("descriptors_exhausted")
    async with running(result.fault) as (valrun, traffic):
        assert valrun.process is not None
        pid = valrun.process.pid
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        soft = _soft_nofile(pid)
        _prlimit(pid, in_use + 2)
        result.notes.append(await cold_starts(valrun, traffic.client, 0, 10))
        _prlimit(pid, soft)
        result.recovery_s = await recovery(valrun, traffic.client)
        result.notes.append(f"front end alive: {valrun.process.poll() is None}")
        return await finish(result, valrun, traffic)


def _prlimit(pid: int, soft: int) -> None:
    # The soft limit only: raising a hard limit back needs CAP_SYS_RESOURCE.
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:"], check=True)


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError("no 'Max open files' in /proc/PID/limits")


async def process_limit() -> Result:
    """The fork server in a pids cgroup at its limit: fork fails with EAGAIN."""
    result = Result("process_limit")
    async with running(result.fault) as (valrun, traffic):
        (fork_server,) = valrun.fork_servers()
        with pids_cgroup(fork_server) as group:
            (group / "pids.max").write_text("1")
            result.notes.append(await cold_starts(valrun, traffic.client, 0, 20))
            (group / "pids.max").write_text("max")
            result.recovery_s = await recovery(valrun, traffic.client)
        result.notes.append(f"same fork server: {valrun.fork_servers() == [fork_server]}")
        return await finish(result, valrun, traffic)


async def full_disk() -> Result:
    """The store's disk (an 8 MiB tmpfs) filled up for 2 s, then freed."""
    result = Result("full_disk")
    with tempfile.TemporaryDirectory(prefix="valrun-faults-disk-") as mount:
        # A one-off mount before anything runs, and a umount after: nothing to overlap with.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount], check=True)  # noqa: ASYNC221
        try:
            disk = Path(mount)
            async with running(result.fault, db_dir=disk) as (valrun, traffic):
                filler = disk / "filler"
                with contextlib.suppress(OSError), open(filler, "wb") as f:  # noqa: ASYNC230
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                refused = await traffic.client.put(
                    "/v1/vals/alice/big", headers=valrun.api(), content="#" * 200_000
                )
                result.notes.append(f"a save on the full disk: {refused.status_code}")
                await trio.sleep(2)
                filler.unlink()
                result.recovery_s = await recovery(valrun, traffic.client)
                return await finish(result, valrun, traffic)
        finally:
            subprocess.run(["umount", "-l", mount], check=True)  # noqa: ASYNC221


async def double_sigterm() -> Result:
    """Two SIGTERMs while two slow requests run: the second cuts the grace period."""
    result = Result("double_sigterm")
    config = "[limits]\nwall_time_s = 60.0\n"
    # No background traffic: after the signals every request fails, as it should.
    async with running(result.fault, config, traffic=False) as (valrun, traffic):
        await traffic.client.put("/v1/vals/alice/slow", headers=valrun.api(), content=SLOW)
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                call = traffic.client.get("/", headers=valrun.web("slow"))
                nursery.start_soon(_ignore_errors, call)
            await trio.sleep(1)
            assert valrun.process is not None
            started = time.monotonic()
            valrun.process.send_signal(signal.SIGTERM)
            await trio.sleep(0.3)
            valrun.process.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(valrun.process.wait)
            result.recovery_s = time.monotonic() - started  # here: time to a clean exit
        result.notes.append(f"exit status {code}")
        with contextlib.closing(sqlite3.connect(valrun.db)) as db:
            cancelled = db.execute("SELECT count(*) FROM runs WHERE status = 499").fetchone()[0]
        result.notes.append(f"cancelled requests recorded: {cancelled}")
        return await finish(result, valrun, traffic)


async def _ignore_errors(request: Awaitable[object]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        await request


FAULTS: dict[str, Callable[[], Awaitable[Result]]] = {
    "fork_server_kills": fork_server_kills,
    "fork_server_stopped": fork_server_stopped,
    "front_end_kills": front_end_kills,
    "descriptors_exhausted": descriptors_exhausted,
    "process_limit": process_limit,
    "full_disk": full_disk,
    "double_sigterm": double_sigterm,
}
NEEDS_ROOT = {"descriptors_exhausted", "process_limit", "full_disk"}


async def main_async(names: list[str]) -> list[Result]:
    results = []
    for name in names:
        if name in NEEDS_ROOT and os.geteuid() != 0:
            results.append(Result(name, notes=["skipped: needs root"]))
            continue
        print(f"faults: {name} ...", file=sys.stderr, flush=True)
        results.append(await FAULTS[name]())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated faults: " + ", ".join(FAULTS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(FAULTS)
    unknown = set(names) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    os.chdir(REPO)  # `python -m runtime.cli` runs this checkout
    results = trio.run(main_async, names)
    print(f"{'fault':24} {'failed':>12} {'recovery_s':>10} {'left':>5} {'lost':>5}  notes")
    for r in results:
        recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.2f}"
        print(
            f"{r.fault:24} {f'{r.failed}/{r.requests}':>12} {recovery:>10} "
            f"{r.left_behind:>5} {r.lost:>5}  {'; '.join(r.notes)}"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
