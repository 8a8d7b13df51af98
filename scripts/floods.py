"""Floods: a victim's warm latency alone, and while another tenant floods the service.

    scripts/floods [--seconds 6] [--only NAME ...]

Starts a real valrun (`valrun --config TMP serve` over a temporary SQLite, on 127.0.0.1, the
default limits but for the few the floods need: `[schedule] min_interval_s = 1`, and
`[fetch] allow_networks` for a slow HTTP server this script runs on 127.0.0.1), with two
users, `victim` and `flood`. The victim calls a warm val over one keep-alive connection, paced
at 100 requests a second, for `--seconds`: alone, then during a flood (after its first
second), for each flood in turn. Each flood is one user's attack from the
issue's list (docs/fairness.md §5):

    abandoned     clients that send a request to a 5 s val and close the socket 0.2 s later
    spinning      64 clients holding requests to a val that spins until its wall time
    evals         64 clients sending Evals that sleep 2 s
    cycling       8 clients cycling through 70 vals (more than the pool keeps warm)
    load_spin     8 clients cycling through 20 vals whose module spins 3 s while loading
    memory        8 clients cycling through 24 vals that each keep 150 MiB
    scheduled     50 vals scheduled every second, each spinning 1 s
    fetch         32 clients on a val whose fetch waits 5 s on a slow server
    storage       16 clients on a val whose SQL counts to three million (2 s timeout)

For each: the victim's p50 and p99 (ms), p99 over p99 alone (the goal: at most 2), the
victim's errors (the goal: none), the front end's CPU seconds per second meanwhile (`fe cpu`,
all its processes together; 1.00 is one core), and what the flood's requests got. The
victim alone is measured right before each flood, for as long (the machine's other load
changes by the minute), and the ratio is to that. The victim's val for the storage flood
makes a storage call itself (`SELECT 1`). Exits 0 when every flood met both goals, 1
otherwise.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from bench import MeasureError, cpu_seconds, free_port, open_server
from loadlib import HttpError, Target, ValrunClient, create_user, percentile

API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"
PACE_S = 0.01  # the victim's pace: 100 requests a second
SLOW_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"

HELLO = "def hello(req):\n    return 'hi'\n"
STORED = "from std import sqlite\n\ndef stored(req):\n    return sqlite.execute('SELECT 1').rows\n"
SLEEPY = "import time\n\ndef sleepy(req):\n    time.sleep(5)\n    return 'slept'\n"
SPIN = "def spin(req):\n    n = 0\n    while True:\n        n += 1\n"
EVAL = "import time\ntime.sleep(2)\n1"
NAMED = "def {name}(req):\n    return {name!r}\n"
LOAD_SPIN = (
    "import time\n"
    "end = time.monotonic() + 3\n"
    "while time.monotonic() < end:\n"
    "    pass\n\n"
    "def {name}(req):\n"
    "    return 'loaded'\n"
)
HOG = "kept = b'x' * (150 * 1024 * 1024)\n\ndef {name}(req):\n    return str(len(kept))\n"
TICK = (
    "import time\n\n"
    "def {name}(interval):\n"
    "    end = time.monotonic() + 1\n"
    "    while time.monotonic() < end:\n"
    "        pass\n"
)
FETCHER = (
    "from std import fetch\n\n"
    "def fetcher(req):\n"
    "    return fetch('http://127.0.0.1:{port}/', timeout_s=8).text()\n"
)
SQL_COUNT = (
    "from std import sqlite\n\n"
    "def counting(req):\n"
    "    return sqlite.execute('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
    "FROM c WHERE x < 3000000) SELECT count(*) FROM c').rows\n"
)


@dataclass
class Run:
    """One measurement of the victim, and what the flood's requests got meanwhile."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    flood: Counter[str] = field(default_factory=Counter)
    #: The first body the flood got with each 5xx status, to say what it was.
    samples: dict[str, bytes] = field(default_factory=dict)
    #: CPU seconds per second the front end process used while the victim was measured.
    front_end_cpu: float = 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


@dataclass
class Service:
    pid: int  # the front end's
    target: Target
    victim: ValrunClient
    flood: ValrunClient
    flood_token: str
    slow_port: int

    def client(self, token: str | None = None) -> ValrunClient:
        return ValrunClient(self.target, API_HOST, WEB_DOMAIN, token)


