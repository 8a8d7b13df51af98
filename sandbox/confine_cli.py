"""`python -I -m sandbox.confine probe|bench`: what runs in the process probe() starts.

`probe` forks one throwaway child per layer, confines it, and checks each layer by a real
attempt; `bench` times a full confine() in forked children.

Standard library only: this module runs inside the untrusted worker.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from sandbox.confine import (
    LAYERS,
    MIB,
    NEEDS_NO_NEW_PRIVS,
    NOBODY,
    ConfineError,
    ConfinePlan,
    confine,
    environ_span,
)
from sandbox.seccomp import SECCOMP_MODE_FILTER
from sandbox.syscalls import PR_GET_NO_NEW_PRIVS, PR_GET_SECCOMP, prctl


@dataclass(frozen=True, slots=True)
class _ProbeContext:
    root: str  # a private temporary directory; workdirs and the marker live in it
    marker: str  # a file outside every workdir: readable unconfined, not under Landlock
    stray_fd: int  # an inherited fd close_fds must close
    netns_inode: int
    was_root: bool
    drop_to_uid: int


def _expect_denied(attempt: Callable[[], object], what: str) -> str | None:
    try:
        attempt()
    except PermissionError:
        return None
    except OSError as exc:
        return f"{what} failed, but not for lack of permission: {exc}"
    return f"{what} still works"


def _connect_tcp() -> None:
    # Port 1 need not listen: Landlock refuses with EACCES before TCP answers ECONNREFUSED.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.connect(("127.0.0.1", 1))


def _read_file(path: str) -> None:
    with open(path, "rb") as file:
        file.read()


def _check(
    layer: str, ctx: _ProbeContext, plan: ConfinePlan, env_span: tuple[int, int]
) -> str | None:
    """None when the layer is demonstrably in force in this process, else what is wrong."""
    if layer == "rlimits":
        ok = resource.getrlimit(resource.RLIMIT_AS)[0] == plan.memory_mb * MIB
        return None if ok else "RLIMIT_AS is not set"
    if layer == "no_new_privs":
        return None if prctl(PR_GET_NO_NEW_PRIVS) == 1 else "the bit is not set"
    if layer == "seccomp":
        if prctl(PR_GET_SECCOMP) != SECCOMP_MODE_FILTER:
            return "no filter installed"
        return _expect_denied(lambda: socket.socket().close(), "socket()")
    if layer == "landlock":
        return _expect_denied(lambda: _read_file(ctx.marker), "reading a file outside")
    if layer == "landlock_net":
        return _expect_denied(_connect_tcp, "TCP connect")
    if layer == "namespaces":
        same = os.stat("/proc/self/ns/net").st_ino == ctx.netns_inode
        return "still in the parent's network namespace" if same else None
    if layer == "drop_user":
        if ctx.was_root and os.getuid() != ctx.drop_to_uid:
            return f"still uid {os.getuid()}"
        return None
    if layer == "close_fds":
        try:
            os.fstat(ctx.stray_fd)
        except OSError:
            return None
        return f"inherited fd {ctx.stray_fd} is still open"
    if layer == "empty_env":
        start, end = env_span
        if os.environ or ctypes.string_at(start, end - start).strip(b"\0"):
            return "the environment is still visible"
        return None
    if layer == "private_cwd":
        mode = stat.S_IMODE(os.stat(".").st_mode)
        if os.getcwd() != plan.workdir or mode != 0o700:
            return f"cwd {os.getcwd()} mode {mode:o}"
        return None
    raise ValueError(layer)


def _in_child(body: Callable[[int], dict[str, object]]) -> dict[str, object]:
    """Run body(report_fd) in a forked child; return the JSON object it reports."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        try:
            os.close(read_fd)
            report = body(write_fd)
        except BaseException as exc:
            report = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(report).encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        if os.WIFSIGNALED(status):
            return {"error": f"the child was killed by signal {os.WTERMSIG(status)}"}
        return {"error": f"the child exited ({os.waitstatus_to_exitcode(status)}) silently"}
    report = json.loads(b"".join(chunks))
    return report if isinstance(report, dict) else {"error": "the child sent a bad report"}


