"""What a worker may take of the machine beyond its own rlimits: CPU while its module loads
(demoted like a long request), and memory, all workers together (`max_total_worker_mib`)."""

from __future__ import annotations

import os

import pytest
import trio

from runtime.config import Config, LimitsConfig, PoolConfig, SandboxConfig
from runtime.errors import OverloadedError, WorkerError
from runtime.pool import MIB, Pool, ValSpec, open_pool
from runtime.process import WorkerProcess
from sandbox.messages import HttpRequest
from tests.fakes.memory_worker import MemoryWorker
from tests.helpers import counter_body, counter_spec

REQUEST = HttpRequest(0, "GET", "/", "/", "", ())
SHARED = SandboxConfig(fork_server_per_user=False)  # its workers are listed on its handle

LOAD_SPIN = (
    "import time\n"
    "end = time.monotonic() + 3.0\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
    "def c(req):\n"
    "    return 'loaded'\n"
)


async def test_a_module_spinning_while_it_loads_runs_at_idle_priority() -> None:
    config = Config(
        limits=LimitsConfig(wall_time_s=10.0),
        # Loading spins 3 s, the request after it is quick: no stall of this process makes
        # it look long.
        pool=PoolConfig(prewarm_workers=1, demote_after_s=0.5),
        sandbox=SHARED,
    )
    with trio.fail_after(30):
        async with open_pool(config) as pool, trio.open_nursery() as nursery:
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            answered = trio.Event()
            results: list[bytes] = []

            async def call() -> None:
                results.append(await counter_body(pool, counter_spec(code=LOAD_SPIN)))
                answered.set()

            nursery.start_soon(call)
            while pool.stats["demoted_loading"] == 0:  # ASYNC110: polled, under fail_after
                await trio.sleep(0.01)
            (worker,) = [
                w
                for w in pool.fork_server.server.workers.values()
                if w.still_running() and os.sched_getscheduler(w.pid) == os.SCHED_IDLE
            ]
            await answered.wait()
            assert results == [b"loaded"]
            assert os.sched_getscheduler(worker.pid) == os.SCHED_OTHER  # promoted once loaded
            assert pool.stats["demoted"] == 0  # the request itself was quick


GROWING = (
    "import time\n"
    "def c(req):\n"
    "    kept = []\n"
    "    for _ in range(40):\n"
    "        kept.append(b'x' * (4 * 1024 * 1024))\n"
    "        time.sleep(0.05)\n"
    "    return 'kept'\n"
)

GROWING_WHILE_LOADING = (
    "import time\n"
    "kept = []\n"
    "for _ in range(40):\n"
    "    kept.append(b'x' * (4 * 1024 * 1024))\n"
    "    time.sleep(0.05)\n"
    "def c(req):\n"
    "    return 'kept'\n"
)


@pytest.mark.parametrize("code", [GROWING, GROWING_WHILE_LOADING], ids=["running", "loading"])
async def test_the_largest_worker_over_the_total_ceiling_is_stopped_at_once(code: str) -> None:
    # 40 x 4 MiB would be 160 MiB, under the worker's own 256 MiB address space; all workers
    # together may hold 120 MiB, so the growing one is stopped within one request or load.
    config = Config(
        limits=LimitsConfig(wall_time_s=20.0),
        pool=PoolConfig(prewarm_workers=1, max_total_worker_mib=120),
        sandbox=SHARED,
    )
    with trio.fail_after(40):
        async with open_pool(config) as pool:
            with pytest.raises(WorkerError) as stopped:
                await counter_body(pool, counter_spec(code=code))
            assert stopped.value.type == "memory_limit"
            assert "pool.max_total_worker_mib" in stopped.value.message
            assert pool.stats["killed_memory_total"] >= 1
            assert await counter_body(pool, counter_spec(2)) == b"1"  # others go on


# --- the ceiling's choices, with in-memory workers of a stated size --------------------------


def spec(owner: str, val_id: int) -> ValSpec:
    return ValSpec(val_id, 1, owner, f"v{val_id}", "", (), f"{owner}-v.web.localhost")


async def sized_pool(
    nursery: trio.Nursery, sizes_mib: list[int], delay_s: float, ceiling_mib: int
) -> Pool:
    """A pool whose n-th new worker reports sizes_mib[n] MiB resident."""
    made = iter(sizes_mib)

    async def factory() -> WorkerProcess:
        worker = MemoryWorker(nursery, delay_s)
        worker.rss = next(made) * MIB
        return worker

    config = Config(pool=PoolConfig(max_total_worker_mib=ceiling_mib, prewarm_workers=1))
    return Pool(config, nursery, factory)


async def test_over_the_ceiling_the_largest_idle_worker_goes_first() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            pool = await sized_pool(nursery, [30, 60, 40], 0.0, ceiling_mib=100)
            for val_id in (1, 2, 3):
                await pool.invoke(spec("alice", val_id), REQUEST)
            sizes = sorted((w.rss_bytes() or 0) // MIB for w in pool.idle_workers())
            assert sizes == [30, 40, 60]
            await nursery.start(pool.serve_memory_ceiling)
            while pool.stats["killed_memory_total"] == 0:  # ASYNC110: polled, under fail_after
                await trio.sleep(0.01)
            assert sorted((w.rss_bytes() or 0) // MIB for w in pool.idle_workers()) == [30, 40]
            assert pool.memory_bytes == 70 * MIB
            nursery.cancel_scope.cancel()


async def test_a_new_worker_over_the_ceiling_held_by_busy_workers_is_503() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            pool = await sized_pool(nursery, [150, 10], 10.0, ceiling_mib=100)
            nursery.start_soon(pool.invoke, spec("alice", 1), REQUEST)  # busy for 10 s
            while pool.gauges()["busy"] == 0:  # ASYNC110: polled, under fail_after
                await trio.sleep(0.01)
            pool.memory_bytes = 150 * MIB  # as the last look found (no sweep runs here)
            with pytest.raises(OverloadedError) as refused:
                await pool.invoke(spec("bob", 2), REQUEST)
            assert refused.value.details == {"limit": "pool.max_total_worker_mib"}
            assert pool.gauges()["busy"] == 1  # not killed for a newcomer
            nursery.cancel_scope.cancel()
