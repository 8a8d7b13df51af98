"""The scheduler: claims due ticks in the store and runs them (docs/schedules.md).

    serve loop ──claim_due (one store transaction)──> ticks skipped, ticks to run with
        │     frees the leases of runs that ended        the val's latest version and env
        │                                              │
        │  each tick to run: its own task ─────────────┘
        │     Invoker.invoke(ScheduledRun, source "cron")   the val's warm worker path
        │     (its lease renewed while it runs long; freed by the next claim when it ends)
        └─ sleeps until the next due tick, POLL_S at most (ticks set elsewhere: other nodes,
           the API) or until a run ends (a slot is free)

One store round trip per batch of ticks, not per run: under load each trip to the store's
thread costs milliseconds of scheduling, and 500 ticks may fall on the same second.

Nothing about a tick is decided in memory: the claim is the store's, so several front ends
on one store run each tick once, and a run in progress on any of them makes the next tick a
skip. At most `schedule.max_concurrent` runs at once on this node, and at most as many again
claimed ahead, waiting for a slot; the others stay due for a node (or a moment) that has one.
"""

from __future__ import annotations

import logging
import time

import trio

from runtime.config import Config
from runtime.errors import HTTPError
from runtime.invoke import Invoker, val_spec
from runtime.metrics import Metrics
from runtime.reply import ValResult
from runtime.schedule import Tick
from runtime.store import AsyncStore, Record, Store, ValVersion
from sandbox.messages import ScheduledRun

logger = logging.getLogger(__name__)

#: The longest the scheduler goes without asking the store what is due.
POLL_S = 0.5
#: A run's hold on its schedule: renewed while the run goes on, so a node that dies mid-run
#: blocks that schedule's ticks (as skips) for at most this long.
LEASE_S = 60.0
#: A skipped tick's record: the status of a conflict, for there is no client.
SKIPPED_STATUS = 409


class Scheduler:
    def __init__(
        self, config: Config, store: AsyncStore, invoker: Invoker, metrics: Metrics
    ) -> None:
        self.config = config
        self.store = store
        self.invoker = invoker
        self.metrics = metrics
        #: Ticks claimed and not yet ended: running, or waiting for one of the slots.
        self.running = 0
        self._slots = trio.Semaphore(config.schedule.max_concurrent)
        #: (val_id, claim) of runs that ended, whose leases the next claim frees.
        self._finished: list[tuple[int, int]] = []
        self._stopping = False
        self._wake = trio.Event()

    def stop(self) -> None:
        """Claim no more ticks; `serve` returns once the runs in progress have ended."""
        self._stopping = True
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as runs:
                task_status.started()
                while not self._stopping:
                    try:
                        delay = await self._claim(runs)
                    except Exception:  # the store failing (locked, disk) must not stop valrun
                        logger.exception("claiming due schedules failed; retrying")
                        delay = POLL_S
                    with trio.move_on_after(delay):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            with trio.CancelScope(shield=True):
                await self._free_finished()

    async def _free_finished(self) -> None:
        finished, self._finished = self._finished, []
        if not finished:
            return
        try:
            await self.store.call(Store.finish_runs, finished)
        except Exception:  # the leases then expire by themselves
            logger.exception("could not free %d schedule leases", len(finished))

    async def _claim(self, runs: trio.Nursery) -> float:
        """Claim and start what is due; how long to wait before looking again.

        Up to twice max_concurrent ticks are claimed ahead (they wait their turn for a slot,
        holding their leases), and the loop is woken again only when the ones waiting have
        gone: one claim per batch of runs, not one per run, for each claim is a trip to the
        store's thread that costs milliseconds when the machine is busy."""
        schedule = self.config.schedule
        free = max(2 * schedule.max_concurrent - self.running, 0)
        now = time.time()
        finished, self._finished = self._finished, []
        try:
            ticks, next_due, vals = await self.store.call(
                Store.claim_due, now, free, LEASE_S, schedule.max_concurrent_per_user, finished
            )
        except BaseException:
            self._finished += finished  # freed by the next claim
            raise
        for tick in ticks:
            if tick.skipped:
                self._record_skip(tick, now)
            else:
                self.running += 1
                runs.start_soon(self._run, tick, *vals[tick.val_id])
        if next_due is None:
            return POLL_S
        wait = next_due - time.time()
        if wait <= 0:
            # Still due: the batch was full (look again now) or every due tick waits for a
            # free slot (the runs' end wakes the loop).
            return 0.0 if ticks else POLL_S
        return min(wait, POLL_S)

    def _record_skip(self, tick: Tick, now: float) -> None:
        self.metrics.observe_scheduled("skipped")
        self.invoker.recorder.add(
            Record(
                val_id=tick.val_id,
                owner=tick.owner,
                source="cron",
                version=None,
                started_at=now,
                duration_ms=0.0,
                status=SKIPPED_STATUS,
                log="",
                error_type="skipped",
                error_message=(
                    f"the tick scheduled at {tick.scheduled_at:.3f} was skipped: "
                    "the previous run was still going"
                ),
            )
        )

    async def _run(self, tick: Tick, val: ValVersion, env: dict[str, str]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew, tick)
                async with self._slots:
                    await self._invoke(tick, val, env)
                nursery.cancel_scope.cancel()
        except Exception:  # a bug or the store failing: logged, the service goes on
            logger.exception("the scheduled run of val %d failed in valrun", tick.val_id)
        finally:
            self._finished.append((tick.val_id, tick.claim))
            self.running -= 1
            if self.running <= self.config.schedule.max_concurrent:  # none left waiting
                self._wake.set()

    async def _renew(self, tick: Tick) -> None:
        while True:
            await trio.sleep(LEASE_S / 3)
            await self.store.call(Store.renew_lease, tick.val_id, tick.claim, time.time() + LEASE_S)

    async def _invoke(self, tick: Tick, val: ValVersion, env: dict[str, str]) -> None:
        started_at = time.time()
        spec = val_spec(val, env, self.config.server.web_domain)
        run = ScheduledRun(0, tick.scheduled_at, tick.last_run_at, tick.schedule.describe())
        lateness = max(started_at - tick.scheduled_at, 0.0)
        try:
            await self.invoker.invoke(spec, run, source="cron", expect=ValResult)
        except HTTPError:  # the val failed, timed out, or its queue was full: recorded
            self.metrics.observe_scheduled("error", lateness)
        else:
            self.metrics.observe_scheduled("ok", lateness)


async def serve_scheduler(
    config: Config,
    store: AsyncStore,
    invoker: Invoker,
    metrics: Metrics,
    *,
    task_status: trio.TaskStatus[Scheduler] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run schedules until cancelled or stopped; report the Scheduler (for `stop`)."""
    scheduler = Scheduler(config, store, invoker, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.serve)
        task_status.started(scheduler)
