"""Invocation records (docs/contract.md §10): queued in memory, written in batches.

A store write per request would put a disk transaction on every invocation's path. Instead
`Recorder.add` appends to a bounded in-memory queue (no I/O, no await) and `serve` writes the
queue in one transaction when `batch_size` records are waiting or `flush_interval_s` after the
first one arrived, trimming each val to its newest `store.max_runs_per_val` in the same
transaction. A reader calls `flush` first, so a client that invoked and then reads sees its
record; `open_recorder` flushes once more at shutdown.

What a record holds is decided by `runtime.run_api.Runner`: never a request body, never an env
value (`runtime.masking.mask_secrets` takes them out of logs and error messages).
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import trio

from runtime.errors import StorageFullError, StoreUnavailableError
from runtime.store import AsyncStore, Record, Store

logger = logging.getLogger(__name__)

MAX_RETRY_PAUSE_S = 5.0
TRIM_EVERY_S = 1.0
#: At shutdown, records the store refuses are tried this many more times, a second apart.
SHUTDOWN_RETRIES = 3


class Recorder:
    def __init__(
        self,
        store: AsyncStore,
        *,
        keep_per_val: int,
        max_bytes: int = 256 * 1024 * 1024,
        flush_interval_s: float = 0.1,
        batch_size: int = 256,
        max_pending: int = 10_000,
        max_pending_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.keep_per_val = keep_per_val
        self.max_bytes = max_bytes
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._pending: deque[Record] = deque()
        self._pending_bytes = 0
        self._dropped = 0
        self._lock = trio.Lock()  # one flush at a time: a reader waits for one in progress
        self._arrived = trio.Event()
        self._batch_ready = trio.Event()
        #: Events of live-log followers, by what they follow (`follow_key`); set and
        #: dropped when a record for that key is added.
        self._watchers: dict[tuple[str, object], trio.Event] = {}
        #: Set while the store refuses records (a full or read-only disk); for /healthz.
        self.failing_since = 0.0
        self.failures = 0
        self.written_at = 0.0  # when records were last written: the store took writes then
        self._trimmed_at = -TRIM_EVERY_S

    def watch(self, key: tuple[str, object]) -> trio.Event:
        """An event set when the next record for `key` is added (see `follow_key`)."""
        return self._watchers.setdefault(key, trio.Event())

    @property
    def watched(self) -> int:
        """How many keys have an event waiting for their next record."""
        return len(self._watchers)

    def unwatch(self, key: tuple[str, object]) -> None:
        """Forget `key`'s event (its last watcher is gone, with no record having come)."""
        self._watchers.pop(key, None)

    def wake_watchers(self) -> None:
        """Set every watcher's event (the service is stopping: waits end now)."""
        watchers, self._watchers = self._watchers, {}
        for event in watchers.values():
            event.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, record: Record) -> None:
        """Queue a record. Never blocks; when the store falls behind, the oldest go."""
        self._pending.append(record)
        self._pending_bytes += _size(record)
        while len(self._pending) > self.max_pending or self._pending_bytes > self.max_pending_bytes:
            self._pending_bytes -= _size(self._pending.popleft())
            self._dropped += 1
        self._arrived.set()
        watcher = self._watchers.pop(follow_key(record), None)
        if watcher is not None:
            watcher.set()
        if len(self._pending) >= self.batch_size:
            self._batch_ready.set()

    async def flush(self) -> None:
        """Write every queued record; when this returns, all records added before are stored,
        unless the store refused them (a full or read-only disk): then they wait for a retry."""
        async with self._lock:
            if self._dropped:
                logger.warning(
                    "dropped %d invocation records: the store did not keep up", self._dropped
                )
                self._dropped = 0
            if not self._pending:
                return
            batch = list(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            # The global ceiling costs a scan of an index: once a second is enough.
            now = trio.current_time()
            trim = now - self._trimmed_at >= TRIM_EVERY_S
            try:
                await self.store.call(
                    Store.add_records, batch, self.keep_per_val, self.max_bytes if trim else None
                )
                if trim:
                    self._trimmed_at = now
                self.written_at = trio.current_time()
            except (StorageFullError, StoreUnavailableError) as exc:
                # The disk, not the records: keep them (within the queue's bounds) and retry.
                self._requeue(batch)
                if not self.failing_since:
                    logger.error(
                        "cannot write invocation records (%s); keeping up to %d and retrying",
                        exc.message,
                        self.max_pending,
                    )
                    self.failing_since = trio.current_time()
                self.failures += 1
                return
            except (sqlite3.Error, psycopg.Error):
                # Records are worth less than serving: log and go on.
                logger.exception("could not write %d invocation records", len(batch))
            if self.failing_since:
                logger.warning(
                    "invocation records are written again, after %.1f s",
                    trio.current_time() - self.failing_since,
                )
                self.failing_since = 0.0
                self.failures = 0

    def _requeue(self, batch: list[Record]) -> None:
        """Put a batch that could not be written back in front, oldest dropped past the bounds."""
        newer = list(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        for record in batch + newer:
            self.add(record)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._arrived.wait()  # idle: no wake-ups at all
            with trio.move_on_after(self.flush_interval_s):
                await self._batch_ready.wait()
            self._arrived = trio.Event()
            self._batch_ready = trio.Event()
            await self.flush()
            if self.failures:  # held back: try again after a pause that grows, up to 5 s
                await trio.sleep(min(MAX_RETRY_PAUSE_S, self.flush_interval_s * 2**self.failures))
                self._arrived.set()


def follow_key(record: Record) -> tuple[str, object]:
    """What a live-log follower waits on: a val's records, or one user's Evals."""
    if record.val_id is not None:
        return ("val", record.val_id)
    return ("evals", record.owner)


def loggable_path(path: str) -> str:
    """A request's path for the access log and records: Eval's code is its request's
    payload, and payloads are not logged (it may hold a secret, and be 64 KiB long)."""
    return "/v1/eval/…" if path.startswith("/v1/eval/") else path


def _size(record: Record) -> int:
    return 200 + len(record.log) + len(record.error_message or "") + len(record.fetches)


@asynccontextmanager
async def open_recorder(
    store: AsyncStore, *, keep_per_val: int, max_bytes: int = 256 * 1024 * 1024
) -> AsyncIterator[Recorder]:
    recorder = Recorder(store, keep_per_val=keep_per_val, max_bytes=max_bytes)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.serve)
        try:
            yield recorder
        finally:
            # Requests have finished (the server stops first): what they recorded is kept.
            with trio.CancelScope(shield=True):
                await recorder.flush()
                for _retry in range(SHUTDOWN_RETRIES):
                    if not recorder.pending:
                        break
                    await trio.sleep(1)
                    await recorder.flush()
                if recorder.pending:
                    logger.error("%d invocation records could not be written", recorder.pending)
            nursery.cancel_scope.cancel()
