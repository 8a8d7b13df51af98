"""A forked worker's private memory after each phase of its start, and what each phase adds.

    python -I scripts/worker_phases.py [--runs 5] [--skip confine|warm_up ...]

Run by `scripts/worker_memory --phases`. This process is a fork server in miniature: it
imports what `sandbox.forkserver` imports, runs the warm-up val once and freezes the garbage
collector's view (as `sandbox.forkserver.main` does), then forks one child per run and waits
for it, blocked in waitpid (so it writes none of the pages it shares with the child). The
child does what a worker does: confine itself (every layer), run the warm-up val, then load
a hello val and serve it two requests; after each phase it reads its own Private_Clean +
Private_Dirty (/proc/self/smaps_rollup, opened before confining) and times the load and
first request (the cold path a warm-up exists for). `--skip` leaves a phase out, to show
what it adds to the end state rather than what it touched first.

Prints one line per phase: median KiB after it and median KiB it added. Run as root (the
drop to `nobody` needs it; as another user the confinement runs without the drop).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time

import sandbox.forkserver as forkserver
from sandbox.confine import ConfinePlan, confine
from sandbox.http import Request, to_response
from sandbox.policy import LogBuffer, load_val

HELLO = """\
def hello(req):
    name = req.query.get("name", "world")
    return Response.json({"greeting": "hi " + name})
"""
PHASES = ("fork", "confine", "warm_up", "load", "request", "request again")


def private_kib(fd: int, buffer: bytearray) -> int:
    os.lseek(fd, 0, os.SEEK_SET)
    size = os.readv(fd, [buffer])
    total = 0
    for line in bytes(buffer[:size]).splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            total += int(line.split()[1])
    return total


def child(plan: ConfinePlan, skip: frozenset[str], out: int) -> None:
    """The worker's start, phase by phase; one JSON line to `out`."""
    buffer = bytearray(8192)
    rollup = os.open("/proc/self/smaps_rollup", os.O_RDONLY)
    marks = {"fork": private_kib(rollup, buffer)}
    signal.set_wakeup_fd(-1)
    if "confine" not in skip:
        confine(dataclasses.replace(plan, keep_fds=(2, rollup, out)))
    marks["confine"] = private_kib(rollup, buffer)
    if "warm_up" not in skip:
        forkserver._warm_up()
    marks["warm_up"] = private_kib(rollup, buffer)
    started = time.perf_counter()
    log = LogBuffer(1024)
    val = load_val(HELLO, "hello", {}, log)
    marks["load"] = private_kib(rollup, buffer)
    for phase in ("request", "request again"):
        request = Request("GET", "http://x/", "/", "name=a", [("host", "x")], b"")
        to_response(val.export(request))  # type: ignore[operator]
        if phase == "request":
            cold_ms = (time.perf_counter() - started) * 1000
        marks[phase] = private_kib(rollup, buffer)
    os.write(out, json.dumps({"marks": marks, "cold_ms": cold_ms}).encode() + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="children to fork (default: 5)")
    parser.add_argument("--skip", action="append", default=[], choices=("confine", "warm_up"))
    args = parser.parse_args()
    skip = frozenset(args.skip)
    forkserver._warm_up()
    gc.freeze()
    results = []
    with tempfile.TemporaryDirectory(prefix="valrun-phases-") as workdir:
        os.chmod(workdir, 0o755)  # the child drops to nobody and must reach its own directory
        for run in range(args.runs):
            plan = ConfinePlan(workdir=os.path.join(workdir, f"w{run}"))
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(read_end)
                    child(plan, skip, write_end)
                    code = 0
                finally:
                    os._exit(code)
            os.close(write_end)
            _, status = os.waitpid(pid, 0)
            with os.fdopen(read_end, "rb") as pipe:
                line = pipe.read()
            if os.waitstatus_to_exitcode(status) != 0 or not line:
                print(f"worker_phases: run {run} failed (status {status})", file=sys.stderr)
                return 1
            results.append(json.loads(line))
    what = f" (skipping {', '.join(sorted(skip))})" if skip else ""
    print(f"private KiB of a forked worker, median of {args.runs} runs{what}:")
    previous = 0.0
    for phase in PHASES:
        value = statistics.median(r["marks"][phase] for r in results)
        print(f"  after {phase:14} {value:7.0f}   +{value - previous:.0f}")
        previous = value
    cold = statistics.median(r["cold_ms"] for r in results)
    print(f"load + first request in the child: median {cold:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
