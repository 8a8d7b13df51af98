"""The change feed (runtime/feed.py): a change made through one store is seen by the front end
of another (another process or node) within a second, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import cast

import pytest
import trio

from runtime.feed import Change, follow_changes, open_reader, read_after
from runtime.pool import Pool
from runtime.server import retire_on_change
from runtime.store import PRUNE_CHANGES_EVERY, AsyncStore, Store
from tests.helpers import service_on

CODE = "def hello(req):\n    return {}"
Seen = list[tuple[str, str | None, int | None]]


@pytest.fixture
def location(store_location: str) -> str:
    """Where the shared store lives: an SQLite file, then a PostgreSQL database."""
    return store_location


@pytest.fixture
def writer(location: str) -> Iterator[Store]:
    """Another process's store on the same database."""
    store = Store(location)
    store.create_user("alice")
    store.put_val("alice", "hello", CODE.replace("{}", "1"), "public")
    with closing(store):
        yield store


@pytest.fixture
async def follower(
    writer: Store, location: str, nursery: trio.Nursery
) -> AsyncIterator[tuple[AsyncStore, Seen]]:
    """This process's front end: its store, following the feed; what its listener heard."""
    with closing(Store(location)) as store:
        front = AsyncStore(store)
        front.RESOLVE_TTL_S = 3600.0  # only the feed can make the cache forget
        seen: Seen = []
        front.on_change(lambda kind, user, val_id: seen.append((kind, user, val_id)))
        await nursery.start(follow_changes, front)
        yield front, seen
        nursery.cancel_scope.cancel()


async def version_seen(front: AsyncStore) -> int | None:
    resolved = await front.resolve("alice", "hello", None)
    return None if resolved is None else resolved[0].version


async def wait_for(front: AsyncStore, want: int | None) -> float:
    """How long until `front` resolves alice/hello to version `want`."""
    start = trio.current_time()
    with trio.fail_after(10):  # the claim is 1 s; the margin is for a loaded machine
        while await version_seen(front) != want:
            await trio.sleep(0.01)
    return trio.current_time() - start


async def test_a_save_elsewhere_reaches_the_cache_through_the_feed(
    writer: Store, follower: tuple[AsyncStore, Seen]
) -> None:
    front, seen = follower
    assert await version_seen(front) == 1  # cached now, for an hour
    val, _ = writer.put_val("alice", "hello", CODE.replace("{}", "2"), None)
    await wait_for(front, 2)
    assert ("val", "alice", val.val_id) in seen
    writer.delete_val("alice", "hello")
    await wait_for(front, None)


async def test_every_kind_of_change_is_heard_with_whom_and_which_val(
    writer: Store, follower: tuple[AsyncStore, Seen]
) -> None:
    _, seen = follower
    val, _ = writer.put_val("alice", "hello", CODE.replace("{}", "2"), None)
    writer.set_privacy("alice", "hello", "private")
    writer.delete_version("alice", "hello", 1)
    writer.set_env("alice", "K", "v")
    assert writer.delete_env("alice", "K")
    assert not writer.delete_env("alice", "K")  # nothing changed: nothing to hear
    writer.create_user("bob")
    (token,) = writer.tokens("bob")
    writer.revoke_token(token.id)
    writer.delete_val("alice", "hello")
    expected = [
        *(("val", "alice", val.val_id),) * 3,
        ("env", "alice", None),
        ("env", "alice", None),
        ("user", "bob", None),
        ("token", "bob", None),
        ("val", "alice", val.val_id),
    ]
    with trio.fail_after(10):
        while len(seen) < len(expected):
            await trio.sleep(0.01)
    assert seen == expected


async def test_an_env_change_elsewhere_reaches_the_cached_env(
    writer: Store, follower: tuple[AsyncStore, Seen]
) -> None:
    front, _ = follower
    assert (await front.resolve("alice", "hello", None) or (None, {}))[1] == {}
    writer.set_env("alice", "K", "v")
    with trio.fail_after(10):
        while (await front.resolve("alice", "hello", None) or (None, {}))[1] != {"K": "v"}:
            await trio.sleep(0.01)


async def test_a_token_revoked_elsewhere_is_refused_through_the_feed(
    writer: Store, follower: tuple[AsyncStore, Seen]
) -> None:
    front, _ = follower
    front.tokens.ttl_s = 3600.0  # only the feed can make the token cache forget
    token, kept = writer.create_token("alice"), writer.create_token("alice")
    assert (await front.user_for_token(token) or writer.user("nobody")).name == "alice"
    assert await front.user_for_token("vr_made_up") is None
    revoked = [t.id for t in writer.tokens("alice")][-2]
    writer.revoke_token(revoked)
    with trio.fail_after(10):  # the claim is 1 s; the margin is for a loaded machine
        while await front.user_for_token(token) is not None:
            await trio.sleep(0.01)
    assert (await front.user_for_token(kept) or writer.user("nobody")).name == "alice"