def front_end_pids(pid: int) -> list[int]:
    """The valrun process and its children: with `[server] processes` over 1 (the default
    on a machine of more than one core), the front ends are its children (their own
    children, the fork servers and workers, are not the front end)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            pids.append(int(entry.name))
    return pids


async def measure_victim(service: Service, val: str, seconds: float, run: Run) -> None:
    client = service.client()
    front_ends = front_end_pids(service.pid)
    cpu_before = cpu_seconds(front_ends)
    try:
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            slot = trio.current_time() + PACE_S
            started = time.perf_counter()
            try:
                answer = await client.call("victim", val)
            except HttpError as exc:
                run.errors[f"no answer: {exc}"] += 1
            else:
                if answer.status == 200:
                    run.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    run.errors[str(answer.status)] += 1
            await trio.sleep_until(slot)
        run.front_end_cpu = (cpu_seconds(front_ends) - cpu_before) / seconds
    finally:
        await client.aclose()


# --- the floods: each loops until cancelled, counting what its requests got ---------------------


async def loop_web(service: Service, run: Run, vals: list[str], clients: int) -> None:
    async def one(offset: int) -> None:
        client = service.client()
        try:
            for n in range(offset, 10**9):
                try:
                    answer = await client.call("flood", vals[n % len(vals)])
                    run.flood[str(answer.status)] += 1
                    if answer.status >= 500:
                        run.samples.setdefault(str(answer.status), answer.body[:300])
                except HttpError:
                    run.flood["no answer"] += 1
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for offset in range(clients):
            nursery.start_soon(one, offset)


async def abandon(service: Service, run: Run) -> None:
    host = service.victim.web_host("flood", "sleepy")
    request = f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()

    async def one() -> None:
        while True:
            stream = await trio.open_tcp_stream(service.target.host, service.target.port)
            await stream.send_all(request)
            await trio.sleep(0.2)
            await stream.aclose()
            run.flood["abandoned"] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(32):
            nursery.start_soon(one)


async def evals(service: Service, run: Run) -> None:
    async def one() -> None:
        client = service.client(service.flood_token)
        try:
            while True:
                try:
                    answer = await client.api("POST", "/v1/eval", {"code": EVAL})
                    run.flood[str(answer.status)] += 1
                except HttpError:
                    run.flood["no answer"] += 1
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(one)


async def idle(_service: Service, _run: Run) -> None:
    await trio.sleep_forever()  # the scheduler floods by itself


@dataclass(frozen=True)
class Flood:
    name: str
    vals: dict[str, str]  # the flood's vals: name -> code
    attack: Callable[[Service, Run], Awaitable[None]]
    victim_val: str = "hello"
    schedules: bool = False


def named(prefix: str, count: int, template: str) -> dict[str, str]:
    return {f"{prefix}{i}": template.format(name=f"{prefix}{i}") for i in range(count)}


def web(vals: dict[str, str], clients: int) -> Callable[[Service, Run], Awaitable[None]]:
    return lambda service, run: loop_web(service, run, list(vals), clients)


def floods(slow_port: int) -> list[Flood]:
    cycling = named("cyc", 70, NAMED)
    load_spin = named("load", 20, LOAD_SPIN)
    hogs = named("hog", 24, HOG)
    fetcher = {"fetcher": FETCHER.format(port=slow_port)}
    return [
        Flood("abandoned", {"sleepy": SLEEPY}, abandon),
        Flood("spinning", {"spin": SPIN}, web({"spin": SPIN}, 64)),
        Flood("evals", {}, evals),
        Flood("cycling", cycling, web(cycling, 8)),
        Flood("load_spin", load_spin, web(load_spin, 8)),
        Flood("memory", hogs, web(hogs, 8)),
        Flood("scheduled", named("tick", 50, TICK), idle, schedules=True),
        Flood("fetch", fetcher, web(fetcher, 32)),
        Flood("storage", {"counting": SQL_COUNT}, web({"counting": SQL_COUNT}, 16), "stored"),
    ]


# --- one run ----------------------------------------------------------------------------------


def config_text(port: int, db: Path) -> str:
    return (
        f'[server]\nbind = ["127.0.0.1:{port}"]\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
        "[schedule]\nmin_interval_s = 1\n"
        '[fetch]\nallow_networks = ["127.0.0.0/8"]\n'
    )


async def serve_slowly(stream: trio.SocketStream) -> None:
    """The slow server a fetch flood waits on: 5 s, then a small answer."""
    try:
        await stream.receive_some(65536)
        await trio.sleep(5)
        await stream.send_all(SLOW_ANSWER)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def settle(service: Service) -> None:
    """Until no worker is busy (the flood's requests have ended), at most 20 s."""
    started = trio.current_time()
    with trio.move_on_after(20):
        while True:
            answer = await service.flood.api("GET", "/metrics")
            busy = [
                line
                for line in answer.body.decode().splitlines()
                if line.startswith('valrun_workers{state="busy"}')
            ]
            if busy and float(busy[0].split()[1]) == 0:
                say(f"  settled after {trio.current_time() - started:.1f} s")
                return
            await trio.sleep(0.2)
    say("  still busy workers after 20 s")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def run_flood(service: Service, flood: Flood, seconds: float) -> Run:
    run = Run()
    for name, code in flood.vals.items():
        await service.flood.put_val("flood", name, code)
    if flood.schedules:
        for name in flood.vals:
            path = f"/v1/vals/flood/{name}/schedule"
            answer = await service.flood.api("PUT", path, {"every_s": 1})
            if answer.status not in (200, 201):
                raise MeasureError(f"PUT {path} answered {answer.status}: {answer.body[:200]!r}")
    # The flood runs in a process of its own: its clients must not slow the victim's.
    command = [
        sys.executable,
        __file__,
        "--attack",
        flood.name,
        f"--port={service.target.port}",
        f"--token={service.flood_token}",
        f"--slow-port={service.slow_port}",
        f"--seconds={seconds + 1.5}",
    ]
    got: dict[str, dict[str, object]] = {}

    async def attack() -> None:
        done = await trio.run_process(command, capture_stdout=True, check=True)
        got.update(json.loads(done.stdout))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack)
        await trio.sleep(1)
        await measure_victim(service, flood.victim_val, seconds, run)
    run.flood.update({status: int(str(count)) for status, count in got["flood"].items()})
    run.samples = {status: str(body).encode() for status, body in got["samples"].items()}
    if flood.schedules:
        for name in flood.vals:
            await service.flood.api("DELETE", f"/v1/vals/flood/{name}/schedule")
    await settle(service)
    return run


