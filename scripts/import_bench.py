"""Measure the cold start of a val that imports three others, against one that imports none.

    scripts/import_bench [--pairs 40] [--gap-s 0.2] [--json FILE]

One valrun (`valrun --config TMP serve`, a real subprocess over a temporary SQLite file) with
default settings. User `bench` saves three small library vals (`lib0`, `lib1`, `lib2`, each a
few functions), then --pairs pairs of vals that answer the same JSON: `plainN`, which imports
nothing, and `importsN`, which imports one name from each library at its latest version. Each
val is new, so its first request is a cold start: a worker is specialized for it, and for
`importsN` that load asks the front end for three vals' sources (three round trips on the
worker's socket) and compiles and runs them in the worker.

The pairs run interleaved (plain, imports, plain, imports, ...) with a pause before each
request, so both kinds see the same machine; the ratio of their medians (and p99s) is taken
within the run. Times are client-side: from sending the request to the whole answer.

Exits 0 when everything was measured; 1 when something could not be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from bench import MeasureError, free_port, open_server
from loadlib import HttpError, SetupError, Target, ValrunClient, create_user, percentile

API_HOST = "api.localhost"
WEB_DOMAIN = "web.localhost"
USER = "bench"
LIBRARY = """\
import re


def slug{i}(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def total{i}(numbers):
    return sum(numbers)


lib{i} = {{"slug": slug{i}, "total": total{i}}}
"""
PLAIN = """\
def {name}(req):
    return Response.json({{"answer": 6}})
"""
IMPORTS = """\
from vals.bench.lib0 import total0
from vals.bench.lib1 import total1
from vals.bench.lib2 import total2


def {name}(req):
    return Response.json({{"answer": total0([1]) + total1([2]) + total2([3])}})
"""


@dataclass
class Stats:
    median_ms: float
    p99_ms: float
    samples: int


@dataclass
class Result:
    pairs: int
    plain: Stats
    imports_three: Stats
    median_ratio: float
    p99_ratio: float
    warm_plain: Stats
    warm_imports_three: Stats


def stats(samples: list[float]) -> Stats:
    return Stats(statistics.median(samples), percentile(samples, 99), len(samples))


async def timed(client: ValrunClient, val: str) -> float:
    started = time.perf_counter()
    answer = await client.call(USER, val)
    elapsed_ms = (time.perf_counter() - started) * 1000
    if answer.status != 200 or json.loads(answer.body) != {"answer": 6}:
        raise MeasureError(f"{USER}/{val} answered {answer.status}: {answer.body[:300]!r}")
    return elapsed_ms


async def measure(args: argparse.Namespace, workdir: Path) -> Result:
    port = free_port()
    config = workdir / "valrun.toml"
    config.write_text(
        f'[server]\nbind = ["127.0.0.1:{port}"]\n[store]\nurl = "sqlite:///{workdir}/valrun.db"\n'
    )
    token = await create_user(config, USER)
    command = [sys.executable, "-m", "runtime.cli", "--config", str(config), "serve"]
    target = Target("127.0.0.1", port)
    async with open_server("valrun", command, port, workdir / "valrun.log"):
        client = ValrunClient(target, API_HOST, WEB_DOMAIN, token)
        try:
            for i in range(3):
                await client.put_val(USER, f"lib{i}", LIBRARY.format(i=i))
            for n in range(args.pairs):
                await client.put_val(USER, f"plain{n}", PLAIN.format(name=f"plain{n}"))
                await client.put_val(USER, f"imports{n}", IMPORTS.format(name=f"imports{n}"))
            cold: dict[str, list[float]] = {"plain": [], "imports": []}
            warm: dict[str, list[float]] = {"plain": [], "imports": []}
            print(f"{args.pairs} pairs of cold starts, interleaved", file=sys.stderr)
            for n in range(args.pairs):
                for kind in ("plain", "imports"):
                    # A pause before each request, as real traffic has: the pool refills its
                    # ready workers between requests, not during the one measured.
                    await trio.sleep(args.gap_s)
                    cold[kind].append(await timed(client, f"{kind}{n}"))
                    await trio.sleep(args.gap_s)
                    warm[kind].append(await timed(client, f"{kind}{n}"))
        finally:
            await client.aclose()
    plain, imports = stats(cold["plain"]), stats(cold["imports"])
    return Result(
        pairs=args.pairs,
        plain=plain,
        imports_three=imports,
        median_ratio=imports.median_ms / plain.median_ms,
        p99_ratio=imports.p99_ms / plain.p99_ms,
        warm_plain=stats(warm["plain"]),
        warm_imports_three=stats(warm["imports"]),
    )


def report(result: Result) -> str:
    lines = [f"cold start, {result.pairs} vals of each kind (client-side, ms):"]
    for label, cold, warm in (
        ("imports none ", result.plain, result.warm_plain),
        ("imports three", result.imports_three, result.warm_imports_three),
    ):
        lines.append(
            f"  {label}: cold median {cold.median_ms:.1f}, p99 {cold.p99_ms:.1f}; "
            f"warm median {warm.median_ms:.2f}, p99 {warm.p99_ms:.2f}"
        )
    lines.append(
        f"  ratio (three / none): median {result.median_ratio:.2f}, p99 {result.p99_ratio:.2f}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="vals of each kind (default 40)")
    parser.add_argument("--gap-s", type=float, default=0.2, help="pause before each request")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="valrun-import-bench-") as tmp:
        try:
            result = trio.run(measure, args, Path(tmp))
        except (MeasureError, HttpError, SetupError) as exc:
            print(f"import_bench: {exc}", file=sys.stderr)
            return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
