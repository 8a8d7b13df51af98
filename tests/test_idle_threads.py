"""Users' SQL runs at idle CPU priority in threads of its own (runtime/idle_threads.py), and
no other blocking work of the front end is demoted by it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from runtime.config import StorageConfig
from runtime.errors import StorageRefusedError
from runtime.idle_threads import IdleThreads, demote_this_thread
from runtime.storage import SqliteStorage

RUNAWAY = [
    ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r", ())
]


def task_stat(tid: int) -> tuple[str, int, int]:
    """A thread's state letter, CPU ticks (user + system) and scheduling policy, from
    /proc/self/task/TID/stat (proc(5): fields 3, 14, 15 and 41)."""
    text = Path(f"/proc/self/task/{tid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[11]) + int(fields[12]), int(fields[38])


def thread_ids() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/task")]


async def plain_thread_policy() -> int:
    return await trio.to_thread.run_sync(os.sched_getscheduler, 0)


async def test_its_threads_run_at_sched_idle_and_trios_stay_normal() -> None:
    threads = IdleThreads(2, "test-idle")
    limiter = trio.CapacityLimiter(2)
    try:
        for _ in range(3):
            assert await threads.run(lambda: os.sched_getscheduler(0), limiter=limiter) == (
                os.SCHED_IDLE
            )
            # trio's thread cache is reused for everything else: never demoted.
            assert await plain_thread_policy() == os.SCHED_OTHER
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the event loop's own thread
        names = await threads.run(lambda: threading.current_thread().name, limiter=limiter)
        assert names.startswith("test-idle-")
    finally:
        threads.close()


async def test_results_and_errors_come_back_to_the_caller() -> None:
    threads = IdleThreads(1, "test-idle")
    limiter = trio.CapacityLimiter(1)
    try:
        assert await threads.run(lambda: 6 * 7, limiter=limiter) == 42
        with pytest.raises(ZeroDivisionError):
            await threads.run(lambda: 1 // 0, limiter=limiter)
        assert await threads.run(lambda: "after", limiter=limiter) == "after"
    finally:
        threads.close()


async def test_calls_in_flight_never_outnumber_threads() -> None:
    threads = IdleThreads(2, "test-idle")
    try:
        with pytest.raises(ValueError, match="limiter of 3 for 2 threads"):
            await threads.run(lambda: None, limiter=trio.CapacityLimiter(3))
        release = threading.Event()
        limiter = trio.CapacityLimiter(2)
        seen: list[str] = []

        def hold() -> None:
            release.wait(30)
            seen.append(threading.current_thread().name)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: threads.run(hold, limiter=limiter))
                nursery.start_soon(lambda: threads.run(hold, limiter=limiter))
                while limiter.borrowed_tokens < 2:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.01)
                release.set()
        assert sorted(seen) == ["test-idle-0", "test-idle-1"]  # both held one at once
    finally:
        threads.close()


async def test_a_cancelled_caller_waits_for_its_call() -> None:
    threads = IdleThreads(1, "test-idle")
    limiter = trio.CapacityLimiter(1)
    release, finished = threading.Event(), threading.Event()
    scopes: list[trio.CancelScope] = []
    returned: list[bool] = []

    def slow() -> None:
        release.wait(30)
        finished.set()

    async def caller() -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await threads.run(slow, limiter=limiter)
        returned.append(finished.is_set())

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(caller)
                while not limiter.borrowed_tokens:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.01)
                scopes[0].cancel()
                await trio.sleep(0.1)
                assert not returned  # still waiting for the thread
                release.set()
        assert returned == [True]  # it returned only once the call was done
        assert limiter.borrowed_tokens == 0
    finally:
        threads.close()


def test_demoting_falls_back_to_nice_when_sched_idle_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError("refused")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    got: list[tuple[str, int]] = []
    thread = threading.Thread(
        target=lambda: got.append(
            (demote_this_thread(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        )
    )
    thread.start()
    thread.join(30)
    assert got == [("nice", 19)]
    monkeypatch.setattr(os, "setpriority", refuse)
    assert demote_this_thread() == ""  # neither: it says so and runs on


async def test_a_users_runaway_sql_runs_at_sched_idle_and_other_threads_do_not(
    tmp_path: Path,
) -> None:
    config = StorageConfig(sql_timeout_s=3.0, sql_threads=2)
    storage = SqliteStorage(config, tmp_path, 1024 * 1024)
    before = set(thread_ids())
    outcome: list[str] = []

    async def runaway() -> None:
        with pytest.raises(StorageRefusedError) as refused:
            await storage.sql("alice", RUNAWAY, batch=False)
        outcome.append(refused.value.type)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runaway)
                # The thread that runs it: a new one, running (R) and using CPU, while the
                # SQL runs; read from /proc, not asked of the thread itself.
                running: dict[int, tuple[str, int, int]] = {}
                while not outcome and not running:  # ASYNC110: polled, under fail_after
                    await trio.sleep(0.05)
                    for tid in set(thread_ids()) - before:
                        state, ticks, policy = task_stat(tid)
                        if state == "R" and ticks > 0:
                            running[tid] = (state, ticks, policy)
                assert running, "the SQL ended before its thread was seen running"
                assert {policy for _, _, policy in running.values()} == {os.SCHED_IDLE}
                # Meanwhile, and after: every other thread of the front end is normal.
                assert await plain_thread_policy() == os.SCHED_OTHER
                assert task_stat(threading.get_native_id())[2] == os.SCHED_OTHER
        assert outcome == ["sql_timeout"]
        for _ in range(4):  # trio's cached threads, whichever it picks
            assert await plain_thread_policy() == os.SCHED_OTHER
        assert b"[[1]]" in await storage.sql("alice", [("SELECT 1", ())], batch=False)
    finally:
        storage.close()
