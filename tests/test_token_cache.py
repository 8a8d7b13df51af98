"""The token lookup cache (runtime/tokens.py, `AsyncStore.user_for_token`): hits skip the
store; token and user writes empty it; both halves are bounded, so a flood of made-up tokens
cannot grow memory or push out the users' own entries."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import closing

import pytest

from runtime.store import AsyncStore, Store, User, hash_token
from runtime.tokens import TokenCache

Made = tuple[Store, AsyncStore, str]


@pytest.fixture
def made(store_location: str) -> Iterator[Made]:
    with closing(Store(store_location)) as store:
        token = store.create_user("alice")
        yield store, AsyncStore(store), token


def token_id(store: Store, user: str = "alice") -> int:
    return [t.id for t in store.tokens(user) if t.revoked_at is None][-1]


async def test_a_cached_token_does_not_see_a_revocation_behind_its_back_for_long(
    made: Made,
) -> None:
    store, cached, token = made
    assert await cached.user_for_token(token) == User(1, "alice")
    store.revoke_token(token_id(store))  # not through `cached`, and no feed here
    assert await cached.user_for_token(token) == User(1, "alice")  # a hit: no store trip
    cached.tokens.ttl_s = 0.0  # what time (at most TOKEN_TTL_S, 1 s) does to an entry
    assert await cached.user_for_token(token) is None


@pytest.mark.parametrize(
    "write",
    [
        lambda store: (Store.revoke_token, (token_id(store),)),
        lambda store: (Store.create_token, ("alice",)),
        lambda store: (Store.create_user, ("bob",)),
    ],
    ids=["revoke_token", "create_token", "create_user"],
)
async def test_token_and_user_writes_through_the_front_end_empty_it_at_once(
    made: Made, write: Callable[[Store], tuple[Callable[..., object], tuple[object, ...]]]
) -> None:
    store, cached, token = made
    cached.tokens.ttl_s = 3600.0  # only a write can make it forget
    assert await cached.user_for_token(token) == User(1, "alice")
    assert await cached.user_for_token("vr_unknown") is None
    assert len(cached.tokens) == 2
    method, args = write(store)
    await cached.call(method, *args)
    assert len(cached.tokens) == 0


async def test_a_revocation_through_the_front_end_is_refused_on_the_next_lookup(
    made: Made,
) -> None:
    store, cached, token = made
    cached.tokens.ttl_s = 3600.0
    first = token_id(store)
    kept = await cached.call(Store.create_token, "alice")
    assert await cached.user_for_token(token) == User(1, "alice")
    assert await cached.user_for_token(kept) == User(1, "alice")
    await cached.call(Store.revoke_token, first)
    assert await cached.user_for_token(token) is None
    assert await cached.user_for_token(kept) == User(1, "alice")


async def test_other_writes_leave_it_alone(made: Made) -> None:
    _, cached, token = made
    cached.tokens.ttl_s = 3600.0
    assert await cached.user_for_token(token) is not None
    await cached.call(Store.set_env, "alice", "K", "v")
    await cached.call(Store.put_val, "alice", "hello", "def hello(req):\n    return 1", None)
    assert len(cached.tokens) == 1


async def test_unknown_tokens_are_cached_until_created(made: Made) -> None:
    store, cached, _ = made
    cached.tokens.ttl_s = 3600.0
    assert await cached.user_for_token("vr_nobody") is None
    assert await cached.user_for_token("vr_nobody") is None
    assert len(cached.tokens) == 1
    new = store.create_token("alice")  # behind its back: unknown to the cache, so a miss
    assert await cached.user_for_token(new) == User(1, "alice")


async def test_a_flood_of_made_up_tokens_stays_bounded_and_keeps_real_entries(
    store_location: str,
) -> None:
    with closing(Store(store_location)) as store:
        token = store.create_user("alice")
        cached = AsyncStore(store)
        cached.tokens.ttl_s = 3600.0
        cached.tokens.max_unknown = 50
        assert await cached.user_for_token(token) is not None
        flood = ["vr_" + secrets.token_urlsafe(32) for _ in range(200)]
        for made_up in flood:
            assert await cached.user_for_token(made_up) is None
        assert len(cached.tokens) == 1 + 50
        # The newest made-up ones are kept, the oldest went; alice's entry stayed.
        assert cached.tokens.get(hash_token(flood[-1]), 0.0) == (True, None)
        assert cached.tokens.get(hash_token(flood[0]), 0.0) == (False, None)
        store.revoke_token(token_id(store))  # behind its back: only a hit still says alice
        assert await cached.user_for_token(token) == User(1, "alice")


# --- the cache alone ------------------------------------------------------------------------


def test_entries_expire_after_their_ttl() -> None:
    cache: TokenCache[str] = TokenCache(ttl_s=1.0, max_known=4, max_unknown=4)
    cache.put(b"a", "alice", 10.0, cache.generation)
    cache.put(b"x", None, 10.0, cache.generation)
    assert cache.get(b"a", 10.9) == (True, "alice")
    assert cache.get(b"x", 10.9) == (True, None)
    assert cache.get(b"a", 11.0) == (False, None)
    assert cache.get(b"x", 11.0) == (False, None)
    assert cache.get(b"never", 10.0) == (False, None)


def test_known_and_unknown_are_bounded_apart_oldest_first() -> None:
    cache: TokenCache[str] = TokenCache(ttl_s=60.0, max_known=2, max_unknown=3)
    for index in range(3):
        cache.put(b"user%d" % index, f"u{index}", float(index), cache.generation)
    for index in range(100):
        cache.put(b"junk%d" % index, None, 5.0, cache.generation)
    assert len(cache) == 2 + 3
    assert cache.get(b"user0", 6.0) == (False, None)  # the oldest known went for user2
    assert cache.get(b"user1", 6.0) == (True, "u1")
    assert cache.get(b"user2", 6.0) == (True, "u2")
    assert [cache.get(b"junk%d" % i, 6.0)[0] for i in (96, 97, 98, 99)] == [False, *[True] * 3]


def test_a_lookup_begun_before_a_clear_is_not_kept() -> None:
    cache: TokenCache[str] = TokenCache(ttl_s=60.0, max_known=4, max_unknown=4)
    begun = cache.generation
    cache.clear()  # a revocation lands while the lookup is in the store thread
    cache.put(b"a", "alice", 1.0, begun)
    assert cache.get(b"a", 1.0) == (False, None)
    cache.put(b"a", "alice", 1.0, cache.generation)
    assert cache.get(b"a", 1.0) == (True, "alice")


def test_a_token_that_changed_sides_is_kept_once() -> None:
    cache: TokenCache[str] = TokenCache(ttl_s=60.0, max_known=4, max_unknown=4)
    cache.put(b"a", None, 1.0, cache.generation)
    cache.put(b"a", "alice", 2.0, cache.generation)
    assert len(cache) == 1
    assert cache.get(b"a", 2.0) == (True, "alice")
    cache.put(b"a", None, 3.0, cache.generation)
    assert len(cache) == 1
    assert cache.get(b"a", 3.0) == (True, None)