def _try_layers(ctx: _ProbeContext, name: str, layers: frozenset[str]) -> dict[str, object]:
    """Confine a child with `layers` (and what they need), then check each one."""
    workdir = os.path.join(ctx.root, f"work-{name}")
    os.mkdir(workdir, 0o700)
    if layers & NEEDS_NO_NEW_PRIVS:
        layers |= {"no_new_privs"}
    plan = ConfinePlan(workdir=workdir, drop_to_uid=ctx.drop_to_uid, layers=layers)

    def body(report_fd: int) -> dict[str, object]:
        env_span = environ_span()
        try:
            applied = confine(replace(plan, keep_fds=(2, report_fd)))
        except ConfineError as exc:
            return {"failed": exc.layer, "reason": exc.reason}
        problems = {layer: _check(layer, ctx, plan, env_span) for layer in layers}
        return {"applied": applied, "problems": problems}

    return _in_child(body)


def _verdict(layer: str, report: Mapping[str, object], *, alone: bool) -> tuple[bool, str]:
    context = "" if alone else "works alone, but not after the other layers: "
    if "error" in report:
        return False, f"{context}{report['error']}"
    if "failed" in report:
        if alone or report["failed"] in (layer, None):
            return False, f"{context}{report['reason']}"
        return True, "(not reached: an earlier layer failed)"
    problems, applied = report.get("problems"), report.get("applied")
    if not isinstance(problems, dict) or not isinstance(applied, dict):
        return False, f"{context}the child sent a bad report"
    if problem := problems.get(layer):
        return False, f"{context}applied, but {problem}"
    return True, str(applied.get(layer))


def _probe_here(drop_to_uid: int) -> dict[str, tuple[bool, str]]:
    root = tempfile.mkdtemp(prefix="valrun-probe-")
    try:
        marker = os.path.join(root, "outside")
        with open(marker, "w") as file:
            file.write("outside every workdir\n")
        ctx = _ProbeContext(
            root=root,
            marker=marker,
            stray_fd=os.open(marker, os.O_RDONLY),  # inherited by fork, like any fd
            netns_inode=os.stat("/proc/self/ns/net").st_ino,
            was_root=os.geteuid() == 0,
            drop_to_uid=drop_to_uid,
        )
        results = {
            layer: _verdict(layer, _try_layers(ctx, layer, frozenset({layer})), alone=True)
            for layer in LAYERS
        }
        # Then together, in the real order: a layer may work alone and fail after another
        # one (Landlock paths after the uid drop, unshare after seccomp).
        working = frozenset(layer for layer, (ok, _) in results.items() if ok)
        report = _try_layers(ctx, "all", working)
        for layer in working:
            ok, detail = _verdict(layer, report, alone=False)
            if not ok:
                results[layer] = (False, detail)
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bench(children: int) -> dict[str, float]:
    """Median milliseconds per step of a full confine() in forked children."""
    import statistics  # the CLI's alone: workers need not load it

    samples: dict[str, list[float]] = {}
    root = tempfile.mkdtemp(prefix="valrun-bench-")
    try:
        for index in range(children):
            workdir = os.path.join(root, f"w{index}")

            def body(report_fd: int, workdir: str = workdir) -> dict[str, object]:
                timings: dict[str, float] = {}
                confine(ConfinePlan(workdir=workdir, keep_fds=(2, report_fd)), timings=timings)
                return {"timings": timings}

            report = _in_child(body)
            timings = report.get("timings")
            if not isinstance(timings, dict):
                raise RuntimeError(f"bench child failed: {report}")
            for step, seconds in timings.items():
                samples.setdefault(step, []).append(seconds * 1000)
            samples.setdefault("total", []).append(sum(timings.values()) * 1000)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {step: statistics.median(values) for step, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse  # the CLI's alone: workers need not load it

    parser = argparse.ArgumentParser(prog="python -I -m sandbox.confine")
    commands = parser.add_subparsers(dest="command", required=True)
    probe_parser = commands.add_parser("probe", help="print each layer's status as JSON")
    probe_parser.add_argument("--drop-to-uid", type=int, default=NOBODY)
    bench_parser = commands.add_parser("bench", help="median cost per layer in forked children")
    bench_parser.add_argument("-n", "--children", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(_probe_here(args.drop_to_uid)))
        return 0
    medians = _bench(args.children)
    print(f"median over {args.children} forked children, full plan, uid {os.geteuid()}:")
    for step, millis in medians.items():
        print(f"  {step:<13} {millis:8.3f} ms")
    return 0
