"""AsyncStore.resolve's cache: hits skip the store; writes that change resolution empty it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing

import pytest

from runtime.store import AsyncStore, Store

Made = tuple[Store, AsyncStore]


@pytest.fixture
def made(store_location: str) -> Iterator[Made]:
    with closing(Store(store_location)) as store:
        store.create_user("alice")
        store.put_val("alice", "hello", "def hello(req):\n    return 1", "public")
        yield store, AsyncStore(store)


async def version(cached: AsyncStore, name: str = "hello") -> int | None:
    resolved = await cached.resolve("alice", name, None)
    return None if resolved is None else resolved[0].version


async def test_a_cached_resolve_does_not_see_writes_made_behind_its_back(
    made: tuple[Store, AsyncStore],
) -> None:
    store, cached = made
    assert await version(cached) == 1
    store.put_val("alice", "hello", "def hello(req):\n    return 2", None)  # not through `cached`
    assert await version(cached, "HELLO") == 1  # a hit, whatever the case of the name
    cached.RESOLVE_TTL_S = 0.0  # what time does to an entry written elsewhere
    assert await version(cached) == 2


async def test_writes_through_the_front_end_are_seen_at_once(
    made: tuple[Store, AsyncStore],
) -> None:
    _, cached = made
    assert await version(cached) == 1
    await cached.call(Store.put_val, "alice", "hello", "def hello(req):\n    return 2", None)
    assert await version(cached) == 2
    await cached.call(Store.set_env, "alice", "K", "v")
    resolved = await cached.resolve("alice", "hello", None)
    assert resolved is not None
    assert resolved[1] == {"K": "v"}
    await cached.call(Store.delete_val, "alice", "hello")
    assert await version(cached) is None


async def test_unknown_vals_are_cached_too_until_created(made: Made) -> None:
    store, cached = made
    assert await version(cached, "later") is None
    store.put_val("alice", "later", "def later(req):\n    return 1", None)
    assert await version(cached, "later") is None  # a 404 flood costs no store trips
    await cached.call(Store.put_val, "alice", "later", "def later(req):\n    return 2", None)
    assert await version(cached, "later") == 2
