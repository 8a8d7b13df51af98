"""Measure what `std.fetch` adds: a fetch through valrun against the same request made directly
with the same client, and the front end's CPU per fetch.

    scripts/bench_fetch [--rounds 3] [--fetches 1000] [--json FILE]

Everything runs here, on 127.0.0.1. Each round starts afresh a target server (the bare
hypercorn-trio app of scripts/hello_app.py) and a valrun (`valrun --config TMP serve`, with
`[fetch] allow_networks = ["127.0.0.1/32"]`), then, one request at a time:

- direct: this process's httpx.AsyncClient (trust_env=False, keep-alive) GETs the target
  `--fetches` times; each request is timed around `client.get`;
- through valrun: a val, called once through the Run API, fetches the same URL `--fetches`
  times; each fetch is timed inside the val around `fetch(url)` (worker -> front end -> the
  same httpx client -> target, and back);
- direct again (the baseline is the mean of the two direct runs' percentiles, so a drift of
  the machine during the round falls on both sides).

The ratios (valrun / direct, p50 and p99) are computed within each round; the table shows the
medians over the rounds. Front-end CPU per fetch is valrun's own process CPU (utime + stime
from /proc; workers are other processes) during the fetching call, minus that of a call of a
val that does the same without fetching, divided by the fetches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import trio
from bench import MeasureError, cpu_seconds, free_port, open_server, say
from loadlib import HttpError, SetupError, Target, ValrunClient, create_user, percentile

SCRIPTS = Path(__file__).resolve().parent
USER = "bench"
API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"

FETCHER = """\
import time
from std import fetch

def fetcher(url, n):
    took = []
    for _ in range(n):
        started = time.perf_counter()
        fetch(url)
        took.append(time.perf_counter() - started)
    return took
"""
# The same invocation, and the same loop, without the fetch: the baseline for the CPU count.
CONTROL = """\
import time

def control(url, n):
    took = []
    for _ in range(n):
        started = time.perf_counter()
        took.append(time.perf_counter() - started)
    return took
