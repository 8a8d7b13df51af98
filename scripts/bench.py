"""Benchmark valrun on this machine against a bare hypercorn-trio app, and check the targets.

    scripts/bench [--rounds 3] [--quick] [--json FILE]

Everything runs here, on 127.0.0.1: each server is a real subprocess on a free port (the bare
app is scripts/hello_app.py; valrun is `valrun --config TMP serve` over a temporary SQLite
file), and one client, wrk (`-t1`, keep-alive), measures both. The machine is noisy (a trio
server's speed varies by about 25 % from one start to the next), so each round starts both
servers afresh, runs them interleaved (bare, valrun, valrun, bare), and computes the ratios
within the round; the table shows the medians over the rounds.

Measured:
- warm throughput and latency: the hello val vs the same answer from the bare app, c=16,
  and again at c=64 (`--wide-connections`);
- cold start: the first request to each of N never-seen vals vs the second one (client-side);
- memory: PSS of the idle warm workers (/proc/PID/smaps_rollup of valrun's sandbox processes);
- 1,000 distinct vals called round-robin: errors, p99 (the pool evicts; errors must be zero);
- a noisy neighbour: the hello val's p99 at c=4, alone and while another val spins on CPU.

Exits 0 when everything was measured, whether or not the targets were met; 1 when something
could not be measured (the table says what), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio
from loadlib import HttpError, SetupError, Target, ValrunClient, create_user, percentile

SCRIPTS = Path(__file__).resolve().parent
HELLO_APP = SCRIPTS / "hello_app.py"
USER = "bench"
API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"

HELLO = """\
def {name}(req):
    name = req.query.get("name", "world")
    return Response.json({{"greeting": "hi " + name}})
"""
SPIN = """\
def spin(req):
    while True:
        pass
"""
NAMED = "def {name}(req):\n    return {name!r}\n"
#: The bench is one user, so it may have the whole pool: the per-user shares are for many
#: tenants (docs/fairness.md) and would measure the caps here, not the warm path.
ONE_USER_POOL = (
    "[pool]\nmax_workers_per_user = 64\nmax_queued_per_user = 4096\n"
    "cold_starts_per_user_per_s = 1000\n"
)


class MeasureError(Exception):
    """A measurement that could not be taken; the message says why."""


# --- pure parts: wrk's output, /proc, targets -------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    requests: int
    bad_responses: int  # non-2xx/3xx answers
    socket_errors: int  # connect, read, write and timeout errors


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> WrkResult:
    """wrk's report (with --latency) -> WrkResult. Raises MeasureError when it is not one."""

    def number(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise MeasureError(f"wrk's output has no {pattern!r}: {output[-500:]!r}")
        return match

    def latency_ms(percent: int) -> float:
        match = number(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m)\s*$")
        return float(match[1]) * _UNIT_MS[match[2]]

    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests_per_s=float(number(r"^Requests/sec:\s+([\d.]+)")[1]),
        p50_ms=latency_ms(50),
        p90_ms=latency_ms(90),
        p99_ms=latency_ms(99),
        requests=int(number(r"^\s+(\d+) requests in ")[1]),
        bad_responses=int(bad[1]) if bad else 0,
        socket_errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
    )


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """/proc/PID/smaps_rollup -> {"Pss": kB, "Private_Clean": kB, ...}."""
    values = {}
    for line in text.splitlines():
        key, colon, rest = line.partition(":")
        parts = rest.split()
        if colon and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[key.strip()] = int(parts[0])
    return values


def descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def sandbox_processes(root: int, parents: dict[int, int], cmdlines: dict[int, str]) -> list[int]:
    """Descendants of `root` (valrun) whose command line names the sandbox package."""
    return [pid for pid in descendants(root, parents) if "sandbox" in cmdlines.get(pid, "")]


def front_processes(root: int, parents: dict[int, int], cmdlines: dict[int, str]) -> list[int]:
    """`root` and its descendants that are not sandbox processes: the front end. With
    `[server] processes = N` (one per core by default) `root` is a supervisor and the requests
    are served by its `runtime.processes` children."""
    sandbox = set(sandbox_processes(root, parents, cmdlines))
    return [root] + [pid for pid in descendants(root, parents) if pid not in sandbox]


