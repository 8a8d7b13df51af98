"""Workers die when the front end that supervises them dies, whatever uid they run as, and a
fork server's death costs them nothing.

A val that sleeps far past its wall-time limit is mid-request when the front end (and its fork
server, in either order, or a stopped one) is killed with SIGKILL: one second later no worker
may be alive (sandbox.tether: the hang-up of the worker's socket ends it, even mid-val). They
used to run on, re-parented, after their 504 had been reported. When only the fork server
dies, its workers finish their requests and the front end still enforces their wall time.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import httpx
import pytest
import trio

from tests.live import LiveValrun, alive, put_val, sleeping, start_live

SLEEPER = "import time\ndef sleeper(req):\n    time.sleep(40)\n    return 'woke'\n"


async def gone(pids: list[int]) -> None:
    """Every one of `pids` exits soon: within 15 s, where each would otherwise sleep 40 s (a
    worker demoted to idle priority needs a moment of CPU to act on its signal and die)."""
    with trio.move_on_after(15):
        while any(alive(pid) for pid in pids):
            await trio.sleep(0.05)
    assert [pid for pid in pids if alive(pid)] == []


async def busy_worker(live: LiveValrun, client: httpx.AsyncClient, nursery: trio.Nursery) -> int:
    await put_val(client, live, "sleeper", SLEEPER)

    async def call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the front end is killed under it
            await client.get(live.base_url + "/", headers=live.web_headers("sleeper"))

    nursery.start_soon(call)
    while not any(sleeping(pid) for pid in live.worker_pids()):
        await trio.sleep(0.02)
    return len(live.worker_pids())


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
            await gone(workers)
            os.kill(fork_server, signal.SIGKILL)  # a stopped one stays; it ran no val


async def test_a_killed_fork_server_s_workers_finish_their_requests(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The front end supervises workers; the fork server only makes them. Its death costs no
    # request (a replacement makes the next workers).
    nap = "import time\ndef nap(req):\n    time.sleep(2)\n    return 'woke'\n"
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[limits]\nwall_time_s = 60.0\n")
        async with httpx.AsyncClient(timeout=60, base_url=live.base_url) as client:
            await put_val(client, live, "nap", nap)
            answers: list[httpx.Response] = []

            async def call() -> None:
                answers.append(await client.get("/", headers=live.web_headers("nap")))

            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                while not any(sleeping(pid) for pid in live.worker_pids()):
                    await trio.sleep(0.02)
                os.kill(live.fork_server_pid(), signal.SIGKILL)
            assert answers[0].status_code == 200
            assert answers[0].text == "woke"
            await put_val(client, live, "hi", "def hi(req):\n    return 'hi'\n")
            response = await client.get("/", headers=live.web_headers("hi"))
            assert response.status_code == 200
            assert response.text == "hi"
        live.process.terminate()
        await live.process.wait()


async def test_wall_time_is_enforced_after_the_fork_server_died(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The front end keeps its workers' pidfds when their fork server dies: a val past its
    # wall time is still killed (it used to sleep on, unkillable, after its 504).
    with trio.fail_after(60):
        live = await start_live(nursery, tmp_path, "[limits]\nwall_time_s = 3.0\n")
        async with httpx.AsyncClient(timeout=60, base_url=live.base_url) as client:
            await put_val(client, live, "sleeper", SLEEPER)
            answers: list[httpx.Response] = []

            async def call() -> None:
                answers.append(await client.get("/", headers=live.web_headers("sleeper")))

            async with trio.open_nursery() as calls:
                calls.start_soon(call)
                while not (busy := [pid for pid in live.worker_pids() if sleeping(pid)]):
                    await trio.sleep(0.02)
                os.kill(live.fork_server_pid(), signal.SIGKILL)
            assert answers[0].status_code == 504
            await gone(busy)
        live.process.terminate()
        await live.process.wait()