async def attack_alone(name: str, port: int, token: str, slow_port: int, seconds: float) -> None:
    """The flood `name` for `seconds`, in this process; what it got, as JSON on stdout."""
    target = Target("127.0.0.1", port)
    service = Service(
        0,
        target,
        ValrunClient(target, API_HOST, WEB_DOMAIN),
        ValrunClient(target, API_HOST, WEB_DOMAIN, token),
        token,
        slow_port,
    )
    (flood,) = [f for f in floods(slow_port) if f.name == name]
    run = Run()
    with trio.move_on_after(seconds):
        await flood.attack(service, run)
    samples = {status: body.decode(errors="replace") for status, body in run.samples.items()}
    print(json.dumps({"flood": dict(run.flood), "samples": samples}))


async def measure(seconds: float, only: list[str], workdir: Path) -> list[tuple[str, Run, Run]]:
    db = workdir / "valrun.db"
    config = workdir / "valrun.toml"
    port = free_port()
    config.write_text(config_text(port, db))
    victim_token = await create_user(config, "victim")
    flood_token = await create_user(config, "flood")
    valrun_bin = Path(sys.executable).with_name("valrun")
    command = [str(valrun_bin), "--config", str(config), "serve"]
    results: list[tuple[str, Run, Run]] = []
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, serve_slowly, 0, host="127.0.0.1")
        )
        slow_port = listeners[0].socket.getsockname()[1]
        async with open_server("valrun", command, port, workdir / "valrun.log") as valrun:
            target = Target("127.0.0.1", port)
            service = Service(
                valrun.process.pid,
                target,
                ValrunClient(target, API_HOST, WEB_DOMAIN, victim_token),
                ValrunClient(target, API_HOST, WEB_DOMAIN, flood_token),
                flood_token,
                slow_port,
            )
            await service.victim.put_val("victim", "hello", HELLO)
            await service.victim.put_val("victim", "stored", STORED)
            for val in ("hello", "stored"):
                await measure_victim(service, val, 1, Run())  # warm
            for flood in floods(slow_port):
                if only and flood.name not in only:
                    continue
                # The machine's other load changes by the minute: the baseline of each flood
                # is measured right before it.
                say(f"alone, then flood: {flood.name}")
                alone = Run()
                await measure_victim(service, flood.victim_val, seconds, alone)
                results.append((f"alone ({flood.victim_val})", alone, alone))
                run = await run_flood(service, flood, seconds)
                results.append((flood.name, run, alone))
            await service.victim.aclose()
            await service.flood.aclose()
        nursery.cancel_scope.cancel()
    return results


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def report(results: list[tuple[str, Run, Run]]) -> bool:
    print(
        f"{'flood':22} {'p50 ms':>8} {'p99 ms':>8} {'p99 x':>7} {'errors':>7} {'fe cpu':>6}"
        "  flood got"
    )
    ok = True
    for name, run, baseline in results:
        ratio = run.p(99) / baseline.p(99)
        errors = sum(run.errors.values())
        ok = ok and (ratio <= 2 or run is baseline) and not errors
        got = ", ".join(f"{k}: {v}" for k, v in sorted(run.flood.items()))
        print(
            f"{name:22} {run.p(50):8.2f} {run.p(99):8.2f} {ratio:7.2f} {errors:7d} "
            f"{run.front_end_cpu:6.2f}  {got}"
        )
        for error, count in run.errors.items():
            print(f"{'':22} victim error {error}: {count}")
        for status, body in run.samples.items():
            print(f"{'':22} the flood's first {status}: {body.decode(errors='replace')}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--only", nargs="*", default=[], help="flood names to run")
    # The flood's own process (run_flood starts it): --attack NAME and where to aim.
    parser.add_argument("--attack", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--slow-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        trio.run(attack_alone, args.attack, args.port, args.token, args.slow_port, args.seconds)
        return 0
    say(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="valrun-floods-") as workdir:
        results = trio.run(measure, args.seconds, args.only, Path(workdir))
    say(f"load average after: {load_average()}")
    return 0 if report(results) else 1


if __name__ == "__main__":
    sys.exit(main())