"""


@dataclass
class Round:
    direct_ms: dict[str, float]
    valrun_ms: dict[str, float]
    ratio: dict[str, float]
    front_end_cpu_us_per_fetch: float
    client_cpu_us_per_request: float


@dataclass
class Report:
    fetches: int
    rounds: list[Round] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, pick: str, key: str | None = None) -> float:
        values: list[float] = []
        for one in self.rounds:
            value = getattr(one, pick)
            values.append(float(value[key] if key else value))
        return statistics.median(values)


def summary(latencies_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in latencies_s]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99)}


async def direct(url: str, n: int) -> tuple[list[float], float]:
    """Latencies of n sequential GETs with one httpx client, and its CPU per request (s)."""
    took = []
    async with httpx.AsyncClient(trust_env=False) as client:
        await client.get(url)  # the connection, once
        cpu = time.process_time()
        for _ in range(n):
            started = time.perf_counter()
            response = await client.get(url)
            took.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise MeasureError(f"the target answered {response.status_code}")
        return took, (time.process_time() - cpu) / n


async def run_val(client: ValrunClient, val: str, url: str, n: int) -> list[float]:
    answer = await client.api("POST", f"/v1/run/{USER}.{val}", [url, n])
    if answer.status != 200:
        raise MeasureError(f"{val} answered {answer.status}: {answer.body[:300]!r}")
    took: list[float] = json.loads(answer.body)
    return took


def valrun_config(port: int, db: Path, fetches: int) -> str:
    return (
        f'[server]\nbind = ["127.0.0.1:{port}"]\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
        "[limits]\nwall_time_s = 120\n"
        '[fetch]\nallow_networks = ["127.0.0.1/32"]\n'
        f"max_requests_per_invocation = {fetches + 100}\n"
    )


async def one_round(workdir: Path, db: Path, token: str, fetches: int) -> Round:
    valrun_bin = Path(sys.executable).with_name("valrun")
    target_port, port = free_port(), free_port()
    config = workdir / "valrun.toml"
    config.write_text(valrun_config(port, db, fetches))
    hello = [sys.executable, str(SCRIPTS / "hello_app.py"), "--bind", f"127.0.0.1:{target_port}"]
    serve = [str(valrun_bin), "--config", str(config), "serve"]
    url = f"http://127.0.0.1:{target_port}/"
    async with (
        open_server("target", hello, target_port, workdir / "target.log"),
        open_server("valrun", serve, port, workdir / "valrun.log") as valrun,
    ):
        client = ValrunClient(Target("127.0.0.1", port), API_HOST, WEB_DOMAIN, token)
        try:
            await client.put_val(USER, "fetcher", FETCHER)
            await client.put_val(USER, "control", CONTROL)
            await run_val(client, "fetcher", url, 50)  # warm: worker, pooled connection
            await run_val(client, "control", url, 50)
            first, client_cpu_1 = await direct(url, fetches)
            cpu_0 = cpu_seconds([valrun.process.pid])
            through = await run_val(client, "fetcher", url, fetches)
            cpu_1 = cpu_seconds([valrun.process.pid])
            await run_val(client, "control", url, fetches)
            cpu_2 = cpu_seconds([valrun.process.pid])
            second, client_cpu_2 = await direct(url, fetches)
        finally:
            await client.aclose()
    direct_1, direct_2 = summary(first), summary(second)
    baseline = {key: (direct_1[key] + direct_2[key]) / 2 for key in direct_1}
    measured = summary(through)
    return Round(
        direct_ms=baseline,
        valrun_ms=measured,
        ratio={key: measured[key] / baseline[key] for key in baseline},
        front_end_cpu_us_per_fetch=((cpu_1 - cpu_0) - (cpu_2 - cpu_1)) / fetches * 1e6,
        client_cpu_us_per_request=(client_cpu_1 + client_cpu_2) / 2 * 1e6,
    )


async def run(options: argparse.Namespace) -> Report:
    report = Report(options.fetches)
    with tempfile.TemporaryDirectory(prefix="valrun-bench-fetch-") as tmp:
        workdir = Path(tmp)
        db = workdir / "valrun.db"
        config = workdir / "valrun.toml"
        config.write_text(valrun_config(0, db, options.fetches))
        try:
            token = await create_user(config, USER)
        except SetupError as exc:
            report.failures.append(str(exc))
            return report
        for index in range(options.rounds):
            say(f"fetch round {index + 1} of {options.rounds}")
            try:
                report.rounds.append(await one_round(workdir, db, token, options.fetches))
            except (MeasureError, HttpError, OSError) as exc:
                report.failures.append(f"round {index + 1}: {exc}")
                say(f"  round {index + 1} failed: {exc}")
    return report


def table(report: Report) -> str:
    if not report.rounds:
        return "nothing measured"
    rows = [
        f"fetch latency, {report.fetches} sequential GETs per side, median of "
        f"{len(report.rounds)} rounds",
        f"  {'':24} {'direct (httpx)':>15} {'through valrun':>15} {'ratio':>7}",
    ]
    for key in ("p50", "p99"):
        rows.append(
            f"  {key:24} {report.median('direct_ms', key):>12.3f} ms "
            f"{report.median('valrun_ms', key):>12.3f} ms {report.median('ratio', key):>6.2f}x"
        )
    rows += [
        f"  front-end CPU per fetch  {report.median('front_end_cpu_us_per_fetch'):>12.0f} us",
        f"  (httpx client's own CPU per direct request: "
        f"{report.median('client_cpu_us_per_request'):.0f} us)",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fetches", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the report here")
    options = parser.parse_args(argv)
    if options.rounds < 1 or options.fetches < 10:
        parser.error("--rounds must be at least 1 and --fetches at least 10")
    report = trio.run(run, options)
    print(table(report))
    for failure in report.failures:
        print(f"FAILED: {failure}")
    if options.json:
        options.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.failures or not report.rounds else 0


if __name__ == "__main__":
    sys.exit(main())
