"""Drive a running valrun with a mix of warm, cold, slow and failing requests for a bounded time.

    scripts/loadtest --url http://127.0.0.1:8080 --vals demo/hello,demo/counter \\
        --token vr_... --concurrency 16 --duration 30 --mix warm=80,cold=5,slow=5,failing=10

Each of `--concurrency` tasks sends one request at a time on its own keep-alive connection
(a closed loop: the load adapts to the server's speed). A request's kind is drawn from the mix:

- warm: GET one of `--vals` (USER/VAL, e.g. the demo vals of `scripts/serve`);
- cold: save a new version of the task's own val, then GET it (only the GET is timed): a
  worker that has never run this code;
- slow: GET the task's own val that sleeps `--slow-ms` (one per task, so they never queue
  behind each other);
- failing: GET a val that raises, answered 502 `val_error` (that 502 is expected, not an error).

cold, slow and failing need `--token` (or $VALRUN_TOKEN): the tool saves those vals under the
token's user before the run and deletes them after. Only loopback targets unless
`--allow-remote`: this tool is for the machine it runs on.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import sys
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio
from loadlib import HttpError, Target, ValrunClient, percentile

KINDS = ("warm", "cold", "slow", "failing")
#: The status each kind should answer; any other answer (or none) is an error.
EXPECTED_STATUS = {"warm": 200, "cold": 200, "slow": 200, "failing": 502}
#: Status stand-ins for requests that got no HTTP answer.
NO_ANSWER = {0: "connection error", -1: "timeout"}
DEFAULT_MIX_WITH_TOKEN = "warm=80,cold=5,slow=5,failing=10"
PREFIX = "lt"  # names of the vals this tool creates: lt_cold3, lt_slow3, lt_fail


class UsageError(Exception):
    """A command-line value that cannot work; the message says which and why."""


# --- pure parts: options, targets, statistics ---------------------------------------------


def check_target(url: str, allow_remote: bool = False) -> Target:
    """`http://HOST:PORT` -> Target; refuse anything but loopback unless `allow_remote`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise UsageError(f"--url {url!r}: only http:// is supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--url {url!r}: give the server's base URL, without a path")
    host = parts.hostname
    if not host:
        raise UsageError(f"--url {url!r} names no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"--url {url!r} has a malformed port") from None
    if not allow_remote and not is_loopback(host):
        raise UsageError(
            f"--url {url!r} is not a loopback address (127.0.0.0/8, ::1, localhost); "
            "load goes elsewhere only with --allow-remote"
        )
    return Target(host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it might resolve anywhere


def parse_mix(text: str) -> dict[str, int]:
    """`warm=80,cold=5` -> {"warm": 80, "cold": 5, "slow": 0, "failing": 0}."""
    mix = dict.fromkeys(KINDS, 0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, equals, weight = item.partition("=")
        kind = kind.strip()
        if kind not in mix:
            raise UsageError(f"--mix: unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        if not equals or not weight.strip().isdigit():
            raise UsageError(f"--mix: {item!r} needs a whole non-negative weight, as warm=80")
        mix[kind] = int(weight)
    if sum(mix.values()) <= 0:
        raise UsageError(f"--mix {text!r}: at least one kind needs a positive weight")
    return mix


def parse_vals(text: str) -> list[tuple[str, str]]:
    """`demo/hello,demo/counter` -> [("demo", "hello"), ("demo", "counter")]."""
    vals = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        user, slash, val = item.partition("/")
        if not slash or not user or not val or "/" in val:
            raise UsageError(f"--vals: expected USER/VAL, got {item!r}")
        vals.append((user, val))
    if not vals:
        raise UsageError("--vals names no val")
    return vals


@dataclass(frozen=True, slots=True)
class Options:
    target: Target
    vals: list[tuple[str, str]]
    mix: dict[str, int]
    concurrency: int
    duration_s: float
    timeout_s: float
    slow_ms: int
    token: str | None
    api_host: str
    web_domain: str
    out: Path
    json_out: Path | None
    seed: int | None
    keep_vals: bool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="valrun's base URL")
    parser.add_argument(
        "--vals",
        default="demo/hello",
        help="warm vals, USER/VAL[,USER/VAL...] (default: %(default)s)",
    )
    parser.add_argument(
        "--mix",
        help="weights of request kinds, e.g. warm=80,cold=5,slow=5,failing=10 (default: that "
        "with a token, warm=100 without)",
    )
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="default: %(default)s")
    parser.add_argument(
        "--duration", "-d", type=float, default=30.0, help="seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="per request, seconds (default: %(default)s)"
    )
    parser.add_argument(
        "--slow-ms", type=int, default=200, help="the slow val's sleep (default: %(default)s)"
    )
    parser.add_argument("--token", help="API token for cold/slow/failing (default: $VALRUN_TOKEN)")
    parser.add_argument("--api-host", default="api.localhost")
    parser.add_argument("--web-domain", default="web.localhost")
    parser.add_argument(
        "--out", default="bench-out/loadtest.png", help="the plot (default: %(default)s)"
    )
    parser.add_argument("--json", dest="json_out", help="also write the samples' summary here")
    parser.add_argument("--seed", type=int, help="seed the choice of request kinds")
    parser.add_argument(
        "--keep-vals", action="store_true", help="do not delete the vals this tool saved"
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --url (never on a shared machine)",
    )
    return parser


def parse_options(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    args = build_parser().parse_args(argv)
    token = args.token or environ.get("VALRUN_TOKEN") or None
    mix = parse_mix(args.mix or (DEFAULT_MIX_WITH_TOKEN if token else "warm=100"))
    needs_token = [kind for kind in ("cold", "slow", "failing") if mix[kind]]
    if needs_token and not token:
        raise UsageError(
            f"--mix asks for {', '.join(needs_token)}: those need --token (or $VALRUN_TOKEN) "
            "to save their vals"
        )
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if not 0 < args.duration <= 3600:
        raise UsageError("--duration must be more than 0 and at most 3600 seconds")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    if args.slow_ms < 0:
        raise UsageError("--slow-ms must be zero or more")
    return Options(
        target=check_target(args.url, args.allow_remote),
        vals=parse_vals(args.vals),
        mix=mix,
        concurrency=args.concurrency,
        duration_s=args.duration,
        timeout_s=args.timeout,
        slow_ms=args.slow_ms,
        token=token,
        api_host=args.api_host,
        web_domain=args.web_domain,
        out=Path(args.out),
        json_out=Path(args.json_out) if args.json_out else None,
        seed=args.seed,
        keep_vals=args.keep_vals,
    )


@dataclass(frozen=True, slots=True)
class Sample:
    started_s: float  # since the run began
    kind: str
    status: int  # an HTTP status, or a key of NO_ANSWER
    latency_s: float

    @property
    def error(self) -> bool:
        return self.status != EXPECTED_STATUS[self.kind]


def status_label(status: int) -> str:
    return NO_ANSWER.get(status, str(status))


@dataclass(frozen=True, slots=True)
class Stats:
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Stats:
        latencies = [s.latency_s * 1000 for s in samples]
        return cls(
            requests=len(samples),
            errors=sum(s.error for s in samples),
            p50_ms=percentile(latencies, 50),
            p90_ms=percentile(latencies, 90),
            p99_ms=percentile(latencies, 99),
            max_ms=max(latencies, default=math.nan),
        )


def summarize(samples: Sequence[Sample], elapsed_s: float) -> str:
    """The summary table (markdown) and the answers by status."""
    rows = [("all", list(samples))] + [
        (kind, [s for s in samples if s.kind == kind]) for kind in KINDS
    ]
    lines = [
        "| kind | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for kind, group in rows:
        if not group and kind != "all":
            continue
        stats = Stats.of(group)
        lines.append(
            f"| {kind} | {stats.requests} | {stats.requests / elapsed_s:.1f} | "
            f"{stats.p50_ms:.1f} | {stats.p90_ms:.1f} | {stats.p99_ms:.1f} | "
            f"{stats.max_ms:.1f} | {stats.errors} |"
        )
    lines.append("")
    lines.append("answers by status (status: count; * marks an answer that kind should not give):")
    for kind in KINDS:
        counts = Counter(s.status for s in samples if s.kind == kind)
        if counts:
            parts = [
                f"{status_label(status)}{'' if status == EXPECTED_STATUS[kind] else '*'}: {n}"
                for status, n in sorted(counts.items())
            ]
            lines.append(f"  {kind}: {', '.join(parts)}")
    return "\n".join(lines)


def progress_line(samples: Sequence[Sample], rate: float, now_s: float, duration_s: float) -> str:
    """One line: req/s since the last line, p99 so far, errors so far (by status)."""
    p99 = percentile([s.latency_s * 1000 for s in samples], 99)
    errors = Counter(status_label(s.status) for s in samples if s.error)
    detail = ", ".join(f"{label}: {n}" for label, n in sorted(errors.items()))
    return (
        f"[{now_s:5.1f}/{duration_s:g} s] {rate:7.1f} req/s  p99 so far {p99:7.1f} ms  "
        f"errors {sum(errors.values())}" + (f" ({detail})" if detail else "")
    )


def cold_code(name: str, nonce: int) -> str:
    # The nonce makes each save a different source: a worker that has never run this code.
    return f"# {nonce}\ndef {name}(req):\n    return {{'fresh': {nonce}}}\n"


def slow_code(name: str, sleep_ms: int) -> str:
    return (
        f"import time\n\ndef {name}(req):\n    time.sleep({sleep_ms / 1000!r})\n"
        "    return 'slept'\n"
    )


def failing_code(name: str) -> str:
    return f"def {name}(req):\n    raise ValueError('failing on purpose (scripts/loadtest)')\n"


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Run:
    options: Options
    user: str | None = None
    samples: list[Sample] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    started: float = 0.0

    def client(self) -> ValrunClient:
        o = self.options
        return ValrunClient(o.target, o.api_host, o.web_domain, o.token)

    async def prepare(self) -> None:
        """Save the vals cold, slow and failing requests use, under the token's user."""
        o = self.options
        if not (o.mix["cold"] or o.mix["slow"] or o.mix["failing"]):
            return
        client = self.client()
        try:
            self.user = await client.whoami()
            wanted = (
                [(f"{PREFIX}_fail", failing_code(f"{PREFIX}_fail"))] if o.mix["failing"] else []
            )
            for task in range(o.concurrency if o.mix["slow"] else 0):
                name = f"{PREFIX}_slow{task}"
                wanted.append((name, slow_code(name, o.slow_ms)))
            for task in range(o.concurrency if o.mix["cold"] else 0):
                name = f"{PREFIX}_cold{task}"
                wanted.append((name, cold_code(name, 0)))
            for name, code in wanted:
                await client.put_val(self.user, name, code)
                self.created.append(name)
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        if self.options.keep_vals or not self.created or self.user is None:
            return
        client = self.client()
        try:
            for name in self.created:
                await client.api("DELETE", f"/v1/vals/{self.user}/{name}")
        except HttpError as exc:
            print(f"loadtest: could not delete the vals it saved: {exc}", file=sys.stderr)
        finally:
            await client.aclose()

    async def drive(self, task: int, rng: random.Random, deadline: float) -> None:
        """One closed-loop client: a request, its answer, the next request, until the deadline."""
        o = self.options
        kinds = [kind for kind in KINDS if o.mix[kind]]
        weights = [o.mix[kind] for kind in kinds]
        client = self.client()
        nonce = status = 0
        try:
            while trio.current_time() < deadline:
                if status == 0 and nonce:
                    await trio.sleep(0.05)  # no connection: do not spin on a stopped server
                nonce += 1
                kind = rng.choices(kinds, weights)[0]
                user, val = self._val_for(kind, task, rng)
                started = trio.current_time()
                status = 200
                if kind == "cold":  # only the call is timed, unless the save itself fails
                    status = await self._save_cold(client, user, val, nonce)
                    started = trio.current_time() if status == 200 else started
                if status == 200:
                    status = await self._call(client, user, val)
                latency = trio.current_time() - started
                self.samples.append(Sample(started - self.started, kind, status, latency))
        finally:
            await client.aclose()

    def _val_for(self, kind: str, task: int, rng: random.Random) -> tuple[str, str]:
        if kind == "warm":
            return rng.choice(self.options.vals)
        # prepare() saved these under the token's user (parse_options demands the token).
        user = self.user or ""
        if kind == "failing":
            return user, f"{PREFIX}_fail"
        return user, f"{PREFIX}_{kind}{task}"

    async def _call(self, client: ValrunClient, user: str, val: str) -> int:
        try:
            with trio.fail_after(self.options.timeout_s):
                return (await client.call(user, val)).status
        except HttpError:
            return 0
        except trio.TooSlowError:
            return -1

    async def _save_cold(self, client: ValrunClient, user: str, val: str, nonce: int) -> int:
        """Save a new version; 200 when saved, else the failed save's status."""
        try:
            with trio.fail_after(self.options.timeout_s):
                answer = await client.api(
                    "PUT", f"/v1/vals/{user}/{val}", {"code": cold_code(val, nonce)}
                )
        except HttpError:
            return 0
        except trio.TooSlowError:
            return -1
        return 200 if answer.status in (200, 201) else answer.status

    async def report_progress(self) -> None:
        seen, then = 0, trio.current_time()
        while True:
            await trio.sleep(1)
            now = trio.current_time()
            rate = (len(self.samples) - seen) / (now - then)
            seen, then = len(self.samples), now
            line = progress_line(self.samples, rate, now - self.started, self.options.duration_s)
            print(f"\r{line}" if sys.stderr.isatty() else line, end="", file=sys.stderr)
            if not sys.stderr.isatty():
                print(file=sys.stderr)

    async def run(self) -> float:
        o = self.options
        rng = random.Random(o.seed)
        await self.prepare()
        self.started = trio.current_time()
        deadline = self.started + o.duration_s
        # Bounded even when the server stops answering: the deadline plus one request's timeout.
        with trio.move_on_after(o.duration_s + o.timeout_s + 5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.report_progress)
                async with trio.open_nursery() as drivers:
                    for task in range(o.concurrency):
                        drivers.start_soon(self.drive, task, random.Random(rng.random()), deadline)
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - self.started
        if sys.stderr.isatty():
            print(file=sys.stderr)
        await self.cleanup()
        return elapsed


# --- the plot ---------------------------------------------------------------------------------

COLORS = {"warm": "tab:blue", "cold": "tab:orange", "slow": "tab:purple", "failing": "tab:red"}


def windowed(
    samples: Sequence[Sample], q: float, window_s: float
) -> tuple[list[float], list[float]]:
    """(window's middle, q-th percentile latency in ms) for each window that had samples."""
    buckets: dict[int, list[float]] = {}
    for s in samples:
        buckets.setdefault(int(s.started_s // window_s), []).append(s.latency_s * 1000)
    keys = sorted(buckets)
    return [(k + 0.5) * window_s for k in keys], [percentile(buckets[k], q) for k in keys]


def plot(samples: Sequence[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (over_time, histogram) = plt.subplots(
        2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [3, 2]}
    )
    present = [kind for kind in KINDS if any(s.kind == kind for s in samples)]
    for kind in present:
        group = [s for s in samples if s.kind == kind]
        over_time.scatter(
            [s.started_s for s in group],
            [s.latency_s * 1000 for s in group],
            s=6,
            alpha=0.5,
            color=COLORS[kind],
            label=f"{kind} ({len(group)})",
            linewidths=0,
        )
    # About 40 points across the run, each over at least half a second of samples.
    window_s = max(0.5, math.ceil(max(s.started_s for s in samples) / 40 * 2) / 2)
    for q, style in ((50, "-"), (99, "--")):
        xs, ys = windowed(samples, q, window_s)
        label = f"p{q:.0f} per {window_s:g} s"
        over_time.plot(xs, ys, style, color="black", linewidth=1.3, label=label)
    warm = [s for s in samples if s.kind == "warm"]
    if warm and len(warm) < len(samples):  # the fast path's tail, without the slow vals
        xs, ys = windowed(warm, 99, window_s)
        over_time.plot(xs, ys, ":", color="navy", linewidth=1.5, label="p99 of warm")
    errors = [s for s in samples if s.error]
    if errors:
        over_time.scatter(
            [s.started_s for s in errors],
            [s.latency_s * 1000 for s in errors],
            s=14,
            marker="x",
            color="crimson",
            label=f"errors ({len(errors)})",
        )
    over_time.set_yscale("log")
    over_time.set_xlabel("time since start (s)")
    over_time.set_ylabel("latency (ms, log)")
    over_time.set_title(title, fontsize=10)
    over_time.grid(True, which="both", alpha=0.25)
    over_time.legend(loc="upper right", fontsize=8, markerscale=3, ncol=2)

    latencies = [s.latency_s * 1000 for s in samples if s.latency_s > 0]
    if latencies:
        low, high = min(latencies), max(latencies)
        bins = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 10
        histogram.hist(
            [[s.latency_s * 1000 for s in samples if s.kind == kind] for kind in present],
            bins=bins,
            stacked=True,
            color=[COLORS[kind] for kind in present],
            label=present,
        )
        for q, style in ((50, "-"), (99, "--")):
            value = percentile(latencies, q)
            histogram.axvline(value, color="black", linestyle=style, linewidth=1)
            histogram.annotate(
                f" p{q:.0f} {value:.1f} ms",
                (value, 0.97),
                xycoords=("data", "axes fraction"),
                va="top",
                fontsize=8,
            )
        histogram.set_xscale("log")
        histogram.legend(loc="upper right", fontsize=8)
    histogram.set_xlabel("latency (ms, log)")
    histogram.set_ylabel("requests")
    histogram.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(options: Options) -> str:
    mix = ",".join(f"{kind}={weight}" for kind, weight in options.mix.items() if weight)
    vals = ",".join(f"{user}/{val}" for user, val in options.vals)
    return (
        f"valrun at {options.target.host}:{options.target.port}: {options.concurrency} "
        f"connections, {options.duration_s:g} s\nmix {mix}; warm vals {vals}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        options = parse_options(argv, os.environ)
    except UsageError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    run = Run(options)
    print(f"loadtest: {describe(options)}".replace("\n", "; "), file=sys.stderr)
    try:
        elapsed = trio.run(run.run)
    except HttpError as exc:
        print(f"loadtest: could not set up: {exc}", file=sys.stderr)
        return 1
    samples = sorted(run.samples, key=lambda s: s.started_s)
    if not samples:
        print("loadtest: no request completed", file=sys.stderr)
        return 1
    print("\n" + describe(options).replace("\n", "; ") + f"; took {elapsed:.1f} s\n")
    print(summarize(samples, elapsed))
    if options.json_out is not None:
        options.json_out.parent.mkdir(parents=True, exist_ok=True)
        groups = {"all": samples} | {k: [s for s in samples if s.kind == k] for k in KINDS}
        result = {
            "elapsed_s": elapsed,
            "kinds": {kind: asdict(Stats.of(group)) for kind, group in groups.items() if group},
        }
        options.json_out.write_text(json.dumps(result, indent=2) + "\n")
    plot(samples, options.out, describe(options))
    print(f"\nplot: {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