def pick_workers(root: int, parents: dict[int, int], cmdlines: dict[int, str]) -> list[int]:
    """The sandbox processes that are workers, not a fork server.

    Today's pool spawns `sandbox.worker` children of valrun; a fork server (`sandbox.forkserver`)
    has workers as its children, and forked children keep its command line. Either way a worker
    is a sandbox process with no sandbox process below it.
    """
    sandbox = set(sandbox_processes(root, parents, cmdlines))
    has_sandbox_child = {parents[pid] for pid in sandbox}
    return sorted(sandbox - has_sandbox_child)


@dataclass(frozen=True, slots=True)
class Check:
    """One target: `value` compared with `limit` (`at_least` or at most), in `unit`."""

    name: str
    value: float
    limit: float
    at_least: bool
    unit: str

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def margin(self) -> float:
        """Headroom when positive, shortfall when negative."""
        return self.value - self.limit if self.at_least else self.limit - self.value


def fmt(value: float, unit: str, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    sign = "+" if signed or unit in ("%", "pp") else ""
    if unit == "x":
        return f"{value:{sign}.2f}x"
    if unit in ("%", "pp"):  # pp: percentage points
        return f"{value:{sign}.0f} {unit}"
    if unit in ("ms", "MiB"):
        return f"{value:{sign}.1f} {unit}"
    return f"{value:{sign},.0f}{unit}"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_process_table() -> tuple[dict[int, int], dict[int, str]]:
    parents, cmdlines = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:  # the process is gone
            continue
        pid = int(entry.name)
        # `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        parents[pid] = int(stat.rpartition(")")[2].split()[1])
        cmdlines[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return parents, cmdlines


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    return sum(cpu_by_pid(pids).values())


def cpu_by_pid(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU time of each of these processes still running, in seconds."""
    seconds = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone: its time is lost
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        seconds[pid] = ticks / os.sysconf("SC_CLK_TCK")
    return seconds


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `cpu_by_pid` readings: by the processes running at the
    second, those started meanwhile counted whole. One that exited meanwhile is not
    counted at all (its time went with it), rather than counted negative."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def read_memory(pid: int) -> dict[str, int]:
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except (FileNotFoundError, ProcessLookupError):
        return {}  # exited meanwhile (before the open, or before the read)
    except PermissionError:
        raise MeasureError(
            f"cannot read /proc/{pid}/smaps_rollup (a confined worker under another user?): "
            "run the bench as root"
        ) from None


@dataclass
class Server:
    name: str
    process: trio.Process
    port: int
    log: Path


@asynccontextmanager
async def open_server(
    name: str, command: list[str], port: int, log: Path, ready_s: float = 30.0
) -> AsyncIterator[Server]:
    """Start a server, wait until it accepts connections; on exit stop it and what it started."""
    with log.open("ab") as log_file:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    server = Server(name, process, port, log)
    try:
        await _wait_until_listening(server, ready_s)
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await _stop(server)


async def _wait_until_listening(server: Server, ready_s: float) -> None:
    with trio.move_on_after(ready_s):
        while server.process.returncode is None:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
    tail = server.log.read_text(errors="replace")[-1500:]
    status = server.process.returncode
    how = f"exited with status {status}" if status is not None else f"is not up after {ready_s} s"
    raise MeasureError(f"{server.name} {how}; the end of {server.log}:\n{tail}")


async def _stop(server: Server) -> None:
    """SIGTERM (valrun finishes in-flight requests and closes its workers), then SIGKILL; then
    SIGKILL what it started that outlived it."""
    leftovers = _claim_descendants(server.process.pid)
    try:
        if server.process.returncode is None:
            server.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(20):
                await server.process.wait()
            if server.process.returncode is None:
                server.process.kill()
                await server.process.wait()
        for pidfd in leftovers:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        for pidfd in leftovers:
            os.close(pidfd)


def _claim_descendants(root: int) -> list[int]:
    """pidfds of `root`'s descendants. A pidfd names one process for good, so a later signal
    cannot reach another program that was given a reused pid; each is checked, once open, to
    have the parent it had in the table."""
    parents, _ = read_process_table()
    pidfds = []
    for pid in descendants(root, parents):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            stat = ""
        if stat and int(stat.rpartition(")")[2].split()[1]) == parents[pid]:
            pidfds.append(pidfd)
        else:
            os.close(pidfd)
    return pidfds


async def run_wrk(port: int, host: str, connections: int, duration_s: int) -> WrkResult:
    command = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--latency",
        "--timeout",
        "10s",
        "-H",
        f"Host: {host}",
        f"http://127.0.0.1:{port}/",
    ]
    done = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise MeasureError(f"wrk exited with status {done.returncode}: {done.stderr!r}")
    result = parse_wrk(output)
    if result.bad_responses or result.socket_errors:
        raise MeasureError(
            f"wrk against {host} got {result.bad_responses} bad answers and "
            f"{result.socket_errors} socket errors: the numbers would mean nothing"
        )
    return result


# --- the measurements ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    duration_s: int
    connections: int
    wide_connections: int
    cold_vals: int
    cold_gap_s: float
    many_vals: int
    many_passes: int
    many_concurrency: int
    neighbour_connections: int
    wall_time_s: float
    processes: int
    json_out: Path | None
    keep: bool


@dataclass
class ThroughputRound:
    bare: list[WrkResult] = field(default_factory=list)
    valrun: list[WrkResult] = field(default_factory=list)
    #: CPU per request in µs, per run: "bare", "valrun" (the front end), "workers".
    cpu_us: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str, metric: str) -> float:
        runs: list[WrkResult] = getattr(self, side)
        return median([getattr(run, metric) for run in runs])

    @property
    def throughput_ratio(self) -> float:
        return self.median("valrun", "requests_per_s") / self.median("bare", "requests_per_s")

    @property
    def p99_ratio(self) -> float:
        return self.median("valrun", "p99_ms") / self.median("bare", "p99_ms")


@dataclass
class ColdPair:
    cold_ms: float
    warm_ms: float


@dataclass
class Memory:
    workers: int
    pss_kib: list[int]
    private_kib: list[int]
    #: Sum of PSS over all sandbox processes after warming the vals minus before, per val.
    marginal_kib: float


@dataclass
class Many:
    vals: int
    calls: int
    save_s: float
    call_s: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Neighbour:
    alone: list[WrkResult] = field(default_factory=list)
    spinning: list[WrkResult] = field(default_factory=list)
    spin_answers: dict[str, int] = field(default_factory=dict)

    @property
    def p99_increase_percent(self) -> float:
        alone = median([r.p99_ms for r in self.alone])
        return (median([r.p99_ms for r in self.spinning]) / alone - 1) * 100


@dataclass
class Report:
    options: Options
    throughput: list[ThroughputRound] = field(default_factory=list)
    #: The same at `wide_connections` (none when it is 0).
    throughput_wide: list[ThroughputRound] = field(default_factory=list)
    cold: list[ColdPair] = field(default_factory=list)
    memory: Memory | None = None
    many: Many | None = None
    neighbour: list[Neighbour] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def measure_throughput(
    bare: Server, valrun: Server, host: str, options: Options, c: int
) -> ThroughputRound:
    result = ThroughputRound()
    for server in (bare, valrun):  # warm up: connections, the val's worker, caches
        await run_wrk(server.port, host, c, 1)
    # ABBA: a drift of the machine's speed during the round hits both sides alike.
    for server in (bare, valrun, valrun, bare):
        parents, cmdlines = read_process_table()
        workers = sandbox_processes(server.process.pid, parents, cmdlines)
        front = front_processes(server.process.pid, parents, cmdlines)
        front_before, workers_before = cpu_seconds(front), cpu_by_pid(workers)
        run = await run_wrk(server.port, host, c, options.duration_s)
        front_us = (cpu_seconds(front) - front_before) / run.requests * 1e6
        parents, cmdlines = read_process_table()
        workers_after = cpu_by_pid(sandbox_processes(server.process.pid, parents, cmdlines))
        workers_us = cpu_spent(workers_before, workers_after) / run.requests * 1e6
        (result.bare if server is bare else result.valrun).append(run)
        result.cpu_us.setdefault(server.name, []).append(front_us)
        if server is valrun:
            result.cpu_us.setdefault("workers", []).append(workers_us)
        say(
            f"  {server.name:6} c={c}: {run.requests_per_s:7.0f} req/s, "
            f"p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms; CPU per request: "
            f"{front_us:.0f} µs front end" + (f", {workers_us:.0f} µs workers" if workers else "")
        )
    return result


async def timed_call(client: ValrunClient, val: str) -> float:
    """Milliseconds from sending a request to its whole answer, as a client sees it."""
    started = time.perf_counter()
    answer = await client.call(USER, val)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if answer.status != 200:
        raise MeasureError(f"{USER}/{val} answered {answer.status}: {answer.body[:300]!r}")
    return elapsed_ms


async def measure_cold(client: ValrunClient, prefix: str, options: Options) -> list[ColdPair]:
    names = [f"{prefix}{i}" for i in range(options.cold_vals)]
    for name in names:
        await client.put_val(USER, name, HELLO.format(name=name))
    pairs = []
    for name in names:
        # A pause before each request, as real traffic has: a pool that prepares workers
        # ahead of demand gets the time it would have, and the warm request is timed after
        # any work the cold one left behind (a refill), not during it.
        await trio.sleep(options.cold_gap_s)
        cold = await timed_call(client, name)
        await trio.sleep(options.cold_gap_s)
        warm = await timed_call(client, name)
        pairs.append(ColdPair(cold, warm))
    return pairs


def sandbox_pss_kib(valrun: Server) -> int:
    parents, cmdlines = read_process_table()
    pids = sandbox_processes(valrun.process.pid, parents, cmdlines)
    return sum(read_memory(pid).get("Pss", 0) for pid in pids)


def measure_memory(valrun: Server, before_kib: int, warmed: int) -> Memory:
    parents, cmdlines = read_process_table()
    workers = pick_workers(valrun.process.pid, parents, cmdlines)
    if not workers:
        raise MeasureError(f"no sandbox worker process under valrun (pid {valrun.process.pid})")
    memory = [m for m in (read_memory(pid) for pid in workers) if "Pss" in m]
    after_kib = sandbox_pss_kib(valrun)
    return Memory(
        workers=len(memory),
        pss_kib=[m["Pss"] for m in memory],
        private_kib=[m.get("Private_Clean", 0) + m.get("Private_Dirty", 0) for m in memory],
        marginal_kib=(after_kib - before_kib) / warmed if warmed else math.nan,
    )


async def measure_many(target: Target, token: str, options: Options) -> Many:
    names = [f"many{i:04d}" for i in range(options.many_vals)]
    clients = [
        ValrunClient(target, API_HOST, WEB_DOMAIN, token) for _ in range(options.many_concurrency)
    ]
    try:
        started = time.perf_counter()
        queue = iter(names)
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(_save_all, client, queue)
        save_s = time.perf_counter() - started

        calls = itertools.count()
        total = len(names) * options.many_passes
        latencies: list[float] = []
        errors: Counter[str] = Counter()

        async def call_round_robin(client: ValrunClient) -> None:
            while (i := next(calls)) < total:
                name = names[i % len(names)]
                begun = time.perf_counter()
                try:
                    with trio.fail_after(30):
                        answer = await client.call(USER, name)
                except HttpError:
                    errors["no answer"] += 1
                    continue
                except trio.TooSlowError:
                    errors["timeout"] += 1
                    continue
                latencies.append((time.perf_counter() - begun) * 1000)
                if answer.status != 200:
                    errors[str(answer.status)] += 1
                elif answer.body != name.encode():
                    errors["wrong body"] += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(call_round_robin, client)
        call_s = time.perf_counter() - started
    finally:
        for client in clients:
            await client.aclose()
    return Many(
        vals=len(names),
        calls=total,
        save_s=save_s,
        call_s=call_s,
        errors=dict(errors),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        max_ms=max(latencies, default=math.nan),
    )


async def _save_all(client: ValrunClient, names: Iterator[str]) -> None:
    for name in names:  # the clients share the iterator: each name is saved once
        path = f"/v1/vals/{USER}/{name}"
        code = {"code": NAMED.format(name=name)}
        # A user may have only a few saves checked at once (runtime.savecheck): a 503 is
        # "not now", and the save is tried again a moment later.
        for _attempt in range(500):
            answer = await client.api("PUT", path, code)
            if answer.status != 503:
                break
            await trio.sleep(0.02)
        if answer.status not in (200, 201):
            raise MeasureError(
                f"saving {USER}/{name} answered {answer.status}: {answer.body[:300]!r}"
            )


async def measure_neighbour(
    valrun: Server, target: Target, token: str, options: Options
) -> Neighbour:
    result = Neighbour()
    host = f"{USER}-hello.{WEB_DOMAIN}:{valrun.port}"
    c = options.neighbour_connections
    spin_answers: Counter[str] = Counter()

    async def measure(runs: list[WrkResult], label: str) -> None:
        run = await run_wrk(valrun.port, host, c, options.duration_s)
        runs.append(run)
        say(f"  {label:25} c={c}: p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms")

    await run_wrk(valrun.port, host, c, 1)  # warm up
    # ABBA again, with one spinner for both middle runs.
    await measure(result.alone, "alone")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_spin, target, token, stop, spin_answers)
        await trio.sleep(0.5)  # the spinner's worker is up and spinning
        for _ in range(2):
            await measure(result.spinning, "beside a spinning val")
        # The spinner stops asking; its request in flight ends at the wall-time limit, so the
        # last "alone" run has no spinning neighbour left.
        stop.set()
    await measure(result.alone, "alone")
    result.spin_answers = dict(spin_answers)
    return result


async def _spin(target: Target, token: str, stop: trio.Event, answers: Counter[str]) -> None:
    client = ValrunClient(target, API_HOST, WEB_DOMAIN, token)
    try:
        while not stop.is_set():
            try:
                with trio.fail_after(60):
                    answers[str((await client.call(USER, "spin")).status)] += 1
            except (HttpError, trio.TooSlowError) as exc:
                answers[type(exc).__name__] += 1
    finally:
        await client.aclose()


# --- one run -------------------------------------------------------------------------------------


def valrun_config(port: int, db: Path, options: Options) -> str:
    return (
        # One front-end process, like the bare app it is compared with (--processes).
        f'[server]\nbind = ["127.0.0.1:{port}"]\nprocesses = {options.processes}\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
        # A spinning val is stopped at this limit; shorter than the default 10 s so the
        # noisy-neighbour phase ends sooner.
        f"[limits]\nwall_time_s = {options.wall_time_s}\n"
        + ONE_USER_POOL
        # One user saves every val of every round (hello, spin, the cold ones, the many
        # ones): more than the default quota of 1,000 vals per user.
        + f"[quotas]\nmax_vals = {max_vals(options)}\n"
    )


def max_vals(options: Options) -> int:
    """Room for every val a run of the bench saves, with the user's quota left alone else."""
    return max(1000, 2 + options.rounds * options.cold_vals + options.many_vals + 100)


async def attempt(report: Report, section: str, measure: Callable[[], Awaitable[None]]) -> None:
    """Run one section; a failure is recorded, and the bench goes on with the next one."""
    say(section)
    try:
        await measure()
    # ExceptionGroup: from a section's own nursery of clients.
    except (MeasureError, HttpError, trio.TooSlowError, OSError, ExceptionGroup) as exc:
        report.failures.append(f"{section}: {exc!r}")
        say(f"  could not measure: {exc}")


async def run_bench(options: Options, workdir: Path) -> Report:
    report = Report(options)
    valrun_bin = Path(sys.executable).with_name("valrun")
    db = workdir / "valrun.db"
    config = workdir / "valrun.toml"
    config.write_text(valrun_config(0, db, options))
    try:
        token = await create_user(config, USER)
    except SetupError as exc:
        report.failures.append(str(exc))
        return report

    for round_index in range(options.rounds):
        say(f"round {round_index + 1} of {options.rounds}")
        first, last = round_index == 0, round_index == options.rounds - 1
        port = free_port()
        config.write_text(valrun_config(port, db, options))
        command = [str(valrun_bin), "--config", str(config), "serve"]
        try:
            async with open_server("valrun", command, port, workdir / "valrun.log") as valrun:
                target = Target("127.0.0.1", port)
                client = ValrunClient(target, API_HOST, WEB_DOMAIN, token)
                try:
                    await _one_round(report, valrun, client, token, round_index, first, last)
                finally:
                    await client.aclose()
        except (MeasureError, HttpError, OSError) as exc:
            report.failures.append(f"round {round_index + 1}: {exc}")
            say(f"  round {round_index + 1} failed: {exc}")
    return report


async def _one_round(
    report: Report,
    valrun: Server,
    client: ValrunClient,
    token: str,
    round_index: int,
    first: bool,
    last: bool,
) -> None:
    options = report.options
    if first:
        await client.put_val(USER, "hello", HELLO.format(name="hello"))
        await client.put_val(USER, "spin", SPIN)
    await timed_call(client, "hello")
    host = f"{USER}-hello.{WEB_DOMAIN}:{valrun.port}"

    async def throughput() -> None:
        port = free_port()
        command = [sys.executable, str(HELLO_APP), "--bind", f"127.0.0.1:{port}"]
        log = valrun.log.with_name("bare.log")
        async with open_server("bare", command, port, log) as bare:
            c = options.connections
            report.throughput.append(await measure_throughput(bare, valrun, host, options, c))
            if options.wide_connections:
                wide = await measure_throughput(
                    bare, valrun, host, options, options.wide_connections
                )
                report.throughput_wide.append(wide)

    wide = f", then c={options.wide_connections}" if options.wide_connections else ""
    await attempt(report, f"throughput, bare vs valrun (c={options.connections}{wide})", throughput)

    before_kib = sandbox_pss_kib(valrun) if first else 0

    async def cold() -> None:
        pairs = await measure_cold(client, f"cold{round_index}_", options)
        report.cold.extend(pairs)
        diffs = [p.cold_ms - p.warm_ms for p in pairs]
        say(
            f"  cold - warm: p50 {percentile(diffs, 50):.1f} ms, "
            f"p99 {percentile(diffs, 99):.1f} ms over {len(pairs)} vals"
        )

    await attempt(report, f"cold vs warm first request ({options.cold_vals} new vals)", cold)

    if first:

        async def memory() -> None:
            await trio.sleep(1)  # idle
            report.memory = measure_memory(valrun, before_kib, options.cold_vals)
            pss = median(report.memory.pss_kib) / 1024
            say(f"  median PSS {pss:.2f} MiB over {report.memory.workers} worker processes")

        await attempt(report, "memory of idle warm workers", memory)

    async def neighbour() -> None:
        target = Target("127.0.0.1", valrun.port)
        report.neighbour.append(await measure_neighbour(valrun, target, token, options))

    await attempt(report, "noisy neighbour (a val spinning on CPU)", neighbour)

    if last:

        async def many() -> None:
            target = Target("127.0.0.1", valrun.port)
            report.many = await measure_many(target, token, options)
            say(
                f"  {report.many.calls} calls: errors {report.many.errors or 0}, "
                f"p99 {report.many.p99_ms:.1f} ms"
            )

        await attempt(report, f"{options.many_vals} vals round-robin", many)


# --- the table -----------------------------------------------------------------------------------


def checks(report: Report) -> list[Check]:
    found = []
    o = report.options
    for c, rounds in (
        (o.connections, report.throughput),
        (o.wide_connections, report.throughput_wide),
    ):
        if rounds:
            ratios = [r.throughput_ratio for r in rounds]
            p99s = [r.p99_ratio for r in rounds]
            found.append(
                Check(f"warm throughput, valrun / bare, c={c}", median(ratios), 0.9, True, "x")
            )
            found.append(Check(f"p99, valrun / bare, c={c}", median(p99s), 1.5, False, "x"))
    if report.cold:
        diffs = [p.cold_ms - p.warm_ms for p in report.cold]
        found.append(Check("cold - warm first request, p50", percentile(diffs, 50), 3, False, "ms"))
        found.append(
            Check("cold - warm first request, p99", percentile(diffs, 99), 10, False, "ms")
        )
    if report.memory:
        pss = median(report.memory.pss_kib) / 1024
        found.append(Check("idle warm worker PSS (median)", pss, 3, False, "MiB"))
    if report.many:
        errors = sum(report.many.errors.values())
        found.append(Check(f"{report.many.vals:,} vals round-robin: errors", errors, 0, False, ""))
    if report.neighbour:
        increase = median([n.p99_increase_percent for n in report.neighbour])
        found.append(Check("p99 rise beside a spinning val", increase, 25, False, "%"))
    return found


def table(report: Report) -> str:
    o = report.options
    rows = [
        "| measure | value | target | result | margin |",
        "|---|--:|--:|---|--:|",
    ]

    def info(name: str, value: str) -> None:
        rows.append(f"| {name} | {value} | | | |")

    for c, runs in (
        (o.connections, report.throughput),
        (o.wide_connections, report.throughput_wide),
    ):
        for side in ("bare", "valrun"):
            if runs:
                rps = median([r.median(side, "requests_per_s") for r in runs])
                p50 = median([r.median(side, "p50_ms") for r in runs])
                p99 = median([r.median(side, "p99_ms") for r in runs])
                label = "bare hypercorn-trio hello" if side == "bare" else "valrun hello val"
                info(
                    f"{label}, c={c}: req/s · p50 · p99",
                    f"{rps:,.0f} · {p50:.1f} ms · {p99:.1f} ms",
                )
    if report.throughput:
        cpu = {
            key: median([median(r.cpu_us.get(key, [])) for r in report.throughput])
            for key in ("bare", "valrun", "workers")
        }
        info(
            "CPU per request: bare · valrun front end · its workers",
            f"{cpu['bare']:.0f} · {cpu['valrun']:.0f} · {cpu['workers']:.0f} µs",
        )
    if report.cold:
        cold = [p.cold_ms for p in report.cold]
        warm = [p.warm_ms for p in report.cold]
        info(
            f"first request p50 · p99 ({len(cold)} new vals)",
            f"{percentile(cold, 50):.1f} · {percentile(cold, 99):.1f} ms",
        )
        info(
            "second request p50 · p99",
            f"{percentile(warm, 50):.1f} · {percentile(warm, 99):.1f} ms",
        )
    if report.memory:
        mem = report.memory
        info(
            f"worker private memory (median of {mem.workers}) · PSS per added warm val",
            f"{median(mem.private_kib) / 1024:.2f} MiB · {mem.marginal_kib / 1024:.2f} MiB",
        )
    if report.many:
        m = report.many
        info(
            f"{m.vals:,} vals: save · {m.calls:,} calls at c={o.many_concurrency}",
            f"{m.save_s:.1f} s · {m.call_s:.1f} s ({m.calls / m.call_s:,.0f} req/s)",
        )
        info(
            f"{m.vals:,} vals: p50 · p99 · max",
            f"{m.p50_ms:.1f} · {m.p99_ms:.1f} · {m.max_ms:.0f} ms",
        )
    if report.neighbour:
        alone = median([median([r.p99_ms for r in n.alone]) for n in report.neighbour])
        spinning = median([median([r.p99_ms for r in n.spinning]) for n in report.neighbour])
        answers: Counter[str] = Counter()
        for n in report.neighbour:
            answers.update(n.spin_answers)
        stopped = ", ".join(f"{status}: {count}" for status, count in sorted(answers.items()))
        info(
            f"hello val p99 at c={o.neighbour_connections}: alone · beside a spinner "
            f"(the spinner's answers: {stopped})",
            f"{alone:.1f} · {spinning:.1f} ms",
        )
    for check in checks(report):
        limit = ("≥ " if check.at_least else "≤ ") + fmt(check.limit, check.unit).lstrip("+")
        margin = fmt(check.margin, "pp" if check.unit == "%" else check.unit, signed=True)
        rows.append(
            f"| **{check.name}** | {fmt(check.value, check.unit)} | {limit} | "
            f"{'PASS' if check.passed else 'MISS'} | {margin} |"
        )
    return "\n".join(rows)


def rounds_table(report: Report) -> str:
    rows = [
        "| round | bare req/s | valrun req/s | ratio | bare p99 | valrun p99 | p99 ratio |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for i, r in enumerate(report.throughput, 1):
        rows.append(
            f"| {i} | {r.median('bare', 'requests_per_s'):,.0f} | "
            f"{r.median('valrun', 'requests_per_s'):,.0f} | {r.throughput_ratio:.2f} | "
            f"{r.median('bare', 'p99_ms'):.1f} ms | {r.median('valrun', 'p99_ms'):.1f} ms | "
            f"{r.p99_ratio:.2f} |"
        )
    return "\n".join(rows)


# --- the command ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="server starts to take medians over (default: 3)")
    add("--duration", type=int, default=5, help="seconds per wrk run (default: 5)")
    add("--connections", type=int, default=16, help="wrk connections (default: 16)")
    add(
        "--wide-connections",
        type=int,
        default=64,
        help="throughput again at this many connections; 0: not (default: 64)",
    )
    add("--cold-vals", type=int, default=30, help="new vals per round (default: 30)")
    add("--cold-gap-ms", type=float, default=100, help="pause before each call (default: 100)")
    add("--many-vals", type=int, default=1000, help="distinct vals (default: 1000)")
    add("--many-passes", type=int, default=1, help="round-robin passes (default: 1)")
    add("--many-concurrency", type=int, default=8, help="clients (default: 8)")
    add("--neighbour-connections", type=int, default=4, help="wrk connections (default: 4)")
    add("--wall-time", type=float, default=5.0, help="valrun's limits.wall_time_s (default: 5)")
    add(
        "--processes",
        type=int,
        default=1,
        help="valrun's server.processes; the bare app runs one (default: 1)",
    )
    add("--quick", action="store_true", help="one round, 2 s runs, 15 new vals: a smoke test")
    add("--json", dest="json_out", help="also write the results here")
    add("--keep", action="store_true", help="keep the temporary directory (database, logs)")
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.cold_vals = 1, 2, 15
    positive = ("rounds", "duration", "connections", "cold_vals", "many_vals", "many_passes")
    for name in (*positive, "processes", "many_concurrency", "neighbour_connections", "wall_time"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be positive")
    if args.wide_connections < 0:
        raise SystemExit("bench: --wide-connections must be 0 or positive")
    return Options(
        rounds=args.rounds,
        duration_s=args.duration,
        connections=args.connections,
        wide_connections=args.wide_connections,
        cold_vals=args.cold_vals,
        cold_gap_s=args.cold_gap_ms / 1000,
        many_vals=args.many_vals,
        many_passes=args.many_passes,
        many_concurrency=args.many_concurrency,
        neighbour_connections=args.neighbour_connections,
        wall_time_s=args.wall_time,
        processes=args.processes,
        json_out=Path(args.json_out) if args.json_out else None,
        keep=args.keep,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (scripts/bench installs Debian's)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="valrun-bench-"))
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        report = trio.run(run_bench, options, workdir)
    finally:
        if options.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    took_s, load_after = time.monotonic() - started, os.getloadavg()[0]
    print(
        f"\n## valrun bench ({took_s:.0f} s, {os.cpu_count()} cores, load average "
        f"{load_before:.1f} before, {load_after:.1f} after)\n"
    )
    if load_before > 0.5:
        # The bench's own load shows in the second number; the first is everyone else's.
        print("Another program was busy when the bench began: compare runs with care.\n")
    if report.throughput:
        print(rounds_table(report) + "\n")
    print(table(report))
    if report.failures:
        print("\nnot measured:")
        for failure in report.failures:
            print(f"- {failure}")
    if options.json_out is not None:
        data = asdict(report)
        data["checks"] = [
            asdict(c) | {"passed": c.passed, "margin": c.margin} for c in checks(report)
        ]
        options.json_out.parent.mkdir(parents=True, exist_ok=True)
        options.json_out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
