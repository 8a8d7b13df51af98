"""A request its client abandoned stops its work (docs/fairness.md §2).

Hypercorn does not cancel the app when a client goes: it puts an `http.disconnect` message
on the request's ASGI queue, for HTTP/1.1 when the connection closes and for HTTP/2 when the
stream is reset or the connection closes. So a task waits on the request's `receive()` next
to the work; a disconnect cancels the work, which reaches the pool as a cancellation: the
worker, in an unknown state, is killed (`Pool._release`), its slot is free at once, and the
record says `cancelled`. Nothing here depends on the protocol.

That task is started only for a request still running `WATCH_AFTER_S` after it began, by one
`Abandonment.serve` task for all of them. Most requests answer sooner, and a task of their
own (spawned, scheduled, cancelled) cost about 50 µs of the front end's 620 per request. A
client that leaves sooner than that costs its worker at most `WATCH_AFTER_S` more: its
disconnect waits in the queue and is read as soon as the watch begins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
from hypercorn.typing import ASGIReceiveCallable

from runtime.errors import ClientGoneError

T = TypeVar("T")

#: A request still running this long gets a task that reads its client's disconnect.
WATCH_AFTER_S = 0.05


class _Running:
    """One request's work, while it runs."""

    __slots__ = ("receive", "scope", "since", "watch")

    def __init__(self, receive: ASGIReceiveCallable, scope: trio.CancelScope) -> None:
        self.receive = receive
        self.scope = scope  # the work's: cancelled when the client goes
        self.since = trio.current_time()
        self.watch: trio.CancelScope | None = None  # the watching task's, once it is started


class Abandonment:
    """Stops the work of requests whose clients went away; `serve` must run meanwhile."""

    def __init__(self, watch_after_s: float = WATCH_AFTER_S) -> None:
        self.watch_after_s = watch_after_s
        #: Requests not watched yet, oldest first (a dict keeps insertion order).
        self._unwatched: dict[_Running, None] = {}
        self._arrived = trio.Event()

    async def unless_abandoned(
        self, receive: ASGIReceiveCallable, work: Callable[[], Awaitable[T]]
    ) -> T:
        """`work()`'s result, or ClientGoneError (499, which nobody reads) once the client has
        gone; call it after the request's body has been read."""
        with trio.CancelScope() as scope:
            running = _Running(receive, scope)
            self._unwatched[running] = None
            if len(self._unwatched) == 1:
                self._arrived.set()
            try:
                return await work()
            finally:
                self._unwatched.pop(running, None)
                if running.watch is not None:
                    running.watch.cancel()
        raise ClientGoneError("the client went away before the answer; its work was stopped")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start a watching task for each request running longer than `watch_after_s`."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                while not self._unwatched:  # idle: no wake-ups at all
                    self._arrived = trio.Event()
                    await self._arrived.wait()
                oldest = next(iter(self._unwatched))
                await trio.sleep_until(oldest.since + self.watch_after_s)
                due = trio.current_time() - self.watch_after_s
                for running in list(self._unwatched):
                    if running.since > due:
                        break
                    del self._unwatched[running]
                    running.watch = trio.CancelScope()
                    nursery.start_soon(_cancel_on_disconnect, running)


async def _cancel_on_disconnect(running: _Running) -> None:
    assert running.watch is not None
    with running.watch:
        while True:
            message = await running.receive()
            if message["type"] == "http.disconnect":
                running.scope.cancel()
                return
