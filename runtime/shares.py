"""Fair shares of the pool between users (docs/fairness.md): who may take a worker slot, who
waits, and whose idle worker makes room. Bookkeeping only; the pool does the I/O.

- **A cap per user.** One user's vals hold at most `max_workers_per_user` warm workers (busy,
  idle or loading); past it, a new worker of theirs replaces their own least recently used
  idle one, or waits for one of theirs to finish.
- **A bounded wait per user.** At most `max_queued_per_user` of one user's requests wait for
  a worker, all their vals together; more are refused at once with 429, naming the limit.
- **Fair queueing.** When the pool is full, a free slot goes to the waiting user who holds
  the fewest workers, and between equals to the one who has waited longest: with every user
  waiting, slots go round the users in turn, however many requests each one sends.
- **A rate of cold starts per user.** A new worker is CPU (a fork, confinement, the val's
  module run): one user's vals start at most `cold_starts_per_user_per_s` a second (a token
  bucket, as deep as one second's worth); more wait their turn, or get 429 when their turn
  is further off than `load_timeout_s`.
- **Eviction from the user most over their share.** Making room stops an idle worker of the
  user holding the most workers (their least recently used one), and only if that user
  holds more than the one asking: a tenant cycling through many vals evicts their own workers,
  never those of a user who holds fewer.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from runtime.errors import TooManyRequestsError


class Shares:
    def __init__(
        self,
        *,
        max_workers: int,
        max_per_user: int,
        max_queued_per_user: int,
        cold_starts_per_s: float = 20.0,
    ) -> None:
        self.max_per_user = min(max_per_user, max_workers)
        self.max_queued_per_user = max_queued_per_user
        self.cold_starts_per_s = cold_starts_per_s
        #: Per user: (tokens, when counted). Tokens go negative: turns handed out ahead.
        self._buckets: dict[str, tuple[float, float]] = {}
        #: Warm workers held (busy, idle, or being made) and requests waiting, by user.
        self.held: Counter[str] = Counter()
        self.queued: Counter[str] = Counter()
        #: Requests waiting for room in a full pool: user -> their tickets, oldest first.
        self._line: dict[str, list[int]] = {}
        self._tickets = itertools.count()

    # --- waiting requests ---------------------------------------------------------------

    def enqueue(self, owner: str) -> None:
        """One more request of `owner` waits for a worker, or 429 if too many do already."""
        if self.queued[owner] >= self.max_queued_per_user:
            raise TooManyRequestsError(
                f"{owner or 'anonymous'} has {self.queued[owner]} requests waiting for a worker, "
                f"the most one user may have (pool.max_queued_per_user); retry shortly",
                headers=(("retry-after", "1"),),
                details={"limit": "pool.max_queued_per_user"},
            )
        self.queued[owner] += 1

    def dequeue(self, owner: str) -> None:
        self.queued[owner] -= 1
        if not self.queued[owner]:
            del self.queued[owner]

    # --- cold starts ---------------------------------------------------------------------

    def cold_start_wait(self, owner: str, now: float, max_wait_s: float) -> float:
        """Seconds until `owner`'s next cold start may begin (0: now), its turn taken; or
        429 if that is more than `max_wait_s` away (no turn taken)."""
        rate = self.cold_starts_per_s
        tokens, counted = self._buckets.get(owner, (rate, now))
        tokens = min(rate, tokens + (now - counted) * rate)
        wait = max(0.0, (1 - tokens) / rate)
        if wait > max_wait_s:
            raise TooManyRequestsError(
                f"{owner or 'anonymous'}'s vals started {rate:g} new workers a second, the "
                "most one user may (pool.cold_starts_per_user_per_s); retry shortly",
                headers=(("retry-after", "1"),),
                details={"limit": "pool.cold_starts_per_user_per_s"},
            )
        self._buckets[owner] = (tokens - 1, now)
        if len(self._buckets) > 4096:  # full buckets say nothing: forget them
            full = [u for u, (t, c) in self._buckets.items() if t + (now - c) * rate >= rate]
            for user in full:
                del self._buckets[user]
        return wait

    def cold_start_refund(self, owner: str) -> None:
        """A turn taken but not used (the request went before its turn came)."""
        if owner in self._buckets:
            tokens, counted = self._buckets[owner]
            self._buckets[owner] = (tokens + 1, counted)

    # --- workers held ---------------------------------------------------------------------

    def at_cap(self, owner: str) -> bool:
        return self.held[owner] >= self.max_per_user

    def take(self, owner: str) -> None:
        self.held[owner] += 1

    def give_back(self, owner: str) -> None:
        self.held[owner] -= 1
        if self.held[owner] <= 0:
            del self.held[owner]

    def over_cap(self, owner: str) -> TooManyRequestsError:
        return TooManyRequestsError(
            f"{owner or 'anonymous'}'s vals hold {self.held[owner]} workers, the most one "
            "user may hold (pool.max_workers_per_user), and none came free; retry shortly",
            headers=(("retry-after", "1"),),
            details={"limit": "pool.max_workers_per_user"},
        )

    # --- the line for a full pool ---------------------------------------------------------

    @contextmanager
    def in_line(self, owner: str) -> Iterator[int]:
        """A ticket in the line for room in the pool, given up when the block ends."""
        ticket = next(self._tickets)
        self._line.setdefault(owner, []).append(ticket)
        try:
            yield ticket
        finally:
            tickets = self._line[owner]
            tickets.remove(ticket)
            if not tickets:
                del self._line[owner]

    @property
    def waiting(self) -> bool:
        return bool(self._line)

    def first_in_line(self, owner: str, ticket: int) -> bool:
        """Whether `ticket` is the next to get a free slot: its user holds the fewest
        workers of those in line below their cap (then: waited longest), and it is that
        user's oldest ticket."""
        eligible = [(self.held[u], t[0], u) for u, t in self._line.items() if not self.at_cap(u)]
        if not eligible:
            return False
        _held, first, user = min(eligible)
        return user == owner and first == ticket

    def may_swap(self, owner: str) -> bool:
        """Whether `owner` (at their cap, or not first in line) may replace an idle worker of
        their own: only if they hold no more than any user in line below their cap. So a
        flood's worker that comes free goes to a waiting user who holds fewer, not back to
        the flood; and an equal with an idle worker of their own is not held up."""
        eligible = [self.held[u] for u in self._line if not self.at_cap(u)]
        return not eligible or self.held[owner] <= min(eligible)

    def evict_from(self, owner: str, oldest_idle: Mapping[str, float]) -> str | None:
        """Whose idle worker makes room for `owner` in a full pool: the user holding the most
        workers (between equals, the one whose idle worker was used longest ago), if that
        is `owner` or a user holding more than `owner`; else `owner` itself if they have an
        idle worker; else nobody (wait). `oldest_idle`: user -> when their least recently
        used idle worker was last used."""
        if not oldest_idle:
            return None
        most = max(oldest_idle, key=lambda u: (self.held[u], -oldest_idle[u]))
        if most == owner or self.held[most] > self.held[owner]:
            return most
        return owner if owner in oldest_idle else None
