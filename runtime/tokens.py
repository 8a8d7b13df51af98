"""The front end's token lookup cache: who a token is, without a trip to the store thread.

Every authenticated request asks who its token belongs to. Asked of the store, that is a
query on the one store connection, in a thread: a tenant sending hundreds of requests a
second that are refused anyway (an Eval over its cap) would queue everyone's lookups behind
its own. So `AsyncStore.user_for_token` keeps what it learned, keyed by the token's hash
(never the token):

- known tokens, at most `max_known` entries, and unknown ones (revoked, mistyped, made up),
  at most `max_unknown`, each bounded on its own: a flood of random tokens fills only the
  unknown part, never pushes out the users' own, and never grows memory past the bound
  (the oldest entry goes first);
- each entry for `ttl_s` at most (1 s): a revocation made where this process cannot hear it
  (the change feed down) still takes effect within a second;
- emptied at once by this process's own token and user writes (`AsyncStore.call`) and by
  those of other processes and nodes when the change feed brings them (`apply_changes`).
  A lookup that started before such a write does not cache what it read (`generation`).
"""

from __future__ import annotations

from typing import Generic, TypeVar

U = TypeVar("U")
_E = TypeVar("_E")


class TokenCache(Generic[U]):
    """What a token hash resolved to (a user, or None for no valid token), and when."""

    def __init__(self, *, ttl_s: float, max_known: int, max_unknown: int) -> None:
        self.ttl_s = ttl_s
        self.max_known = max_known
        self.max_unknown = max_unknown
        #: Bumped by every `clear`: a lookup begun before it must not `put` after it.
        self.generation = 0
        # Insertion order is age order (a refreshed entry is re-inserted): the first is oldest.
        self._known: dict[bytes, tuple[float, U]] = {}
        self._unknown: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    def get(self, digest: bytes, now: float) -> tuple[bool, U | None]:
        """(True, what it resolved to) while fresh; (False, None) to ask the store."""
        known = self._known.get(digest)
        if known is not None and now - known[0] < self.ttl_s:
            return True, known[1]
        at = self._unknown.get(digest)
        if at is not None and now - at < self.ttl_s:
            return True, None
        return False, None

    def put(self, digest: bytes, user: U | None, now: float, generation: int) -> None:
        """Keep what a lookup begun at `generation` found, unless the cache was emptied since."""
        if generation != self.generation:
            return
        self._known.pop(digest, None)
        self._unknown.pop(digest, None)
        if user is None:
            _make_room(self._unknown, self.max_unknown)
            self._unknown[digest] = now
        else:
            _make_room(self._known, self.max_known)
            self._known[digest] = (now, user)

    def clear(self) -> None:
        self.generation += 1
        self._known.clear()
        self._unknown.clear()


def _make_room(entries: dict[bytes, _E], most: int) -> None:
    """Drop the oldest entries until one more fits (expiry is checked on `get`)."""
    while entries and len(entries) >= most:
        del entries[next(iter(entries))]
