"""Shutdown stays orderly whatever signals arrive, and a kill -9 leaves nothing for long."""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
from pathlib import Path

import httpx
import trio

from runtime.workdir import OWNER, remove_stale_workdirs
from tests.live import alive, put_val, sleeping, start_live

SLOW = "import time\ndef slow(req):\n    time.sleep(20)\n    return 'done'\n"


def workdirs(tmpdir: Path) -> list[Path]:
    return sorted(tmpdir.glob("valrun-workers-*"))


async def test_a_second_sigterm_cuts_the_grace_short_but_not_the_shutdown(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[limits]\nwall_time_s = 60.0\n", tmpdir=tmpdir)
        statuses: list[int | str] = []
        async with httpx.AsyncClient(timeout=60) as client:
            await put_val(client, live, "slow", SLOW)

            async def call() -> None:
                try:
                    response = await client.get(live.base_url, headers=live.web_headers("slow"))
                    statuses.append(response.status_code)
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)

            async with trio.open_nursery() as calls:
                for _ in range(2):
                    calls.start_soon(call)
                while sum(sleeping(pid) for pid in live.worker_pids()) < 2:
                    await trio.sleep(0.02)
                fork_server, workers = live.fork_server_pid(), live.worker_pids()
                assert len(workdirs(tmpdir)) == 1
                live.process.send_signal(signal.SIGTERM)
                while not any("received SIGTERM" in line for line in live.stderr):
                    await trio.sleep(0.02)  # the first one is being acted on
                live.process.send_signal(signal.SIGTERM)
                await live.process.wait()
        # Orderly: a clean exit, the records written, nothing left behind.
        assert live.process.returncode == 0, "\n".join(live.stderr)
        assert len(statuses) == 2
        assert not alive(fork_server)
        assert [pid for pid in workers if alive(pid)] == []
        assert workdirs(tmpdir) == []
        with sqlite3.connect(tmp_path / "valrun.db") as db:
            recorded = db.execute("SELECT status, error_type FROM runs").fetchall()
        assert recorded == [(499, "cancelled")] * 2


async def test_a_killed_front_end_s_workers_directory_goes_at_the_next_start(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    with trio.fail_after(60):
        first = await start_live(nursery, tmp_path, tmpdir=tmpdir)
        fork_server = first.fork_server_pid()
        (left,) = workdirs(tmpdir)
        first.process.kill()
        await first.process.wait()
        while alive(fork_server):  # it ends at its control socket's EOF
            await trio.sleep(0.02)
        assert left.exists()
        second = await start_live(nursery, tmp_path, tmpdir=tmpdir)
        (current,) = workdirs(tmpdir)
        assert current != left
        assert not left.exists()
        second.process.terminate()
        await second.process.wait()
        assert workdirs(tmpdir) == []


def test_only_directories_whose_owner_is_gone_are_removed(tmp_path: Path) -> None:
    def workdir(name: str, *, owner: bool) -> Path:
        path = tmp_path / f"valrun-workers-{name}"
        path.mkdir()
        if owner:
            (path / OWNER).touch()
        return path

    dead = workdir("dead", owner=True)
    running = workdir("running", owner=True)
    unknown = workdir("unknown", owner=False)  # being made, or an older valrun's
    (tmp_path / "valrun-workers-link").symlink_to(running)
    held = os.open(running / OWNER, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert remove_stale_workdirs(tmp_path) == 1
    finally:
        os.close(held)
    assert not dead.exists()
    assert running.exists()
    assert unknown.exists()
