"""What one fork server per user costs, against one shared by all: measured on this machine.

    scripts/tenant_cost [--users 6] [--warm 200]

For each mode (`sandbox.fork_server_per_user` true and false) it opens the real worker pool
(fork servers, confined workers; no HTTP, so only the pool's own costs show) and measures,
client-side around `Pool.invoke`:
- a user's first cold start (per user: their fork server starts first) and a later cold start
  of another val of the same user (per user: their spare worker, as prewarmed ones are shared);
- warm latency (p50, p99) of one val;
- memory: the PSS and RSS of the fork servers, and the PSS of all workers.
And it times the getattr guard (what every attribute read in a val costs), whose refusals
are now decided on what the attribute resolves to. Prints a table; exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from dataclasses import replace
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.config import Config, SandboxConfig
from runtime.pool import Pool, ValSpec, open_pool
from sandbox.messages import HttpRequest

HELLO = "def {name}(req):\n    return Response.json({{'hi': req.path}})\n"
REQUEST = HttpRequest(0, "GET", "/", "/", "", ())


def spec(owner: str, val_id: int) -> ValSpec:
    name = f"v{val_id}"
    return ValSpec(val_id, 1, owner, name, HELLO.format(name=name), (), f"{owner}-{name}.x")


async def timed(pool: Pool, val: ValSpec) -> float:
    started = time.perf_counter()
    await pool.invoke(val, REQUEST)
    return (time.perf_counter() - started) * 1000


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process, from /proc/PID/smaps_rollup."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    values[key] = int(rest.split()[0])
    except OSError:
        return 0, 0
    return values.get("Pss", 0), values.get("Rss", 0)


def fork_server_handles(pool: Pool) -> list[object]:
    if pool.tenants is not None:
        servers = [pool.tenants.fork_server(f"user{i}") for i in range(100)]
        return [s.server for s in servers if s is not None and s.server is not None]
    assert pool.fork_server is not None
    assert pool.fork_server.server is not None
    return [pool.fork_server.server]


async def measure(per_user: bool, users: int, warm: int) -> dict[str, float]:
    config = replace(Config(), sandbox=SandboxConfig(fork_server_per_user=per_user))
    async with open_pool(config) as pool:
        await trio.sleep(1.0)  # prewarming (shared mode) settles
        first, later = [], []
        for user in range(users):
            first.append(await timed(pool, spec(f"user{user}", 1000 + user)))
            await trio.sleep(0.3)  # the refill after it (both modes) is done
            later.append(await timed(pool, spec(f"user{user}", 2000 + user)))
            await trio.sleep(0.3)
        warm_ms = sorted([await timed(pool, spec("user0", 1000)) for _ in range(warm)])
        handles = fork_server_handles(pool)
        servers = [memory_kib(h.process.pid) for h in handles]  # type: ignore[attr-defined]
        workers = [
            memory_kib(pid)
            for h in handles
            for pid in list(h.workers)  # type: ignore[attr-defined]
        ]
        return {
            "fork servers": len(handles),
            "first cold start, median ms": statistics.median(first),
            "first cold start, max ms": max(first),
            "later cold start, median ms": statistics.median(later),
            "warm p50 ms": warm_ms[len(warm_ms) // 2],
            "warm p99 ms": warm_ms[int(len(warm_ms) * 0.99) - 1],
            "fork servers PSS MiB": sum(p for p, _ in servers) / 1024,
            "fork servers RSS MiB": sum(r for _, r in servers) / 1024,
            "workers": len(workers),
            "workers PSS MiB": sum(p for p, _ in workers) / 1024,
        }


def guard_ns() -> dict[str, float]:
    setup = "from sandbox.policy import guarded_getattr; x = 'abc'; d = {}"
    base = "from RestrictedPython.Guards import safer_getattr_raise as g; x = 'abc'"
    runs = 200_000

    def best(stmt: str, setup: str) -> float:
        return min(timeit.repeat(stmt, setup, number=runs, repeat=5)) / runs * 1e9

    return {
        "RestrictedPython's getattr guard, ns": best("g(x, 'upper')", base),
        "valrun's getattr guard, ns": best("guarded_getattr(x, 'upper')", setup),
        "valrun's, on a dict method, ns": best("guarded_getattr(d, 'get')", setup),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--warm", type=int, default=200)
    args = parser.parse_args()
    results = {
        mode: trio.run(measure, mode == "per user", args.users, args.warm)
        for mode in ("shared", "per user")
    }
    print(f"{'':32} {'shared':>10} {'per user':>10}")
    for key in results["shared"]:
        print(f"{key:32} {results['shared'][key]:10.1f} {results['per user'][key]:10.1f}")
    for key, value in guard_ns().items():
        print(f"{key:43} {value:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
