"""Threads of their own, at idle CPU priority, for tenants' CPU-heavy work in the front end.

A user's SQL on the SQLite backend (runtime/storage.py) runs in the front end's process: a
statement that computes for its whole `sql_timeout_s` takes a core, next to the event loop
that serves every tenant. Run at `SCHED_IDLE`, such a thread gets only the CPU that nothing
else of normal priority wants, so the event loop (and every other tenant's worker) always
wins a core from it; on an idle machine it still runs at full speed.

Why threads of their own rather than `trio.to_thread`'s: trio's threads are a cache shared by
all blocking work (store calls, token checks), and a thread cannot always undo its demotion
(leaving `SCHED_IDLE`, like lowering a nice value, needs `CAP_SYS_NICE` or a raised
`RLIMIT_NICE`). These threads are demoted once, when they start, and never run anything else.

What it does not cover: SQLite releases the GIL while it steps a statement, but the progress
handler and the result's encoding take it. A demoted thread holding the GIL when it is
preempted keeps the event loop waiting until it runs again; the parts that hold it are short,
and on a machine with a core free of normal-priority work that is at once.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

logger = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[], None]


def demote_this_thread() -> str:
    """Put the calling thread at idle priority: `SCHED_IDLE`, else nice 19; which one it got
    ("" if neither: not Linux)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        return "idle"
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return "nice"
    except (AttributeError, OSError) as exc:
        logger.warning("cannot lower a storage thread's CPU priority: %s", exc)
        return ""


class IdleThreads:
    """Up to `size` threads, made when first needed, each demoted at its start, that run
    `await run(fn, limiter=...)` calls one at a time each. The caller's limiter bounds the
    calls in flight; it must have at most `size` tokens, so a call never waits for a thread."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0

    async def run(self, fn: Callable[[], T], *, limiter: trio.CapacityLimiter) -> T:
        """`fn()` in one of these threads, as `trio.to_thread.run_sync` would (not
        cancellable: a cancelled caller waits for it, so bound `fn`'s time)."""
        if limiter.total_tokens > self.size:
            raise ValueError(f"a limiter of {limiter.total_tokens} for {self.size} threads")
        async with limiter:
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()
            result: list[T] = []
            error: list[BaseException] = []

            def job() -> None:
                try:
                    result.append(fn())
                except BaseException as exc:  # raised again in the caller's task, below
                    error.append(exc)
                finally:
                    token.run_sync_soon(done.set)

            self._in_flight += 1
            try:
                if len(self._threads) < self._in_flight:
                    self._start_thread()
                self._jobs.put(job)
                with trio.CancelScope(shield=True):
                    await done.wait()
            finally:
                self._in_flight -= 1
        if error:
            raise error[0]
        return result[0]

    def close(self) -> None:
        """Let the threads end once the calls given to them are done."""
        for _ in self._threads:
            self._jobs.put(None)
        self._threads.clear()

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _serve(self) -> None:
        demote_this_thread()
        while (job := self._jobs.get()) is not None:
            job()
