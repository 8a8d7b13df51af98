"""Measure scheduled vals on this machine: how late ticks start with many vals scheduled, and
what that costs web traffic.

    scripts/schedule_bench [--vals 500] [--minutes 2] [--every-s N] [--max-concurrent 8]
                           [--json FILE]

One valrun (`valrun --config TMP serve`, a real subprocess over a temporary SQLite file) with
default [pool] and [schedule] settings, except `min_interval_s = 1` (so that `--every-s` may
go below a minute) and `max_concurrent` (--max-concurrent; 4 by default, as the service's).
The vals belong to vals/5 users (5 each: the default per-user concurrency cap, 2, then
applies as it would to real tenants). Each scheduled val prints the tick it was called for;
its invocation record holds when it started, so lateness = started - scheduled, per run,
exactly. Also reported: how long each run took (with 500 vals and 64 warm workers at most,
nearly every run is a cold start).

1. Baseline: a warm `hello` val, driven by a closed loop of --connections clients for
   --baseline-s seconds, with no schedules: its p50 and p99.
2. The vals get a schedule (`* * * * *` by default: every minute, all on the minute, the
   usual and worst case; or `--every-s N`), and the same load runs for --minutes minutes.
   Reported: the lateness of ticks (p50, p99, max) and the hello val's p50/p99 over the whole
   run and within the first 10 s after each tick (when the runs start).

Exits 0 when everything was measured; 1 when something could not be.
"""

from __future__ import annotations

import argparse
import bisect
import json
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from bench import MeasureError, free_port, open_server
from loadlib import HttpError, Target, ValrunClient, percentile

from runtime.schedule import Schedule
from runtime.store import Store

API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"
HELLO = 'def hello(req):\n    return Response.json({"greeting": "hi"})\n'
TICK = """\
def {name}(interval):
    print(repr(interval.scheduled_at))
"""
VALS_PER_USER = 5
AFTER_TICK_S = 10.0


@dataclass
class Latency:
    p50_ms: float
    p99_ms: float
    requests: int


@dataclass
class Result:
    vals: int
    schedule: str
    max_concurrent: int
    ticks_run: int
    ticks_skipped: int
    ticks_failed: int
    run_p50_ms: float
    run_p99_ms: float
    lateness_p50_s: float
    lateness_p99_s: float
    lateness_max_s: float
    web_baseline: Latency
    web_with_schedules: Latency
    web_in_tick_windows: Latency


def latency(samples: list[float]) -> Latency:
    return Latency(percentile(samples, 50) * 1000, percentile(samples, 99) * 1000, len(samples))


async def drive(target: Target, duration_s: float, connections: int) -> list[tuple[float, float]]:
    """(wall time at start, seconds) of each GET of the hello val, from a closed loop."""
    samples: list[tuple[float, float]] = []
    deadline = trio.current_time() + duration_s

    async def client() -> None:
        web = ValrunClient(target, API_HOST, WEB_DOMAIN)
        try:
            while trio.current_time() < deadline:
                at, started = time.time(), trio.current_time()
                answer = await web.call("load", "hello")
                if answer.status != 200:
                    raise HttpError(f"hello answered {answer.status}: {answer.body[:200]!r}")
                samples.append((at, trio.current_time() - started))
        finally:
            await web.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(client)
    return samples


def in_tick_window(at: float, ticks: list[float]) -> bool:
    """Whether `at` is within AFTER_TICK_S after one of the (sorted) ticks."""
    index = bisect.bisect_right(ticks, at)
    return index > 0 and at - ticks[index - 1] < AFTER_TICK_S


@dataclass
class Runs:
    lateness_s: list[float]  # started - scheduled, per run
    durations_s: list[float]  # invocation time (a cold start included), per run
    ticks: list[float]  # sorted
    skipped: int
    failed: int


