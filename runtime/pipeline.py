"""Several requests in flight on one warm worker's socket: pipelining.

A worker runs its requests one at a time, in the order they arrive, and replies in that
order (sandbox/worker.py). So the front end may send a busy worker its next requests before
the current one is answered: the round trip between two requests (the reply travelling back,
the event loop waking twice, the next request travelling out) then overlaps the val's work.
A `Lane` is one warm worker's requests in flight, oldest first:

    sent, in this order:   [head] [2] [3] ...   at most `pool.pipeline_window`
                              |
                              the worker runs this one. Only its task reads the socket and
                              answers its asks, and only its wall time runs: a request's wall
                              time counts from when the worker starts it, which is when the
                              reply before it arrived. The others wait their turn, untimed.

Failures cost only what the worker had, and each request gets what it gets without
pipelining:
- The head times out, crashes, lies, says it retires, or its client leaves: the head gets
  that error (or its reply) and the worker is killed or goes, as always.
- The requests behind it never started: the worker runs one at a time, and none of their
  asks was answered (only the head's are). They are not failed: each is sent again, alone,
  to a worker of its own (`NotStartedError`), which is today's path for it.
- A request whose client leaves while it waits for its turn stays in the lane (its frame is
  in the worker already); when its turn comes, the worker is killed, as for a head whose
  client left, and the requests behind it are sent again.

Which requests are pipelined is the pool's decision (runtime/pool.py `_pipelined`): only into
a worker whose recent requests were fast and whose current one is not slow, so that a slow
request makes few others wait behind it (docs/design.md §7.1).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import trio

from runtime.reply import Reply

#: How much the newest request counts in a lane's running mean of service times.
SERVICE_WEIGHT = 0.2


class NotStartedError(Exception):
    """The worker went away before it started this request: it never ran, and is sent again."""


@dataclass(eq=False)
class Turn:
    """One request's place in a lane."""

    #: Set when this request's turn comes, or when it never will (`lost`).
    ready: trio.Event = field(default_factory=trio.Event)
    #: The worker went away before this request's turn: it did not run.
    lost: bool = False
    #: Its client left while it waited: when its turn comes, the worker must go.
    abandoned: bool = False


class Lane:
    """The requests in flight on one warm worker, oldest (running) first."""

    def __init__(self) -> None:
        self.turns: deque[Turn] = deque()
        #: Tasks that joined and have not finished: the last one out releases the worker.
        self.members = 0
        #: Set once the worker must take no more requests: (the reply, or None if the worker
        #: is to be killed; the failure's type).
        self.ending: tuple[Reply | None, str] | None = None
        #: Running mean of recent service times (s), None until one request was timed.
        self.service_s: float | None = None
        self.head_since = 0.0
        #: Requests answered since the worker was last idle.
        self.served = 0

    @property
    def closed(self) -> bool:
        return self.ending is not None

    def can_take(self, now: float, window: int, fast_s: float) -> bool:
        """Whether one more request may wait in this lane: room in the window, and a worker
        that has been fast lately and whose current request is not running long."""
        return (
            self.ending is None
            and 0 < len(self.turns) < window
            and self.service_s is not None
            and self.service_s <= fast_s
            and now - self.head_since <= fast_s
        )

    def join(self) -> Turn:
        turn = Turn()
        if not self.turns:
            self.head_since = trio.current_time()
            turn.ready.set()
        self.turns.append(turn)
        self.members += 1
        return turn

    def is_head(self, turn: Turn) -> bool:
        return bool(self.turns) and self.turns[0] is turn

    async def wait_turn(self, turn: Turn) -> None:
        """Until `turn` is the head; NotStartedError if the worker went away first."""
        try:
            await turn.ready.wait()
        except trio.Cancelled:
            if not turn.lost and not self.is_head(turn):
                turn.abandoned = True
            raise
        if turn.lost:
            raise NotStartedError

    def finish(self, turn: Turn, reply: Reply | None, failure: str) -> bool:
        """`turn`'s task is done. True when it was the last one out: the worker is free."""
        self.members -= 1
        if self.is_head(turn):
            self.turns.popleft()
            now = trio.current_time()
            if reply is None or reply.retire:
                self.close(reply, failure)
            else:
                self.served += 1
                took = now - self.head_since
                mean = self.service_s
                self.service_s = took if mean is None else mean + SERVICE_WEIGHT * (took - mean)
                if self.turns and self.turns[0].abandoned:
                    self.close(None, "cancelled")  # its client left: the worker must go
                elif self.turns:
                    self.head_since = now
                    self.turns[0].ready.set()
        # Another turn (lost, or abandoned and still in the lane) changes nothing more.
        return self.members == 0

    def close(self, reply: Reply | None, failure: str) -> None:
        """No more requests on this worker; those waiting behind the head are sent again."""
        if self.ending is None:
            self.ending = (reply, failure)
        for waiting in self.turns:
            waiting.lost = True
            waiting.ready.set()
        self.turns.clear()
