"""Measure an idle warm worker's memory, mapping by mapping and by cause, and the cold start.

    scripts/worker_memory [--vals 30] [--gap-ms 100] [--explain 3] [--json FILE]
    scripts/worker_memory --phases

One valrun (`valrun --config TMP serve`, a real subprocess on 127.0.0.1 over a temporary
SQLite file, one front-end process, one user: so one fork server), no wrk. User `bench` saves
--vals hello vals; each gets a cold request (a new worker is loaded for it) and then a warm
one, with a pause before each (as scripts/bench does), so the run also gives the cold minus
warm first request, client-side. After a second idle, for every worker (the fork server's
children: the warm ones and any generic spares):

- /proc/PID/smaps_rollup: PSS, private clean and private dirty (what scripts/bench reads);
- /proc/PID/smaps, summed per mapping ([heap], anonymous, [stack], each file by name and
  permissions): where the private pages are;
- as root, /proc/PID/pagemap and /proc/kpagecount against the fork server's pagemap: of the
  worker's private pages, how many are copies of a page the fork server has at the same
  address and how many are new; and for the first --explain workers, each copied page read
  from both processes (/proc/PID/mem) and its changed words named (explain()).

`--phases` runs scripts/worker_phases.py instead: a worker's private memory after each phase
of its start, whole and without the confinement or the warm-up.

Prints medians over the workers (and the max); exits 0 when everything was measured, 1 when
something could not be.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio
from bench import (
    API_HOST,
    HELLO,
    ONE_USER_POOL,
    USER,
    WEB_DOMAIN,
    MeasureError,
    free_port,
    open_server,
    parse_smaps_rollup,
    pick_workers,
    read_process_table,
    sandbox_processes,
    timed_call,
)
from loadlib import HttpError, SetupError, Target, ValrunClient, create_user, percentile

PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
BSS_MAX = 256 * 1024  # pymalloc maps 1 MiB arenas, often right after a library
HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def say(message: str) -> None:
    print(f"worker_memory: {message}", file=sys.stderr, flush=True)


# --- /proc, pure parts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    end: int
    perms: str
    name: str  # a path, [heap], [stack], [vdso]... or "" for anonymous memory
    kib: dict[str, int]

    @property
    def label(self) -> str:
        if self.name.startswith("bss of "):
            return self.name
        if not self.name:
            return f"anon {self.perms}"
        if self.name.startswith("["):
            return self.name
        return f"{os.path.basename(self.name)} {self.perms}"


def parse_smaps(text: str) -> list[Mapping]:
    """/proc/PID/smaps -> its mappings, each with its kB fields (Pss, Private_Dirty, ...)."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        if HEADER.match(line):
            fields = line.split(None, 5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5].strip() if len(fields) > 5 else ""
            if (
                not name
                and end - start < BSS_MAX
                and mappings
                and mappings[-1].end == start
                and "/" in mappings[-1].name
            ):
                # Anonymous memory right after a file's data: that file's .bss.
                name = f"bss of {os.path.basename(mappings[-1].name)}"
            mappings.append(Mapping(start, end, fields[1], name, {}))
            continue
        key, _, rest = line.partition(":")
        parts = rest.split()
        if mappings and len(parts) == 2 and parts[1] == "kB":
            mappings[-1].kib[key] = int(parts[0])
    return mappings


def private_kib(kib: dict[str, int]) -> int:
    return kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)