def read_runs(db_path: Path) -> Runs:
    """The scheduled runs, from their invocation records."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT started_at, duration_ms, log, error_type FROM runs WHERE source = 'cron'"
        ).fetchall()
    runs = Runs([], [], [], 0, 0)
    ticks = set()
    for started_at, duration_ms, log, error_type in rows:
        if error_type == "skipped":
            runs.skipped += 1
        elif error_type is not None or not log.strip():
            runs.failed += 1
        else:
            tick = float(log.strip().splitlines()[-1])
            runs.lateness_s.append(started_at - tick)
            runs.durations_s.append(duration_ms / 1000)
            ticks.add(tick)
    runs.ticks = sorted(ticks)
    return runs


def prepare(db_path: Path, vals: int) -> list[int]:
    """Users, the hello val, and the vals to schedule (not scheduled yet): their ids."""
    store = Store(db_path)
    ids = []
    try:
        store.create_user("load")
        store.put_val("load", "hello", HELLO, None)
        for index in range(vals):
            user = f"u{index // VALS_PER_USER}"
            if index % VALS_PER_USER == 0:
                store.create_user(user)
            name = f"t{index}"
            ids.append(store.put_val(user, name, TICK.format(name=name), None)[0].val_id)
    finally:
        store.close()
    return ids


def schedule_all(db_path: Path, ids: list[int], schedule: Schedule) -> None:
    store = Store(db_path)
    try:
        for val_id in ids:
            store.put_schedule(val_id, schedule, time.time(), max_per_user=VALS_PER_USER)
    finally:
        store.close()


async def measure(args: argparse.Namespace, workdir: Path) -> Result:
    db_path = workdir / "valrun.db"
    ids = prepare(db_path, args.vals)
    port = free_port()
    config = workdir / "valrun.toml"
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}"]\n'
        f'[store]\nurl = "sqlite:///{db_path}"\n'
        f"[schedule]\nmin_interval_s = 1\nmax_concurrent = {args.max_concurrent}\n"
    )
    schedule = (
        Schedule("every", str(args.every_s)) if args.every_s else Schedule("cron", "* * * * *")
    )
    period = args.every_s or 60
    command = [sys.executable, "-m", "runtime.cli", "--config", str(config), "serve"]
    target = Target("127.0.0.1", port)
    async with open_server("valrun", command, port, workdir / "valrun.log"):
        print(f"warming up, then {args.baseline_s} s of baseline load", file=sys.stderr)
        await drive(target, 3, args.connections)
        baseline = await drive(target, args.baseline_s, args.connections)
        schedule_all(db_path, ids, schedule)
        # Start 2 s before a round of ticks, so each period of load holds whole rounds.
        await trio.sleep((period - time.time() % period - 2.0) % period)
        print(
            f"{args.vals} vals scheduled ({schedule.describe()}); load for {args.minutes} min",
            file=sys.stderr,
        )
        loaded = await drive(target, args.minutes * 60, args.connections)
    runs = read_runs(db_path)
    late = runs.lateness_s
    if not late:
        raise MeasureError("no scheduled run was recorded")
    return Result(
        vals=args.vals,
        schedule=schedule.describe(),
        max_concurrent=args.max_concurrent,
        ticks_run=len(late),
        ticks_skipped=runs.skipped,
        ticks_failed=runs.failed,
        run_p50_ms=percentile(runs.durations_s, 50) * 1000,
        run_p99_ms=percentile(runs.durations_s, 99) * 1000,
        lateness_p50_s=percentile(late, 50),
        lateness_p99_s=percentile(late, 99),
        lateness_max_s=max(late),
        web_baseline=latency([s for _, s in baseline]),
        web_with_schedules=latency([s for _, s in loaded]),
        web_in_tick_windows=latency([s for at, s in loaded if in_tick_window(at, runs.ticks)]),
    )


def report(result: Result) -> str:
    lines = [
        f"{result.vals} vals scheduled {result.schedule!r} (max_concurrent "
        f"{result.max_concurrent}): {result.ticks_run} runs, "
        f"{result.ticks_skipped} skipped, {result.ticks_failed} failed; a run took "
        f"p50 {result.run_p50_ms:.1f} ms, p99 {result.run_p99_ms:.1f} ms",
        f"lateness (started - scheduled): p50 {result.lateness_p50_s * 1000:.0f} ms, "
        f"p99 {result.lateness_p99_s * 1000:.0f} ms, max {result.lateness_max_s * 1000:.0f} ms",
    ]
    for label, web in (
        ("warm val, no schedules", result.web_baseline),
        ("warm val, schedules firing (whole run)", result.web_with_schedules),
        (f"warm val, first {AFTER_TICK_S:.0f} s after each tick", result.web_in_tick_windows),
    ):
        lines.append(
            f"{label}: p50 {web.p50_ms:.1f} ms, p99 {web.p99_ms:.1f} ms ({web.requests} requests)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vals", type=int, default=500)
    parser.add_argument("--minutes", type=int, default=2)
    parser.add_argument("--baseline-s", type=int, default=30)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--every-s", type=int, help="every N seconds instead of '* * * * *'")
    parser.add_argument("--max-concurrent", type=int, default=4, help="[schedule] max_concurrent")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="valrun-schedule-bench-") as tmp:
        try:
            result = trio.run(measure, args, Path(tmp))
        except (MeasureError, HttpError) as exc:
            print(f"schedule_bench: {exc}", file=sys.stderr)
            return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
