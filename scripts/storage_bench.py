"""Measure storage: a val's `blob.get` and `sqlite.execute` round trips, against the same
operation called in-process, and the throughput of increments from 16 parallel clients.

    scripts/storage_bench [--calls 2000] [--duration 10] [--connections 16]

valrun runs as a real subprocess (`valrun --config TMP serve`) over a temporary directory.

- Round trip from a val: a val calls the operation 20 times per invocation (`--calls` in all)
  and times each call with `time.perf_counter` inside the worker: the ask frame, the front
  end's handler (a thread hop to SQLite) and the answer frame, without any HTTP.
- In-process: the same operation on the same files in this process, in the same run: through
  the backend (`SqliteStorage`, with its thread hop), and as a bare `sqlite3` call.
- Increments: wrk drives the demo `counter` (one `sqlite.batch` upsert per request) with
  `--connections` keep-alive clients; afterwards the count must equal the requests answered.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import trio
from bench import MeasureError, free_port, open_server, run_wrk
from loadlib import create_user, percentile

from runtime.config import StorageConfig
from runtime.demo import DEMO_VALS
from runtime.storage import SqliteStorage

USER = "bench"
CALLS_PER_INVOCATION = 20

TIMED = """\
import time
from std import blob, sqlite

def timed(op, calls):
    blob.set("key", "v" * 100)
    sqlite.batch([
        "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)",
        "INSERT OR REPLACE INTO kv VALUES ('key', 'value')",
    ])
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        if op == "blob":
            blob.get("key")
        else:
            sqlite.execute("SELECT v FROM kv WHERE k = ?", ("key",))
        times.append(time.perf_counter() - started)
    return times
"""


def summary(times_s: list[float]) -> str:
    us = [t * 1e6 for t in times_s]
    return f"p50 {percentile(us, 50):7.1f} µs   p99 {percentile(us, 99):7.1f} µs"


async def api(port: int, token: str, method: str, path: str, body: object = None) -> object:
    import httpx

    headers = {"host": f"api.localhost:{port}", "authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        response = await client.request(method, path, json=body, headers=headers)
    if response.status_code not in (200, 201):
        raise MeasureError(f"{method} {path}: {response.status_code} {response.text}")
    return response.json()


async def in_process(data_dir: Path, calls: int) -> dict[str, list[float]]:
    storage = SqliteStorage(StorageConfig(), data_dir, 5 * 1024 * 1024)
    out: dict[str, list[float]] = {"blob": [], "sql": []}
    try:
        for _ in range(calls):
            started = time.perf_counter()
            await storage.blob_get(USER, "key")
            out["blob"].append(time.perf_counter() - started)
        for _ in range(calls):
            started = time.perf_counter()
            await storage.sql(USER, [("SELECT v FROM kv WHERE k = ?", ("key",))], batch=False)
            out["sql"].append(time.perf_counter() - started)
    finally:
        storage.close()
    return out


def bare_sqlite(data_dir: Path, calls: int) -> dict[str, list[float]]:
    def timed(conn: sqlite3.Connection, sql: str, args: tuple[str, ...]) -> list[float]:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            conn.execute(sql, args).fetchall()
            times.append(time.perf_counter() - started)
        return times

    blob_db = sqlite3.connect(data_dir / "blob.sqlite")
    sql_db = sqlite3.connect(data_dir / "sql" / f"{USER}.sqlite")
    try:
        blob_sql = "SELECT value FROM blobs WHERE user = ? AND key = ?"
        return {
            "blob": timed(blob_db, blob_sql, (USER, "key")),
            "sql": timed(sql_db, "SELECT v FROM kv WHERE k = ?", ("key",)),
        }
    finally:
        blob_db.close()
        sql_db.close()


async def main(options: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="valrun-storage-bench-"))
    valrun = Path(sys.executable).with_name("valrun")
    port = free_port()
    config = workdir / "valrun.toml"
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}"]\n[store]\nurl = "sqlite:///{workdir}/valrun.db"\n'
        "[limits]\nwall_time_s = 60.0\n"
    )
    token = await create_user(config, USER)
    command = [str(valrun), "--config", str(config), "serve"]
    print(f"valrun on 127.0.0.1:{port}, data in {workdir}", file=sys.stderr)
    results: dict[str, object] = {}
    async with open_server("valrun", command, port, workdir / "valrun.log"):
        await api(port, token, "PUT", f"/v1/vals/{USER}/timed", {"code": TIMED})
        await api(port, token, "PUT", f"/v1/vals/{USER}/counter", {"code": DEMO_VALS["counter"]})
        val: dict[str, list[float]] = {}
        for op in ("blob", "sql"):
            await api(port, token, "POST", f"/v1/run/{USER}.timed", [op, 50])  # warm up
            val[op] = []
            # A few calls per invocation, as a val makes them: an invocation running past
            # pool.demote_after_s (50 ms) drops to idle CPU priority, which would time that.
            for _ in range(options.calls // CALLS_PER_INVOCATION):
                args = [op, CALLS_PER_INVOCATION]
                times = await api(port, token, "POST", f"/v1/run/{USER}.timed", args)
                if not isinstance(times, list):
                    raise MeasureError(f"the timed val answered {times!r}")
                val[op] += [float(t) for t in times]
        data_dir = workdir / "valrun-data"
        backend = await in_process(data_dir, options.calls)
        bare = bare_sqlite(data_dir, options.calls)
        for op, label in (("blob", "blob.get"), ("sql", "sqlite.execute")):
            print(f"{label:15} from a val    {summary(val[op])}")
            print(f"{label:15} backend call  {summary(backend[op])}")
            print(f"{label:15} bare sqlite3  {summary(bare[op])}")
            results[op] = {
                name: {"p50_us": percentile(t, 50) * 1e6, "p99_us": percentile(t, 99) * 1e6}
                for name, t in (("val", val[op]), ("backend", backend[op]), ("bare", bare[op]))
            }
        host = f"{USER}-counter.web.localhost:{port}"
        wrk = await run_wrk(port, host, options.connections, options.duration)
        count = await api(
            port, token, "POST", "/v1/sqlite/execute", {"sql": "SELECT n FROM visits"}
        )
        n = count["rows"][0][0]  # type: ignore[index]
        print(
            f"increments, c={options.connections}: {wrk.requests_per_s:.0f} req/s, "
            f"p50 {wrk.p50_ms:.1f} ms, p99 {wrk.p99_ms:.1f} ms; "
            f"{wrk.requests} answered, count {n}"
        )
        results["increments"] = {
            "connections": options.connections,
            "requests_per_s": wrk.requests_per_s,
            "p50_ms": wrk.p50_ms,
            "p99_ms": wrk.p99_ms,
            "requests": wrk.requests,
            "count": n,
        }
        if n < wrk.requests:
            print("LOST INCREMENTS: the count is below the requests answered", file=sys.stderr)
            return 1
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))  # noqa: ASYNC240 (once, at exit)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args(sys.argv[1:])))
