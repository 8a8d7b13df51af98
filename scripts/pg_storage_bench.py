"""Measure storage on PostgreSQL against SQLite, in one run, through the backends themselves
(`PgStorage`, `SqliteStorage`: the thread hop, the turn-taking and the transaction each call
makes, without the val's round trip, which is the same for both):

    scripts/pg_storage_bench [--calls 2000] [--tenants 10] [--url postgresql://...]

- `blob.get`, `blob.set` (100-byte values) and a small SQL query (a primary-key SELECT):
  median and p99 of `--calls` calls each, SQLite first, then PostgreSQL.
- A tenant's first SQL call (its role and database are created) against its second, over
  `--tenants` new users; and the memory (PSS) of one idle tenant connection's backend.

Without `--url`, a throwaway PostgreSQL is started (tests/pg_kit.py), which runs with fsync
off: its writes cost less than a production server's. Give `--url` of a durable server (fsync
on, the default) to compare writes; the script prints which it measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
import trio
from loadlib import percentile

from runtime.config import StorageConfig
from runtime.pg_storage import PgStorage
from runtime.storage import SqliteStorage, StorageBackend
from tests import (
    pg_kit,
)  # the throwaway server (scripts/pg_storage_bench puts the repo on the path)

USER = "bench"
MIB = 1024 * 1024


def summary(times_s: list[float]) -> str:
    us = [t * 1e6 for t in times_s]
    return f"p50 {percentile(us, 50):8.1f} µs   p99 {percentile(us, 99):8.1f} µs"


async def timed(calls: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await op()
        times.append(time.perf_counter() - started)
    return times


async def measure(storage: StorageBackend, calls: int) -> dict[str, list[float]]:
    await storage.blob_set(USER, "key", b"v" * 100)
    await storage.sql(
        USER,
        [
            ("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)", ()),
            ("INSERT INTO kv VALUES ('key', 'value') ON CONFLICT (k) DO NOTHING", ()),
        ],
        batch=True,
    )
    query = [("SELECT v FROM kv WHERE k = ?", ("key",))]
    return {
        "blob.get": await timed(calls, lambda: storage.blob_get(USER, "key")),
        "blob.set": await timed(calls, lambda: storage.blob_set(USER, "key", b"w" * 100)),
        "sql SELECT": await timed(calls, lambda: storage.sql(USER, query, batch=False)),
    }


def backend_pss_kib(url: str, storage: PgStorage, user: str) -> int:
    """The PSS of the PostgreSQL backend serving `user`'s open connection (needs to read
    /proc/<pid>/smaps_rollup: this machine's root, or the server's own user)."""
    slot = storage._turns.users.get(user)
    if slot is None or slot.db is None:
        return -1
    pid = slot.db.conn.info.backend_pid
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return -1


async def first_calls(url: str, tenants: int) -> tuple[list[float], list[float], int]:
    storage = PgStorage(StorageConfig(), url, MIB)
    first: list[float] = []
    second: list[float] = []
    try:
        for i in range(tenants):
            user = f"tenant{i}"
            for times in (first, second):
                started = time.perf_counter()
                await storage.sql(user, [("SELECT 1", ())], batch=False)
                times.append(time.perf_counter() - started)
        pss = backend_pss_kib(url, storage, f"tenant{tenants - 1}")
    finally:
        storage.close()
    return first, second, pss


async def main(options: argparse.Namespace) -> int:
    cluster = None
    url = options.url
    if not url:
        cluster = pg_kit.start_cluster()
        url = cluster.create_database()
    workdir = Path(tempfile.mkdtemp(prefix="valrun-pg-storage-bench-"))
    try:
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            fsync = conn.execute("SHOW fsync").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'} (fsync {fsync[0] if fsync else '?'})")
        print(f"{options.calls} calls each, one run, through the backend in this process\n")
        results: dict[str, dict[str, list[float]]] = {}
        sqlite = SqliteStorage(StorageConfig(), workdir, MIB)
        try:
            results["SQLite"] = await measure(sqlite, options.calls)
        finally:
            sqlite.close()
        pg = PgStorage(StorageConfig(), url, MIB)
        try:
            results["PostgreSQL"] = await measure(pg, options.calls)
        finally:
            pg.close()
        for op in results["SQLite"]:
            for name, found in results.items():
                print(f"{op:11} {name:10} {summary(found[op])}")
            ratio = percentile(results["PostgreSQL"][op], 50) / percentile(
                results["SQLite"][op], 50
            )
            print(f"{op:11} PostgreSQL / SQLite at p50: {ratio:.2f}x\n")
        first, second, pss = await first_calls(url, options.tenants)
        ms_first = [t * 1e3 for t in first]
        ms_second = [t * 1e3 for t in second]
        print(
            f"a tenant's first SQL call (role + database created), {options.tenants} tenants: "
            f"p50 {percentile(ms_first, 50):.1f} ms, max {max(ms_first):.1f} ms"
        )
        print(f"its second call: p50 {percentile(ms_second, 50):.2f} ms")
        print(f"an idle tenant connection's backend: PSS {pss} KiB")
    finally:
        if cluster is not None:
            cluster.stop()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--url", default="", help="a PostgreSQL database (a superuser's URL)")
    sys.exit(trio.run(main, parser.parse_args()))
