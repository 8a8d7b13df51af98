"""Measure the store's backends against each other in one run: a warm val served with the
store on SQLite and on PostgreSQL (the resolution cache should make them equal), and saves.

    scripts/store_bench [--duration 10] [--connections 16] [--saves 300] [--pg-url URL]

Without --pg-url a throwaway PostgreSQL cluster is started for the run (tests/pg_kit.py,
Debian's postgresql), with its default durability (fsync and synchronous commit on, as
SQLite's commits in WAL mode here). For each backend, valrun runs as a real subprocess
(`valrun --config TMP serve`):

- Warm val: wrk drives a warm `hello` val with `--connections` keep-alive clients.
- Saves through the API: `--saves` sequential PUTs of a new version, each timed (the save
  check, the store transaction, the change feed's note).
- Saves in-process: `Store.put_val` called directly `--saves` times, each timed: the store's
  own cost, without HTTP or the save check.

SQLite is the baseline: each PostgreSQL number is also given as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path

import httpx
import trio
from bench import MeasureError, free_port, open_server, run_wrk
from loadlib import create_user, percentile

from runtime.store import Store

USER = "bench"
HELLO = "def hello(req):\n    return Response.json({'hi': 'there'})"


@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import pg_kit

    cluster = pg_kit.start_cluster(durable=True)  # fsync on, as SQLite's commits
    try:
        yield cluster.create_database()
    finally:
        cluster.stop()


def stats(times_s: list[float]) -> dict[str, float]:
    ms = [t * 1e3 for t in times_s]
    return {
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "per_s": len(times_s) / sum(times_s),
    }


@asynccontextmanager
async def valrun_on(url: str, workdir: Path) -> AsyncIterator[tuple[int, str]]:
    port = free_port()
    config = workdir / "valrun.toml"
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}"]\n[store]\nurl = "{url}"\n'
        f'[storage]\ndata_dir = "{workdir / "data"}"\n[limits]\nwall_time_s = 60.0\n'
    )
    token = await create_user(config, USER)
    valrun = Path(sys.executable).with_name("valrun")
    command = [str(valrun), "--config", str(config), "serve"]
    async with open_server("valrun", command, port, workdir / "valrun.log"):
        yield port, token


async def measure_service(
    url: str, workdir: Path, options: argparse.Namespace
) -> dict[str, dict[str, float]]:
    async with (
        valrun_on(url, workdir) as (port, token),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        headers = {"host": f"api.localhost:{port}", "authorization": f"Bearer {token}"}

        async def save(name: str) -> float:
            started = time.perf_counter()
            response = await client.put(
                f"/v1/vals/{USER}/{name}", json={"code": HELLO}, headers=headers
            )
            if response.status_code not in (200, 201):
                raise MeasureError(f"save: {response.status_code} {response.text}")
            return time.perf_counter() - started

        await save("hello")
        host = f"{USER}-hello.web.localhost:{port}"
        warm = await client.get("/", headers={"host": host})
        if warm.status_code != 200:
            raise MeasureError(f"the warm-up got {warm.status_code}")
        wrk = await run_wrk(port, host, options.connections, options.duration)
        saves = [await save("hello") for _ in range(options.saves)]
    return {
        "warm_val": {
            "requests_per_s": wrk.requests_per_s,
            "p50_ms": wrk.p50_ms,
            "p99_ms": wrk.p99_ms,
        },
        "api_saves": stats(saves),
    }


def measure_store(location: str, saves: int) -> dict[str, float]:
    with closing(Store(location)) as store:
        store.create_user("direct")
        times = []
        for n in range(saves):
            started = time.perf_counter()
            store.put_val("direct", "v", f"def v(req):\n    return {n}", None)
            times.append(time.perf_counter() - started)
    return stats(times)


def line(label: str, numbers: dict[str, float], base: dict[str, float] | None) -> str:
    text = f"{label:34} p50 {numbers['p50_ms']:7.2f} ms  p99 {numbers['p99_ms']:7.2f} ms"
    if "per_s" in numbers:
        text += f"  {numbers['per_s']:8.0f}/s"
    if base is not None:
        text += f"  (p50 x{numbers['p50_ms'] / base['p50_ms']:.2f} of SQLite)"
    return text


async def main(options: argparse.Namespace) -> int:
    results: dict[str, dict[str, dict[str, float]]] = {}
    with postgres(options.pg_url) as pg_url:
        for backend in ("sqlite", "postgresql"):
            workdir = Path(tempfile.mkdtemp(prefix=f"valrun-store-bench-{backend}-"))
            url = f"sqlite:///{workdir}/valrun.db" if backend == "sqlite" else pg_url
            location = str(workdir / "direct.db") if backend == "sqlite" else pg_url
            print(f"{backend}: valrun in {workdir}", file=sys.stderr)
            results[backend] = await measure_service(url, workdir, options)
            results[backend]["store_saves"] = measure_store(location, options.saves)
    sqlite, pg = results["sqlite"], results["postgresql"]
    for name, label in (("api_saves", "saves through the API"), ("store_saves", "Store.put_val")):
        print(line(f"{label}, SQLite", sqlite[name], None))
        print(line(f"{label}, PostgreSQL", pg[name], sqlite[name]))
    for backend, numbers in (("SQLite", sqlite), ("PostgreSQL", pg)):
        warm = numbers["warm_val"]
        print(
            f"warm val, {backend:10} c={options.connections}: {warm['requests_per_s']:7.0f} "
            f"req/s  p50 {warm['p50_ms']:.2f} ms  p99 {warm['p99_ms']:.2f} ms"
        )
    ratio = pg["warm_val"]["requests_per_s"] / sqlite["warm_val"]["requests_per_s"]
    print(f"warm val throughput, PostgreSQL / SQLite: x{ratio:.2f}")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))  # noqa: ASYNC240 (once, at exit)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--saves", type=int, default=300)
    parser.add_argument("--pg-url", help="an empty PostgreSQL database to use")
    parser.add_argument("--json", help="also write the numbers to this file")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(trio.run(main, parse_args(sys.argv[1:])))
