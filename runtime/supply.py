"""The worker supply: new generic workers, and what happens when none can be made.

Making a worker can fail for reasons outside any request: the fork server died twice in a
row, the machine's process limit was reached (fork fails with EAGAIN), descriptors ran out,
or the fork server stopped answering (SIGSTOPped, wedged). None of that may stop the
service. While it lasts:

- every request that needs a new worker gets 503 `overloaded` with `Retry-After` (never a
  500), and requests served by warm workers go on as before;
- the cause is logged once when the trouble starts, and once when it ends (not per request);
- attempts back off (50 ms, doubling, at most 1 s apart): requests in between fail at once
  instead of queueing on a supply known to be broken, and the prewarm task retries at each
  step, so the supply recovers by itself within a second of the cause going away.

Each attempt is bounded by a timeout: a fork server that does not answer is not waited for.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from runtime.errors import OverloadedError
from runtime.process import ForkServerError, WorkerProcess

logger = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


class WorkerSupply:
    def __init__(
        self,
        make: Callable[[], Awaitable[WorkerProcess]],
        *,
        timeout_s: float,
        on_failure: Callable[[], None] = lambda: None,
        what: str = "workers",
    ) -> None:
        self._make = make
        #: What it makes, as its log lines say ("workers", "workers for 'alice'").
        self.what = what
        self.timeout_s = timeout_s
        #: Called at each failure: whoever retries in the background must know.
        self._on_failure = on_failure
        self.failures = 0  # consecutive failed attempts; 0 while healthy
        self.reason = ""
        self._failing_since = 0.0
        self._retry_at = 0.0

    @property
    def failing(self) -> bool:
        return self.failures > 0

    async def get(self) -> WorkerProcess:
        """A new generic worker, or OverloadedError (503) saying why there is none."""
        if self.failing and trio.current_time() < self._retry_at:
            raise self._unavailable()
        try:
            with trio.fail_after(self.timeout_s):
                worker = await self._make()
        except trio.TooSlowError:
            self._failed(f"no worker within {self.timeout_s} s")
            raise self._unavailable() from None
        except (ForkServerError, OSError) as exc:
            self._failed(str(exc))
            raise self._unavailable() from None
        if self.failing:
            logger.warning(
                "%s can be started again, after %.1f s and %d failed attempts",
                self.what,
                trio.current_time() - self._failing_since,
                self.failures,
            )
            self.failures = 0
        return worker

    async def wait_to_retry(self) -> None:
        await trio.sleep_until(self._retry_at)

    def _failed(self, reason: str) -> None:
        now = trio.current_time()
        if not self.failing:
            self._failing_since = now
            logger.error(
                "cannot start %s: %s; answering 503 to requests that need one and "
                "retrying with back-off",
                self.what,
                reason,
            )
        self.failures += 1
        self.reason = reason
        self._on_failure()
        self._retry_at = now + min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** (self.failures - 1))

    def _unavailable(self) -> OverloadedError:
        return OverloadedError(
            f"valrun cannot start a worker right now ({self.reason}); retry shortly",
            headers=(("retry-after", "1"),),
        )
