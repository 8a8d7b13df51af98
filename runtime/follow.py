"""Live logs: `GET .../runs?after=ID&wait=S` answers as soon as there are records newer
than ID, or after S seconds with none (long polling).

Long polling, not server-sent events: every answer is an ordinary JSON response, so it
passes any proxy (nginx buffers event streams unless told not to), needs no streaming path
in the app, and a client that reconnects says exactly where it left off (`after`).

Each user may hold `MAX_FOLLOWERS_PER_USER` waits at once, and the service `MAX_FOLLOWERS`;
beyond that, 429 with Retry-After. A wait costs no work while nothing happens: it sleeps on
an event that the recorder sets when a record for what it follows is queued.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs

import trio

from runtime.errors import BadRequestError, TooManyRequestsError
from runtime.records import Recorder
from runtime.store import Record

MAX_WAIT_S = 30
MAX_FOLLOWERS_PER_USER = 4
MAX_FOLLOWERS = 256


@dataclass(frozen=True, slots=True)
class Follow:
    after: int | None  # a record id: only newer records, oldest first
    wait_s: int  # how long to wait for one when there is none yet


def parse_follow(query_string: str) -> Follow:
    """`?after=ID&wait=S`. Pure."""
    query = parse_qs(query_string)
    after = _int(query, "after", 0, 2**63 - 1)
    wait_s = _int(query, "wait", 0, MAX_WAIT_S)
    if wait_s and after is None:
        raise BadRequestError("wait needs after=ID: the id of the last record you have (0: none)")
    return Follow(after, wait_s or 0)


def _int(query: dict[str, list[str]], key: str, low: int, high: int) -> int | None:
    values = query.get(key)
    if not values:
        return None
    text = values[0]
    if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
        raise BadRequestError(f"{key} must be a number from {low} to {high}, not {text!r}")
    return int(text)


class Followers:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self._waiting: Counter[str] = Counter()  # by user
        self._watching: Counter[tuple[str, object]] = Counter()  # by what is followed
        self._stopping = False

    def stop(self) -> None:
        """The service is stopping: waits answer now, so they do not hold up its shutdown."""
        self._stopping = True
        self.recorder.wake_watchers()

    @property
    def waiting(self) -> int:
        """Reads waiting now, all users together (shown on /healthz)."""
        return self._waiting.total()

    async def fetch(
        self,
        user: str,
        key: tuple[str, object],
        follow: Follow,
        read: Callable[[], Awaitable[list[Record]]],
    ) -> list[Record]:
        """`read()` now, or, when it finds nothing and `follow` says to wait, again once a
        record for `key` arrives (or the wait ends)."""
        if not follow.wait_s:
            await self.recorder.flush()  # what was invoked before this request is included
            return await read()
        if self._waiting[user] >= MAX_FOLLOWERS_PER_USER or self._waiting.total() >= MAX_FOLLOWERS:
            raise TooManyRequestsError(
                f"{user} already follows {self._waiting[user]} logs at once (at most "
                f"{MAX_FOLLOWERS_PER_USER}); close one, or retry shortly",
                headers=(("retry-after", "1"),),
            )
        self._waiting[user] += 1
        self._watching[key] += 1
        try:
            with trio.move_on_after(follow.wait_s):
                while True:
                    # Watch before reading: a record queued after the read sets this event.
                    arrived = self.recorder.watch(key)
                    await self.recorder.flush()
                    records = await read()
                    if records or self._stopping:
                        return records
                    await arrived.wait()
            return []
        finally:
            self._waiting[user] -= 1
            if not self._waiting[user]:
                del self._waiting[user]
            self._watching[key] -= 1
            if not self._watching[key]:  # nobody waits on it: no event kept for it
                del self._watching[key]
                self.recorder.unwatch(key)
