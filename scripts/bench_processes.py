"""Measure what `[server] processes = 2` buys over 1 on this machine, against what two
processes buy a bare hypercorn-trio app.

    scripts/bench_processes [--rounds 3] [--duration 5] [--connections 32] [--json FILE]

Four servers, each a real subprocess on 127.0.0.1: the bare hello app (scripts/hello_app.py)
with 1 and with 2 hypercorn workers, and valrun serving the warm hello val with
`processes = 1` and `processes = 2` (one SQLite file). One client, wrk (`-t1`, keep-alive),
measures each in turn. The machine is noisy, so each round starts all four afresh and runs
them in the order b1 b2 v1 v2 v2 v1 b2 b1 (a drift in speed hits both sides of each ratio),
and the ratios are computed within the round; the table shows medians over rounds. On a
machine that other programs load, the absolute figures mean little; the ratios are the result.

Goal: valrun with two processes at least 1.6x one. Exits 0 when everything was measured, met
or not; 1 when something could not be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio
from bench import (
    HELLO,
    HELLO_APP,
    MeasureError,
    Server,
    WrkResult,
    free_port,
    median,
    open_server,
    run_wrk,
    say,
)
from loadlib import HttpError, SetupError, Target, ValrunClient, create_user

USER = "bench"
API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"
#: Each setup's name: (kind, processes).
SETUPS = {"bare-1": ("bare", 1), "bare-2": ("bare", 2), "valrun-1": ("valrun", 1)} | {
    "valrun-2": ("valrun", 2)
}
ORDER = ("bare-1", "bare-2", "valrun-1", "valrun-2", "valrun-2", "valrun-1", "bare-2", "bare-1")
GOAL = 1.6


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    duration_s: int
    connections: int
    json_out: Path | None


@dataclass
class Report:
    options: Options
    #: Per round, per setup: the wrk runs (two each).
    rounds: list[dict[str, list[WrkResult]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ratio(self, top: str, bottom: str) -> float:
        """The median over rounds of (top's mean req/s) / (bottom's)."""
        return median([rate(r[top]) / rate(r[bottom]) for r in self.rounds])

    def figure(self, setup: str, what: str) -> float:
        return median([getattr(run, what) for r in self.rounds for run in r[setup]])


def rate(runs: list[WrkResult]) -> float:
    return sum(run.requests_per_s for run in runs) / len(runs)


def valrun_config(port: int, db: Path, processes: int) -> str:
    return (
        f'[server]\nbind = ["127.0.0.1:{port}"]\nprocesses = {processes}\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
    )


@asynccontextmanager
async def open_setup(name: str, workdir: Path) -> AsyncIterator[Server]:
    kind, processes = SETUPS[name]
    port = free_port()
    log = workdir / f"{name}.log"
    if kind == "bare":
        command = [sys.executable, str(HELLO_APP), "--bind", f"127.0.0.1:{port}"]
        command += ["--workers", str(processes)]
    else:
        config = workdir / f"{name}.toml"
        config.write_text(valrun_config(port, workdir / "valrun.db", processes))
        command = [str(Path(sys.executable).with_name("valrun")), "--config", str(config), "serve"]
    async with open_server(name, command, port, log) as server:
        yield server


def host_of(server: Server) -> str:
    return f"{USER}-hello.{WEB_DOMAIN}:{server.port}"


async def one_round(report: Report, workdir: Path) -> None:
    options = report.options
    results: dict[str, list[WrkResult]] = {name: [] for name in SETUPS}
    async with AsyncExitStack() as stack:
        servers = {
            name: await stack.enter_async_context(open_setup(name, workdir)) for name in SETUPS
        }
        # Warm-up: connections, each process's worker for the val, its caches.
        for server in servers.values():
            await run_wrk(server.port, host_of(server), options.connections, 2)
        for name in ORDER:
            server = servers[name]
            run = await run_wrk(
                server.port, host_of(server), options.connections, options.duration_s
            )
            results[name].append(run)
            say(
                f"  {name:8} {run.requests_per_s:7.0f} req/s, "
                f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms"
            )
    report.rounds.append(results)


async def run_bench(options: Options, workdir: Path) -> Report:
    report = Report(options)
    config = workdir / "setup.toml"
    config.write_text(valrun_config(free_port(), workdir / "valrun.db", 1))
    try:
        token = await create_user(config, USER)
        async with open_setup("valrun-1", workdir) as valrun:
            client = ValrunClient(Target("127.0.0.1", valrun.port), API_HOST, WEB_DOMAIN, token)
            try:
                await client.put_val(USER, "hello", HELLO.format(name="hello"))
            finally:
                await client.aclose()
    except (SetupError, MeasureError, HttpError, OSError) as exc:
        report.failures.append(f"setup: {exc}")
        return report
    for index in range(options.rounds):
        say(f"round {index + 1} of {options.rounds}")
        try:
            await one_round(report, workdir)
        except (MeasureError, HttpError, OSError, trio.TooSlowError) as exc:
            report.failures.append(f"round {index + 1}: {exc}")
            say(f"  round {index + 1} failed: {exc}")
    return report


def table(report: Report) -> str:
    lines = [
        "| setup | req/s (median) | p50 | p99 |",
        "|---|---|---|---|",
    ]
    for name in SETUPS:
        lines.append(
            f"| {name} | {report.figure(name, 'requests_per_s'):,.0f} | "
            f"{report.figure(name, 'p50_ms'):.1f} ms | {report.figure(name, 'p99_ms'):.1f} ms |"
        )
    two_over_one = report.ratio("valrun-2", "valrun-1")
    lines += [
        "",
        "| ratio (median of per-round ratios) | value | goal |",
        "|---|---|---|",
        f"| valrun, 2 processes / 1 | {two_over_one:.2f}x | ≥ {GOAL:.1f}x "
        f"{'met' if two_over_one >= GOAL else 'NOT met'} |",
        f"| bare hypercorn-trio, 2 workers / 1 | {report.ratio('bare-2', 'bare-1'):.2f}x | |",
        f"| valrun-1 / bare-1 | {report.ratio('valrun-1', 'bare-1'):.2f}x | |",
        f"| valrun-2 / bare-2 | {report.ratio('valrun-2', 'bare-2'):.2f}x | |",
    ]
    return "\n".join(lines)


def parse_options(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="scripts/bench_processes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="server starts (default: 3)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default: 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("rounds", "duration", "connections"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"bench_processes: --{name} must be positive")
    return Options(
        args.rounds, args.duration, args.connections, Path(args.json_out) if args.json_out else None
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    if shutil.which("wrk") is None:
        print("bench_processes: wrk is not installed (scripts/bench installs it)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="valrun-bench-processes-"))
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        report = trio.run(run_bench, options, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    took_s, load_after = time.monotonic() - started, os.getloadavg()[0]
    print(
        f"\n## valrun processes bench ({took_s:.0f} s, {len(os.sched_getaffinity(0))} CPUs, "
        f"wrk -t1 -c{options.connections}, {options.duration_s} s runs, {len(report.rounds)} "
        f"rounds; load average {load_before:.1f} before, {load_after:.1f} after)\n"
    )
    if load_before > 0.5:
        print("Other programs were busy when the bench began: read the ratios, not the rates.\n")
    if report.rounds:
        print(table(report))
    for failure in report.failures:
        print(f"- not measured: {failure}")
    if options.json_out is not None:
        data = asdict(report) | {"goal": GOAL}
        options.json_out.parent.mkdir(parents=True, exist_ok=True)
        options.json_out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
