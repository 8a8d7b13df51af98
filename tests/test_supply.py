"""Faults in the worker supply: the service stays up, answers 503 with Retry-After while it
cannot make workers, logs the cause once, and recovers by itself when the cause goes away."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
from collections.abc import Iterator

import pytest
import trio

from runtime.config import Config, LimitsConfig, PoolConfig, SandboxConfig
from runtime.errors import HTTPError, OverloadedError
from runtime.pool import Pool, open_pool
from runtime.process import ForkServerError, ForkServerHandle, WorkerProcess
from tests.fakes.memory_worker import MemoryWorker
from tests.helpers import counter_body as body
from tests.helpers import counter_spec as spec
from tests.live import PIDS_CGROUPS, pids_cgroup

# The shared fork server's supply (with one fork server per user, a user's fork server that
# cannot fork is the same 503: runtime.pool._generic_worker).
CONFIG = Config(
    limits=LimitsConfig(wall_time_s=3.0),
    pool=PoolConfig(prewarm_workers=1, load_timeout_s=3.0),
    sandbox=SandboxConfig(fork_server_per_user=False),
)


async def ready(pool: Pool, count: int = 1) -> None:
    while pool.gauges()["ready"] < count:
        await trio.sleep(0.01)


async def outcome(pool: Pool, val_id: int) -> str:
    try:
        await body(pool, spec(val_id))
    except OverloadedError as exc:
        assert ("retry-after", "1") in exc.headers  # noqa: PT017 (a helper: it returns the type)
        return exc.type
    return "ok"


async def until_ok(pool: Pool, first_val_id: int) -> int:
    """Call new vals until one works; how many 503s it took."""
    for attempt in range(1000):
        if await outcome(pool, first_val_id + attempt) == "ok":
            return attempt
        await trio.sleep(0.05)
    raise AssertionError("never recovered")


def supply_errors(caplog: pytest.LogCaptureFixture) -> int:
    return sum("cannot start workers" in r.getMessage() for r in caplog.records)


async def test_a_stopped_fork_server_is_replaced_not_waited_for() -> None:
    # SIGSTOP: the fork server neither answers nor dies. Cold starts used to hang forever.
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            await ready(pool)
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            stopped = pool.fork_server.server.process
            os.kill(stopped.pid, signal.SIGSTOP)
            assert await body(pool, spec(1)) == b"1"  # the ready worker
            assert await outcome(pool, 2) in ("ok", "overloaded")
            await until_ok(pool, 3)
            assert pool.fork_server.restarts >= 1
            await stopped.wait()  # killed, not left stopped
            assert stopped.returncode == -signal.SIGKILL


async def test_a_fork_server_that_cannot_be_restarted_is_503_until_it_can(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            assert await body(pool, spec(1)) == b"1"  # a warm worker, for later
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            start = pool.fork_server._start

            async def cannot_start() -> ForkServerHandle:
                raise BlockingIOError(11, "Resource temporarily unavailable")

            pool.fork_server._start = cannot_start
            zygote = pool.fork_server.server
            os.kill(zygote.process.pid, signal.SIGKILL)
            await zygote.gone.wait()
            # Its workers live on: the warm one still serves its val.
            assert await body(pool, spec(1)) == b"2"
            first = 2
            while await outcome(pool, first) == "ok":  # a prewarmed worker, still alive
                first += 1
            assert first <= 2 + CONFIG.pool.prewarm_workers
            outcomes = [await outcome(pool, val_id) for val_id in range(first, first + 10)]
            assert outcomes == ["overloaded"] * 10
            assert supply_errors(caplog) == 1  # once, not once per request
            await trio.sleep(0.5)  # the prewarm task keeps retrying meanwhile
            pool.fork_server._start = start
            await until_ok(pool, 20)
            assert await body(pool, spec(1)) == b"3"
            assert any("can be started again" in r.getMessage() for r in caplog.records)


async def test_fork_at_the_process_limit_is_503_and_the_fork_server_lives() -> None:
    if not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip("needs a writable pids cgroup (root, cgroup v1 pids controller)")
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            await ready(pool)
            assert pool.fork_server is not None
            assert pool.fork_server.server is not None
            zygote = pool.fork_server.server
            with pids_cgroup(zygote.process.pid) as group:
                (group / "pids.max").write_text("1")  # itself only: fork fails with EAGAIN
                assert await body(pool, spec(1)) == b"1"  # the ready worker
                assert await outcome(pool, 2) == "overloaded"
                assert "temporarily unavailable" in pool.supply.reason
                (group / "pids.max").write_text("max")
                await until_ok(pool, 3)
            # The same fork server: EAGAIN is an answer, not a reason to die.
            assert pool.fork_server.server is zygote
            assert pool.fork_server.restarts == 0


@contextlib.contextmanager
def descriptors_exhausted() -> Iterator[None]:
    """This process at its descriptor limit (the limit lowered, the rest filled)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 4096), hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_is_503_not_a_crash_and_recovers() -> None:
    # The fork server's SCM_RIGHTS message arrives cut (MSG_CTRUNC): it used to be unpacked
    # as if whole, which ended the control reader and with it the service.
    with trio.fail_after(30):
        async with open_pool(CONFIG) as pool:
            await ready(pool)
            assert await body(pool, spec(1)) == b"1"
            await ready(pool)
            with descriptors_exhausted():
                try:
                    await body(pool, spec(2))  # the ready worker; its refill fails
                except HTTPError as exc:  # or this request itself needs a descriptor
                    assert exc.status in (502, 503), exc  # noqa: PT017 (either may happen)
                while not pool.supply.failing:
                    await trio.sleep(0.01)
                assert "descriptors" in pool.supply.reason
            await until_ok(pool, 3)
            assert await body(pool, spec(1)) == b"2"  # the warm worker served on throughout


async def test_the_supply_recovers_by_itself_even_with_every_ready_worker_in_place() -> None:
    # A request found no worker to spare and the supply failed; the prewarm task, its ready
    # list full, must still be the one that retries, or an idle service stays degraded.
    broken = False
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def factory() -> WorkerProcess:
                if broken:
                    raise ForkServerError("the fork server exited")
                return MemoryWorker(nursery, 0.0)

            pool = Pool(Config(pool=PoolConfig(prewarm_workers=1)), nursery, factory)
            await nursery.start(pool.serve_prewarm)
            await ready(pool)
            broken = True
            with pytest.raises(OverloadedError):
                await pool.supply.get()  # as a request that needed one more worker
            broken = False
            while pool.supply.failing:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