async def test_a_process_does_not_hear_its_own_changes(
    writer: Store, follower: tuple[AsyncStore, Seen]
) -> None:
    front, seen = follower
    await front.call(Store.set_env, "alice", "MINE", "1")
    writer.set_env("alice", "THEIRS", "1")  # heard, so the feed has been read past MINE
    with trio.fail_after(10):
        while not seen:
            await trio.sleep(0.01)
    assert seen == [("env", "alice", None)]


def test_a_follower_that_lost_pruned_rows_drops_everything(writer: Store, location: str) -> None:
    with closing(open_reader(location)) as reader:
        last = reader.last_seq()
        for n in range(3):
            writer.set_env("alice", "K", str(n))
        assert [c.kind for c in read_after(reader, last, "me")[0]] == ["env"] * 3
        with closing(Store(location)) as other:
            other._db.execute("DELETE FROM changes WHERE seq <= ?", (last + 2,))
        changes, newest = read_after(reader, last, "me")
        assert changes == [Change(last + 3, "all", None, None)]
        assert newest == last + 3


def test_old_rows_are_pruned_and_the_newest_kept(writer: Store, location: str) -> None:
    writer._db.execute("UPDATE changes SET at = 0")  # long ago
    with closing(open_reader(location)) as reader:
        for n in range(PRUNE_CHANGES_EVERY):
            writer.set_env("alice", "K", str(n))
        ((count,),) = reader.read("SELECT COUNT(*) FROM changes", ())
        newest = reader.last_seq()
    assert newest % PRUNE_CHANGES_EVERY < count <= PRUNE_CHANGES_EVERY
    writer._db.execute("UPDATE changes SET at = 0")
    with closing(open_reader(location)) as reader:
        writes = 0
        while writes == 0 or reader.last_seq() % PRUNE_CHANGES_EVERY:
            writer.set_env("alice", "K", f"again {writes}")
            writes += 1
        # Everything old went; what was written since stays.
        assert reader.read("SELECT COUNT(*) FROM changes", ()) == [(writes,)]


class RecordingPool:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def val_changed(self, val_id: int) -> None:
        self.calls.append(("val_changed", val_id))

    def retire_user(self, user: str) -> None:
        self.calls.append(("retire_user", user))

    def retire_all(self) -> None:
        self.calls.append(("retire_all", None))


def test_the_pool_retires_what_a_change_made_stale() -> None:
    pool = RecordingPool()
    listener = retire_on_change(cast(Pool, pool))
    for change in [
        ("val", "alice", 7),
        ("env", "alice", None),
        ("token", "alice", None),
        ("user", "bob", None),
        ("all", None, None),
    ]:
        listener(*change)
    assert pool.calls == [("val_changed", 7), ("retire_user", "alice"), ("retire_all", None)]


async def test_two_nodes_on_one_store_answer_each_others_saves_and_env(
    store_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the feed can make a node forget what it resolved: not the cache's own expiry.
    monkeypatch.setattr(AsyncStore, "RESOLVE_TTL_S", 3600.0)
    with closing(Store(store_location)) as db:
        tokens = {"alice": db.create_user("alice")}
    data = tmp_path / "data"
    async with (
        service_on(store_location, data, tokens) as one,
        service_on(store_location, data, tokens) as other,
    ):
        code = "def counter(req):\n    return {'v': VERSION, 'k': env.get('K')}"
        await one.put_val("counter", "VERSION = 1\n" + code)
        assert (await other.web("alice", "counter")).json() == {"v": 1, "k": None}
        await one.put_val("counter", "VERSION = 2\n" + code)
        with trio.fail_after(10):  # within 1 s on an idle machine; margin for a loaded one
            while (await other.web("alice", "counter")).json()["v"] != 2:
                await trio.sleep(0.02)
        response = await one.api("PUT", "/v1/env/K", content=b"set on one")
        assert response.status_code == 200, response.text
        with trio.fail_after(10):
            while (await other.web("alice", "counter")).json()["k"] != "set on one":
                await trio.sleep(0.02)
        response = await one.api("DELETE", "/v1/vals/alice/counter")
        assert response.status_code == 200, response.text
        with trio.fail_after(10):
            while (await other.web("alice", "counter")).status_code != 404:
                await trio.sleep(0.02)
