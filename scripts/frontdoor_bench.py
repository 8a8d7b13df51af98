"""What valrun's accept path costs: the bare hello app served by hypercorn's own `serve`
against the same app served by `runtime.frontdoor.serve_app` (every connection counted and
capped, cleartext HTTP/2 refused at the stream), both real subprocesses measured by wrk.

    scripts/frontdoor_bench [--rounds 5] [--duration 5] [--connections 16]

Each round starts both servers afresh and runs them interleaved (hypercorn, front door, front
door, hypercorn), so the machine's drift falls on both; the ratios are per round, and the
table shows their medians. Exits 0 when everything was measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio
from bench import HELLO_APP, free_port, open_server, run_wrk


async def measure(rounds: int, duration_s: int, connections: int, workdir: Path) -> int:
    throughput: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    for number in range(1, rounds + 1):
        results: dict[str, list[tuple[float, float, float]]] = {"plain": [], "door": []}
        for name in ("plain", "door", "door", "plain"):
            port = free_port()
            command = [sys.executable, str(HELLO_APP), "--bind", f"127.0.0.1:{port}"]
            if name == "door":
                command.append("--front-door")
            async with open_server(name, command, port, workdir / f"{name}.log"):
                result = await run_wrk(port, "localhost", connections, duration_s)
            results[name].append((result.requests_per_s, result.p50_ms, result.p99_ms))
            print(
                f"round {number} {name:5}: {result.requests_per_s:7.0f} req/s, "
                f"p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms",
                flush=True,
            )
        plain = [statistics.mean(values) for values in zip(*results["plain"], strict=True)]
        door = [statistics.mean(values) for values in zip(*results["door"], strict=True)]
        throughput.append(door[0] / plain[0])
        p50.append(door[1] / plain[1])
        p99.append(door[2] / plain[2])
    print(f"\nfront door / hypercorn's serve, medians over {rounds} rounds (c={connections}):")
    print(f"  throughput {statistics.median(throughput):.2f}x")
    print(f"  p50 latency {statistics.median(p50):.2f}x, p99 latency {statistics.median(p99):.2f}x")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/frontdoor_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if not (args.rounds > 0 and args.duration > 0 and args.connections > 0):
        raise SystemExit("frontdoor_bench: --rounds, --duration and --connections are positive")
    workdir = Path(tempfile.mkdtemp(prefix="valrun-frontdoor-bench-"))
    return trio.run(measure, args.rounds, args.duration, args.connections, workdir)


if __name__ == "__main__":
    sys.exit(main())