def read_pfns(pid: int, start: int, end: int) -> list[int]:
    """The page frame number of each page in [start, end), 0 where none is present."""
    with open(f"/proc/{pid}/pagemap", "rb") as file:
        file.seek(start // PAGE * 8)
        raw = file.read((end - start) // PAGE * 8)
    entries = struct.unpack(f"{len(raw) // 8}Q", raw)
    return [e & PFN_MASK if e & PRESENT else 0 for e in entries]


def kpagecount(pfns: list[int]) -> list[int]:
    counts = []
    with open("/proc/kpagecount", "rb") as file:
        for pfn in pfns:
            file.seek(pfn * 8)
            counts.append(struct.unpack("Q", file.read(8))[0])
    return counts


def cow_split(worker: int, server: int, mappings: list[Mapping]) -> dict[str, Counter[str]]:
    """Per mapping label: the worker's private writable pages, as `copied` (the fork server
    has a page at the same address: a copy-on-write fault made this one, or the fork server
    wrote its own copy after this worker was forked) or `new`."""
    split: dict[str, Counter[str]] = {}
    for m in mappings:
        if "w" not in m.perms or not private_kib(m.kib):
            continue
        mine = read_pfns(worker, m.start, m.end)
        try:
            theirs = read_pfns(server, m.start, m.end)
        except OSError:
            theirs = [0] * len(mine)
        present = [(i, pfn) for i, pfn in enumerate(mine) if pfn]
        counts = kpagecount([pfn for _, pfn in present])
        tally = split.setdefault(m.label, Counter())
        for (i, _), count in zip(present, counts, strict=True):
            if count != 1:
                continue  # shared with the fork server or a sibling
            tally["copied" if i < len(theirs) and theirs[i] else "new"] += 1
    return split


class ProcessMemory:
    """Reads another process's memory (/proc/PID/mem: root, or ptrace rights over it)."""

    def __init__(self, pid: int) -> None:
        self.file = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
        self.names: dict[int, str | None] = {}

    def read(self, address: int, size: int) -> bytes | None:
        try:
            self.file.seek(address)
            return self.file.read(size)
        except (OSError, OverflowError, ValueError):
            return None

    def word(self, address: int) -> int | None:
        raw = self.read(address, 8)
        return struct.unpack("Q", raw)[0] if raw and len(raw) == 8 else None

    def type_name(self, address: int | None) -> str | None:
        """The tp_name of the type object at `address`, or None if it is not one: its type
        must be `type` (the one object that is its own type) or a type whose type is."""
        if not address or address % 8:
            return None
        if address in self.names:
            return self.names[address]
        name = None
        meta = self.word(address + 8)
        if meta and meta % 8 == 0:
            metameta = self.word(meta + 8)
            if metameta == meta or (metameta and self.word(metameta + 8) == metameta):
                name_at = self.word(address + 24)
                raw = self.read(name_at, 64) if name_at else None
                if raw and b"\0" in raw:
                    text = raw.split(b"\0", 1)[0]
                    if text and text.isascii() and text.decode().isprintable():
                        name = text.decode()
        self.names[address] = name
        return name

    def container(self, address: int, page: bytes) -> str:
        """The type of the object that `address` lies in, by looking back on its page for
        a reference count and a type pointer; "?" when none is found."""
        base = address - address % PAGE
        for at in range(address - 8, base - 8, -8):
            offset = at - base
            if offset + 16 > len(page):
                continue
            refcnt, typ = struct.unpack_from("QQ", page, offset)
            if 0 < refcnt < 1 << 32 and (name := self.type_name(typ)) is not None:
                return name
        return "?"

    def close(self) -> None:
        self.file.close()


POOL_SIZE = 16 * 1024  # CPython 3.10+ pymalloc: 16 KiB pools in 1 MiB arenas
POOL_HEADER = 48


def explain(worker: int, server: int, mappings: list[Mapping]) -> dict[str, Counter[str]]:
    """Why each copied page was copied: its changed 8-byte words, compared with the fork
    server's page at the same address, named by what sits there in the fork server.

    A changed word at A is the reference count of an object when A + 8 holds a pointer to a
    type (ob_refcnt, ob_type); a GC link when A + 16 or A + 24 does (the two words before a
    tracked object); a pool header in the first 48 bytes of a 16 KiB pool. A page written
    and then restored (a reference count taken and given back) is "same". Returns "pages"
    (by mapping and cause: the kind of all its changed words, or "mixed"), "words" (changed
    words by kind), "types" (reference counts changed, by the object's type) and
    "containers" (other changed words, by the type of the object they lie in, "?" when no
    object header precedes them on the page)."""
    mine, theirs = ProcessMemory(worker), ProcessMemory(server)
    pages: Counter[str] = Counter()
    words: Counter[str] = Counter()
    types: Counter[str] = Counter()
    containers: Counter[str] = Counter()
    try:
        for m in mappings:
            if "w" not in m.perms or not private_kib(m.kib):
                continue
            arena = not m.name or m.name.startswith("bss of")
            my_pfns = read_pfns(worker, m.start, m.end)
            try:
                their_pfns = read_pfns(server, m.start, m.end)
            except OSError:
                continue
            present = [i for i, pfn in enumerate(my_pfns) if pfn]
            counts = kpagecount([my_pfns[i] for i in present])
            for i, count in zip(present, counts, strict=True):
                if count != 1 or i >= len(their_pfns) or not their_pfns[i]:
                    continue
                base = m.start + i * PAGE
                a, b = mine.read(base, PAGE), theirs.read(base, PAGE)
                if not a or not b or len(a) != PAGE or len(b) != PAGE:
                    continue
                wa, wb = struct.unpack(f"{PAGE // 8}Q", a), struct.unpack(f"{PAGE // 8}Q", b)
                kinds = set()
                for k in range(PAGE // 8):
                    if wa[k] == wb[k]:
                        continue
                    address = base + k * 8
                    kind = "other"
                    if arena and address % POOL_SIZE < POOL_HEADER:
                        kind = "pool header"
                    elif (name := theirs.type_name(theirs.word(address + 8))) is not None:
                        kind = "refcount"
                        types[name] += 1
                    elif any(
                        theirs.type_name(theirs.word(address + offset)) is not None
                        for offset in (16, 24)
                    ):
                        kind = "gc link"
                    if kind == "other":
                        containers[theirs.container(address, b)] += 1
                    words[kind] += 1
                    kinds.add(kind)
                cause = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "same")
                where = "arenas" if arena else m.label.split(" ")[0]
                pages[f"{where}: {cause}"] += 1
    finally:
        mine.close()
        theirs.close()
    return {"pages": pages, "words": words, "types": types, "containers": containers}


# --- one run ---------------------------------------------------------------------------------


@dataclass
class WorkerMemory:
    pid: int
    rollup: dict[str, int]
    by_mapping: dict[str, dict[str, int]]
    pages: dict[str, dict[str, int]]


@dataclass
class Report:
    vals: int
    cold_minus_warm_ms: list[float] = field(default_factory=list)
    workers: list[WorkerMemory] = field(default_factory=list)
    fork_server: dict[str, int] = field(default_factory=dict)
    #: explain() summed over the first `explained` workers.
    explained: int = 0
    causes: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def valrun_config(port: int, db: Path, vals: int) -> str:
    return (
        f'[server]\nbind = ["127.0.0.1:{port}"]\nprocesses = 1\n'
        f'[store]\nurl = "sqlite:///{db}"\n'
        + ONE_USER_POOL
        + f"[quotas]\nmax_vals = {max(1000, vals + 10)}\n"
    )


def read_worker(pid: int, server: int) -> WorkerMemory:
    rollup = parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    mappings = parse_smaps(Path(f"/proc/{pid}/smaps").read_text())
    by_mapping: dict[str, dict[str, int]] = {}
    for m in mappings:
        row = by_mapping.setdefault(m.label, Counter())
        for key in ("Pss", "Private_Clean", "Private_Dirty", "Shared_Dirty"):
            row[key] += m.kib.get(key, 0)
    pages: dict[str, dict[str, int]] = {}
    if os.geteuid() == 0:
        pages = {k: dict(v) for k, v in cow_split(pid, server, mappings).items()}
    return WorkerMemory(pid, rollup, {k: dict(v) for k, v in by_mapping.items()}, pages)


async def measure(report: Report, workdir: Path, gap_s: float, explain_n: int) -> None:
    valrun_bin = Path(sys.executable).with_name("valrun")
    db, config = workdir / "valrun.db", workdir / "valrun.toml"
    port = free_port()
    config.write_text(valrun_config(port, db, report.vals))
    token = await create_user(config, USER)
    command = [str(valrun_bin), "--config", str(config), "serve"]
    async with open_server("valrun", command, port, workdir / "valrun.log") as valrun:
        client = ValrunClient(Target("127.0.0.1", port), API_HOST, WEB_DOMAIN, token)
        try:
            names = [f"mem{i}" for i in range(report.vals)]
            for name in names:
                await client.put_val(USER, name, HELLO.format(name=name))
            server = await find_fork_server(valrun.process.pid)
            for name in names:
                await trio.sleep(gap_s)
                cold = await timed_call(client, name)
                await trio.sleep(gap_s)
                warm = await timed_call(client, name)
                report.cold_minus_warm_ms.append(cold - warm)
            await trio.sleep(1)  # idle
        finally:
            await client.aclose()
        collect(report, valrun.process.pid, server, explain_n)


def collect(report: Report, root: int, server: int, explain_n: int) -> None:
    """Read every worker's memory (and explain the first `explain_n`) into `report`."""
    parents, cmdlines = read_process_table()
    workers = [pid for pid in pick_workers(root, parents, cmdlines) if pid != server]
    report.fork_server = parse_smaps_rollup(Path(f"/proc/{server}/smaps_rollup").read_text())
    say(f"{len(workers)} workers under fork server {server}")
    for pid in workers:
        try:
            report.workers.append(read_worker(pid, server))
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
    totals: dict[str, Counter[str]] = {}
    for worker in report.workers[:explain_n]:
        mappings = parse_smaps(Path(f"/proc/{worker.pid}/smaps").read_text())
        for key, counter in explain(worker.pid, server, mappings).items():
            totals.setdefault(key, Counter()).update(counter)
        report.explained += 1
    report.causes = {key: dict(counter) for key, counter in totals.items()}


async def find_fork_server(root: int) -> int:
    """The one fork server under valrun (the bench's single user has one)."""
    with trio.fail_after(30):
        while True:
            parents, cmdlines = read_process_table()
            # Workers are forked, so they share its command line; its parent is valrun.
            servers = [
                pid
                for pid in sandbox_processes(root, parents, cmdlines)
                if "sandbox" not in cmdlines.get(parents[pid], "")
            ]
            if len(servers) == 1:
                return servers[0]
            if len(servers) > 1:
                raise MeasureError(f"expected one fork server, found {sorted(servers)}")
            await trio.sleep(0.05)


# --- the printout ------------------------------------------------------------------------------


def mib(kib: float) -> str:
    return f"{kib / 1024:.2f}"


def print_report(report: Report) -> None:
    workers = report.workers
    if report.cold_minus_warm_ms:
        d = report.cold_minus_warm_ms
        print(
            f"cold - warm first request: p50 {percentile(d, 50):.1f} ms, "
            f"p99 {percentile(d, 99):.1f} ms over {len(d)} vals"
        )
    if not workers:
        return
    print(f"fork server: PSS {mib(report.fork_server.get('Pss', 0))} MiB")
    print(f"{len(workers)} workers (MiB)     median    max")
    for key in ("Pss", "Private_Clean", "Private_Dirty", "Shared_Dirty", "Rss"):
        values = [w.rollup.get(key, 0) for w in workers]
        print(f"  {key:22} {mib(statistics.median(values)):>6} {mib(max(values)):>6}")
    labels = {label for w in workers for label in w.by_mapping}

    def median_of(values: list[int]) -> float:
        return float(statistics.median(values))

    rows: list[tuple[float, str, float, float, float]] = []
    for label in labels:
        mapping = [w.by_mapping.get(label, {}) for w in workers]
        pages = [w.pages.get(label, {}) for w in workers]
        rows.append(
            (
                median_of([private_kib(m) for m in mapping]),
                label,
                median_of([m.get("Pss", 0) for m in mapping]),
                median_of([p.get("copied", 0) * PAGE // 1024 for p in pages]),
                median_of([p.get("new", 0) * PAGE // 1024 for p in pages]),
            )
        )
    rows.sort(reverse=True)
    print("per mapping, median KiB:   private      PSS   copied      new")
    for private, label, pss, copied, new in rows:
        if private or pss >= 64:
            print(f"  {label[:24]:24} {private:8.0f} {pss:8.0f} {copied:8.0f} {new:8.0f}")
    if report.explained:
        n = report.explained
        kib = PAGE // 1024
        print(f"copied pages by mapping and by what changed on them, mean KiB over {n} workers:")
        for cause, count in Counter(report.causes.get("pages", {})).most_common(12):
            print(f"  {cause[:40]:40} {count * kib / n:6.0f}")
        print("changed 8-byte words by kind, mean per worker:")
        for kind, count in Counter(report.causes.get("words", {})).most_common():
            print(f"  {kind:40} {count / n:6.0f}")
        print("reference counts changed, by type, mean per worker:")
        for name, count in Counter(report.causes.get("types", {})).most_common(12):
            print(f"  {name[:40]:40} {count / n:6.0f}")
        print("other changed words, by the object they lie in, mean per worker:")
        for name, count in Counter(report.causes.get("containers", {})).most_common(12):
            print(f"  {name[:40]:40} {count / n:6.0f}")


def run_phases() -> int:
    """scripts/worker_phases.py (in a clean `python -I`), whole and without each phase."""
    phases = str(Path(__file__).resolve().with_name("worker_phases.py"))
    for skip in ([], ["--skip", "confine"], ["--skip", "warm_up"]):
        done = subprocess.run([sys.executable, "-I", phases, *skip], check=False)
        if done.returncode != 0:
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vals", type=int, default=30, help="warm vals to load (default: 30)")
    parser.add_argument("--gap-ms", type=float, default=100, help="pause before each call")
    parser.add_argument(
        "--explain", type=int, default=3, help="workers whose copied pages to diff (default: 3)"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="instead: a worker's private memory after each phase of its start, in a fork "
        "server in miniature (scripts/worker_phases.py)",
    )
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if args.vals <= 0:
        parser.error("--vals must be positive")
    if args.phases:
        return run_phases()
    report = Report(args.vals)
    with tempfile.TemporaryDirectory(prefix="valrun-memory-") as workdir:
        try:
            explain_n = args.explain if os.geteuid() == 0 else 0
            trio.run(measure, report, Path(workdir), args.gap_ms / 1000, explain_n)
        except (MeasureError, HttpError, SetupError, OSError) as exc:
            report.failures.append(str(exc))
            say(f"could not measure: {exc}")
            log = Path(workdir, "valrun.log")
            if log.exists():
                say(f"the end of valrun's log:\n{log.read_text(errors='replace')[-3000:]}")
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
