"""The front end spends bounded memory per request and per cached entry, and holds shared
data once: counted with tracemalloc and the store's own SQL, never with the clock."""

from __future__ import annotations

import json
import sqlite3
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from runtime.reply import check_result_body
from runtime.store import AsyncStore, Store
from sandbox.limits import WorkerLimits
from sandbox.wire import Frame, FrameDecoder, encode_frame

MIB = 1024 * 1024


def peak_of(action: Callable[[], object]) -> int:
    """The most memory Python allocated while `action` ran, over what it held before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """Every SQL statement `store` runs inside the block."""
    seen: list[str] = []
    db = store._db
    assert isinstance(db, sqlite3.Connection)  # these tests watch a SQLite store's SQL
    db.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        db.set_trace_callback(None)


# --- cached resolutions --------------------------------------------------------------------


def owner_with_vals(tmp_path: Path, vals: int, env_bytes: int) -> Store:
    store = Store(tmp_path / "m.db")
    store.create_user("alice")
    for i in range(vals):
        store.put_val("alice", f"v{i}", f"v{i} = {i}", None)
    for i in range(env_bytes // 10_000):
        store.set_env("alice", f"K{i}", f"{i:05}" * 2000)
    return store


async def test_every_cached_resolution_of_an_owner_shares_one_env(tmp_path: Path) -> None:
    store = owner_with_vals(tmp_path, vals=40, env_bytes=500_000)
    cached = AsyncStore(store)
    first = await cached.resolve("alice", "v0", None)
    assert first is not None
    assert len(first[1]) == 50
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        resolved = [await cached.resolve("alice", f"v{i}", None) for i in range(1, 40)]
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(r is not None and r[1] is first[1] for r in resolved)
    # 39 more entries: each its val and a reference to the env, not 500 KB of its own (the
    # store thread may still hold the last one it read, once: 20 MB unshared).
    assert held - before < 2 * 500_000, held - before


async def test_an_env_changed_elsewhere_is_shared_in_its_new_form(tmp_path: Path) -> None:
    store = owner_with_vals(tmp_path, vals=2, env_bytes=0)
    cached = AsyncStore(store)
    cached.RESOLVE_TTL_S = 0.0
    old = await cached.resolve("alice", "v0", None)
    store.set_env("alice", "K", "new")  # behind the cache's back (another node)
    new0, new1 = (
        await cached.resolve("alice", "v0", None),
        await cached.resolve("alice", "v1", None),
    )
    assert old is not None
    assert new0 is not None
    assert new1 is not None
    assert old[1] == {}
    assert new0[1] == {"K": "new"}
    assert new1[1] is new0[1]


async def test_the_code_the_cache_holds_is_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.db")
    store.create_user("alice")
    code = "x = 1\n" + "#" * 100_000
    for n in range(30):
        store.put_val("alice", "big", code + str(n), None)
    cached = AsyncStore(store)
    cached.RESOLVE_CACHE_CODE_BYTES = 1_000_000
    for n in range(1, 31):
        resolved = await cached.resolve("alice", "big", n)
        assert resolved is not None
        assert resolved[0].version == n
        held = sum(len(r[0].code) for _, r in cached._resolved.values() if r is not None)
        assert held <= 1_000_000 + len(code) + 2
    # The latest, asked for by number and as the default, is held once.
    latest = await cached.resolve("alice", "big", None)
    by_number = await cached.resolve("alice", "big", 30)
    assert latest is not None
    assert by_number is not None
    assert latest[0] is by_number[0]


# --- listings read what they list ----------------------------------------------------------


def test_listing_versions_reads_no_code(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    store.create_user("alice")
    for n in range(5):
        store.put_val("alice", "v", "v = 1\n" + "#" * 50_000 + str(n), None)
    with statements(store) as seen:
        versions = store.version_list("alice", "v")
    assert [n for n, _ in versions] == [1, 2, 3, 4, 5]
    assert seen
    assert not any("code" in sql for sql in seen), seen


def test_listing_vals_reads_no_code(tmp_path: Path) -> None:
    store = Store(tmp_path / "l.db")
    store.create_user("alice")
    for name in ("a", "b"):
        store.put_val("alice", name, f"{name} = 1", "private")
    with statements(store) as seen:
        vals = store.list_vals("alice", ("public", "unlisted", "private"))
    assert [(v.name, v.version, v.privacy) for v in vals] == [
        ("a", 1, "private"),
        ("b", 1, "private"),
    ]
    assert not any("ver.code" in sql for sql in seen), seen


def test_listing_env_keys_reads_no_value(tmp_path: Path) -> None:
    store = Store(tmp_path / "e.db", secret_key="k" * 40)
    store.create_user("alice")
    store.set_env("alice", "B", "secret")
    store.set_env("alice", "A", "other")
    with statements(store) as seen:
        keys = store.env_keys("alice")
    assert keys == ["A", "B"]
    assert not any("value" in sql for sql in seen), seen


# --- a worker's reply, decoded once ---------------------------------------------------------


def result_bodies() -> dict[str, bytes]:
    return {
        "objects": json.dumps([{"id": i, "name": "x" * 8} for i in range(120_000)]).encode(),
        "numbers": json.dumps(list(range(600_000))).encode(),
    }


@pytest.mark.parametrize("kind", ["objects", "numbers"])
def test_checking_a_result_does_not_build_it(kind: str) -> None:
    body = result_bodies()[kind]
    limits = WorkerLimits(max_response_body_bytes=8 * MIB)
    built = peak_of(lambda: json.loads(body))
    checked = peak_of(lambda: check_result_body(body, limits))
    # The check decodes the text once (its size) and keeps no objects or numbers.
    assert checked < 3 * len(body), (checked, len(body))
    assert checked * 2 < built


def test_a_frame_body_is_copied_once_out_of_the_decoder() -> None:
    body = b"r" * (4 * MIB)
    data = encode_frame(Frame({"op": "result", "id": 1}, body))
    decoder = FrameDecoder()
    decoder.feed(data)
    frames: list[Frame | None] = []
    peak = peak_of(lambda: frames.append(decoder.next_frame()))
    assert frames[0] is not None
    assert frames[0].body == body
    assert peak < 1.5 * len(body), peak  # the body, once (a slice would add two copies)


def test_sqlite_listing_helpers_are_only_reads(tmp_path: Path) -> None:
    store = Store(tmp_path / "r.db")
    store.create_user("alice")
    before = store.changes
    store.version_list("alice", "none")
    store.env_keys("alice")
    assert store.changes == before
    assert isinstance(store._db, sqlite3.Connection)
