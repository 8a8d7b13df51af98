"""What /healthz reports beyond "up": the conditions in which valrun still answers but a load
balancer should prefer another node. Any of them makes /healthz answer 503 with status
"degraded" and the reasons, so a plain HTTP health check acts on it.

- the fork server is dead and not yet replaced, or new workers cannot be made at all
  (runtime.supply): requests that need a new worker get 503;
- the store cannot be written (a full or read-only disk): saves and env changes get 507 or
  503, and invocation records wait in memory.

The store is probed with one small write at most once per `STORE_PROBE_EVERY_S`, so a health
check polled by anyone costs at most that.
"""

from __future__ import annotations

import trio

from runtime.errors import HTTPError
from runtime.pool import Pool
from runtime.records import Recorder
from runtime.store import AsyncStore, Store

STORE_PROBE_EVERY_S = 1.0
#: A small probe can succeed on a full disk (SQLite reuses its write-ahead log's space), so a
#: real write that failed counts too: until a write (of the API or of invocation records)
#: succeeds, or for this long.
RECENT_WRITE_FAILURE_S = 30.0


class Health:
    def __init__(self, pool: Pool, recorder: Recorder, store: AsyncStore) -> None:
        self.pool = pool
        self.recorder = recorder
        self.store = store
        self._probed_at = -STORE_PROBE_EVERY_S
        self._store_problem: str | None = None
        self._lock = trio.Lock()
        #: Set when the node is stopping (runtime.server.drain): /healthz answers 503.
        self.draining = False

    async def problems(self) -> list[str]:
        """Why valrun is degraded right now; empty when it is not."""
        found = []
        fork_server = self.pool.fork_server
        if fork_server is not None and fork_server.restarting:
            found.append("the fork server is restarting")
        if self.pool.supply.failing:
            found.append(f"new workers cannot be started: {self.pool.supply.reason}")
        if store_problem := await self._store_unwritable():
            found.append(f"the store cannot be written: {store_problem}")
        elif failure := self.store.write_failure:
            failed_at, reason = failure
            recent = trio.current_time() - failed_at < RECENT_WRITE_FAILURE_S
            if recent and self.recorder.written_at < failed_at:
                found.append(f"the store cannot be written: {reason}")
        if self.recorder.failing_since:
            found.append(f"{self.recorder.pending} invocation records wait to be written")
        return found

    async def _store_unwritable(self) -> str | None:
        async with self._lock:  # one probe at a time, however many checks arrive
            now = trio.current_time()
            if now - self._probed_at >= STORE_PROBE_EVERY_S:
                self._probed_at = now
                try:
                    await self.store.call(Store.check_writable)
                    self._store_problem = None
                except HTTPError as exc:  # 507/503: a full or read-only disk
                    self._store_problem = exc.message
            return self._store_problem
