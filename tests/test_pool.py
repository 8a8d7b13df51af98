"""The pool with the real fork server: prewarming, reuse, retirement, restarts."""

from __future__ import annotations

import os
import signal

import trio

from runtime.config import Config, LimitsConfig, PoolConfig, SandboxConfig
from runtime.pool import open_pool
from tests.helpers import counter_body as body
from tests.helpers import counter_spec as spec

# The shared fork server (one for all users), whose supervision and prewarming these tests
# look at directly; each user's own (the default) is tested in test_attacks_tenants.py.
CONFIG = Config(
    limits=LimitsConfig(wall_time_s=3.0),
    pool=PoolConfig(prewarm_workers=2),
    sandbox=SandboxConfig(fork_server_per_user=False),
)


async def test_prewarmed_workers_are_used_and_refilled() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            # ASYNC110: the pool has no event for this, so poll (under the fail_after above).
            while pool.gauges()["ready"] < 2:
                await trio.sleep(0.01)
            assert await body(pool, spec(1)) == b"1"
            assert await body(pool, spec(2)) == b"1"
            assert pool.stats["prewarmed_used"] == 2
            # Refilled in the background; no event says so (ASYNC110): poll, under fail_after.
            while pool.gauges()["ready"] < 2:
                await trio.sleep(0.01)


async def test_warm_worker_is_reused_and_a_changed_env_gets_a_new_one() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            assert [await body(pool, spec()) for _ in range(3)] == [b"1", b"2", b"3"]
            assert await body(pool, spec(env=(("K", "v"),))) == b"1"
            assert pool.stats["cold_starts"] == 2


async def test_retired_val_gets_a_fresh_worker() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec()) == b"1"
            pool.retire(1)
            assert await body(pool, spec()) == b"1"


async def test_fork_server_killed_is_restarted() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec(1)) == b"1"
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            zygote = pool.fork_server.server
            os.kill(zygote.process.pid, signal.SIGKILL)
            await zygote.gone.wait()
            # A new fork server makes the next workers; new vals still get them.
            for val_id in (2, 3, 4):
                assert await body(pool, spec(val_id)) == b"1"
            assert pool.fork_server.restarts == 1


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def test_workers_run_confined() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec()) == b"1"
            # The worker that answered: it is surely confined (a prewarmed spare may still be
            # between the fork and its confinement while we look).
            pids = [worker.pid for worker in pool.idle_workers()]
            assert len(pids) == 1
            for pid in pids:
                status = proc_status(pid)
                assert status["NoNewPrivs"] == "1"
                assert status["Seccomp"] == "2"  # filter mode
                if os.geteuid() == 0:
                    assert status["Uid"].split()[0] == "65534"
                environ = await trio.Path(f"/proc/{pid}/environ").read_bytes()
                assert environ.strip(b"\0") == b""
                assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
                cwd = os.readlink(f"/proc/{pid}/cwd")
                assert cwd.startswith("/tmp/valrun-workers-")
                assert cwd.rsplit("/", 1)[1].startswith("w")
            assert all(entry["active"] for entry in pool.isolation.values())


async def test_a_long_request_runs_at_idle_priority_until_it_answers() -> None:
    # Demoted after 50 ms, it spins on for 1.45 s: time enough to see it idle.
    spin = (
        "import time\n"
        "def c(req):\n"
        "    end = time.monotonic() + 1.5\n"
        "    while time.monotonic() < end:\n"
        "        pass\n"
        "    return 'done'\n"
    )
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool, trio.open_nursery() as nursery:
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            results: list[bytes] = []
            answered = trio.Event()

            async def call() -> None:
                results.append(await body(pool, spec(code=spin)))
                answered.set()

            nursery.start_soon(call)
            # ASYNC110: the pool has no event for this, so poll (under the fail_after above).
            while pool.stats["demoted"] == 0:
                await trio.sleep(0.01)
            (worker,) = [
                w
                for w in pool.fork_server.server.workers.values()
                if w.still_running() and os.sched_getscheduler(w.pid) == os.SCHED_IDLE
            ]
            assert os.getpriority(os.PRIO_PROCESS, worker.pid) == 10
            await answered.wait()
            assert results == [b"done"]
            assert os.sched_getscheduler(worker.pid) == os.SCHED_OTHER  # warm, and promoted


async def test_fork_server_outlives_the_thread_that_started_it() -> None:
    # trio starts processes from pooled threads that exit after 10 s idle; a fork server
    # that asked for PR_SET_PDEATHSIG would be killed with that thread (it once was).
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec(1)) == b"1"
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            zygote = pool.fork_server.server
            await trio.sleep(11)  # intrinsic to the bug: the thread cache's idle timeout
            assert zygote.process.returncode is None
            assert await body(pool, spec(2)) == b"1"
            assert pool.fork_server.restarts == 0


async def test_a_worker_whose_memory_grows_is_recycled() -> None:
    leak = (
        "kept = []\n"
        "def c(req):\n"
        "    kept.append(bytearray(1024 * 1024))\n"
        "    return str(len(kept))\n"
    )
    config = Config(pool=PoolConfig(max_worker_rss_mb=40, max_workers_per_val=1))
    with trio.fail_after(30):
        async with open_pool(config) as pool:
            counts = [int(await body(pool, spec(code=leak))) for _ in range(64)]
    # The pool looks after every request: past 40 MiB the worker goes and module state
    # restarts. A worker starts well over 8 MiB (an interpreter with the sandbox loaded), so
    # that is fewer than 32 requests in, where a look every 32 requests would first see it.
    assert pool.stats["killed_memory_growth"] >= 2
    first_reset = counts.index(1, 1)  # a fresh worker
    assert 1 < first_reset < 32
    assert counts[:first_reset] == list(range(1, first_reset + 1))
    assert counts[first_reset : 2 * first_reset] == list(range(1, first_reset + 1))


async def test_a_warm_worker_that_died_idle_costs_no_request() -> None:
    with trio.fail_after(20):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec()) == b"1"
            (victim,) = pool.idle_workers()
            victim.kill()
            # ASYNC110: a process's exit has no event here, so poll (under the fail_after above).
            while victim.still_running():
                await trio.sleep(0.01)
            assert await body(pool, spec()) == b"1"  # a fresh worker, not a 502
            assert pool.stats["died_idle"] == 1
