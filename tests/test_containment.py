"""Workers die when the processes that supervise them die, whatever uid they run as.

A val that sleeps far past its wall-time limit is mid-request when its fork server, its front
end, or both are killed with SIGKILL: one second later no worker may be alive. (They used to
run on re-parented: the uid drop cleared their parent-death signal.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from tests.live import LiveValrun, alive, put_val, start_live

SLEEPER = "import time\ndef sleeper(req):\n    time.sleep(40)\n    return 'woke'\n"


async def busy_worker(live: LiveValrun, client: httpx.AsyncClient, nursery: trio.Nursery) -> int:
    await put_val(client, live, "sleeper", SLEEPER)

    async def call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the front end is killed under it
            await client.get(live.base_url + "/", headers=live.web_headers("sleeper"))

    nursery.start_soon(call)
    while not any(sleeping(pid) for pid in live.worker_pids()):
        await trio.sleep(0.02)
    return len(live.worker_pids())


def sleeping(pid: int) -> bool:
    """In the val's `time.sleep`: the kernel function it waits in (proc(5): wchan)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "nanosleep" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize(
    "kill",
    [
        "fork_server_then_front_end",
        "front_end_then_fork_server",
        "front_end_of_a_stopped_fork_server",
    ],
)
async def test_no_worker_outlives_its_supervisors(
    kill: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[limits]\nwall_time_s = 60.0\n")
        async with httpx.AsyncClient(timeout=60) as client:
            assert await busy_worker(live, client, nursery) >= 1
            fork_server = live.fork_server_pid()
            workers = live.worker_pids()
            if kill == "fork_server_then_front_end":
                os.kill(fork_server, signal.SIGKILL)
                live.process.kill()
            elif kill == "front_end_then_fork_server":
                live.process.kill()
                os.kill(fork_server, signal.SIGKILL)
            else:  # a fork server that cannot notice anything: the workers still must
                os.kill(fork_server, signal.SIGSTOP)
                live.process.kill()
            await live.process.wait()
            await trio.sleep(1)
            assert [pid for pid in workers if alive(pid)] == []
            os.kill(fork_server, signal.SIGKILL)  # a stopped one stays; it ran no val


async def test_a_killed_fork_server_takes_its_workers_and_the_service_goes_on(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[limits]\nwall_time_s = 60.0\n")
        async with httpx.AsyncClient(timeout=60) as client:
            await busy_worker(live, client, nursery)
            fork_server = live.fork_server_pid()
            workers = live.worker_pids()
            os.kill(fork_server, signal.SIGKILL)
            await trio.sleep(1)
            assert [pid for pid in workers if alive(pid)] == []
            await put_val(client, live, "hi", "def hi(req):\n    return 'hi'\n")
            response = await client.get(live.base_url + "/", headers=live.web_headers("hi"))
            assert response.status_code == 200 and response.text == "hi"
            live.process.terminate()
            await live.process.wait()
